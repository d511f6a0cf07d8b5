"""The training loop: micro-batch accumulation, precision, clipping, schedules, eval, checkpoints, signals.

Everything that changes during a run lives in the checkpoint (model, optimizer, loss scaler, RNG
states, iteration, consumed samples), and data order is a pure function of consumed samples, so a
resumed run continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtk.checkpoint import Checkpointer, RunDir, rng_state, set_rng_state
from mtk.config import RunConfig, micro_batches_per_step
from mtk.data.loader import build_loader
from mtk.models import family_spec
from mtk.parallel.apply import ParallelModel
from mtk.parallel.distributed import any_rank, gather_objects, global_rank, is_distributed
from mtk.train.metrics import MetricsLogger
from mtk.train.optim import build_optimizer
from mtk.train.schedule import global_batch_size, learning_rate, total_iterations
from mtk.train.step import StepRunner


def mean_terms(steps: list[dict[str, float]]) -> dict[str, float]:
    """Each loss term's mean over ``steps`` (finite values), keyed as metrics record it: ``lm_loss``."""
    names = steps[0] if steps else {}
    means = {}
    for name in names:
        finite = [step[name] for step in steps if math.isfinite(step[name])]
        means[name.replace(" ", "_")] = sum(finite) / len(finite) if finite else float("nan")
    return means


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or gradients, bad data for the requested run)."""


@dataclass
class TrainOptions:
    """How to run, beyond the model/training config: where to save, how often, what to do on NaN."""

    save: Path
    load: Path | None = None
    keep_last: int | None = None
    tensorboard_dir: Path | None = None
    skip_nan: bool = False
    num_workers: int = 0
    device: str | None = "cpu"  # None: cuda:LOCAL_RANK when CUDA is available, else cpu
    stop_after: int | None = None  # stop (and save) after this iteration, as if preempted
    dp_rank: int = 0  # this process's data-parallel rank ...
    dp_size: int = 1  # ... among this many (the model is sharded over them by mtk.parallel)
    timeout_minutes: float = 10.0  # a collective waiting longer than this aborts the job
    async_save: bool = False  # write checkpoints in the background while training goes on
    max_consecutive_skips: int = 100  # stop when this many steps in a row were skipped (NaN, fp16 overflow)


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_iterations: int = 0
    losses: list[float] = field(default_factory=list)  # per iteration, of this process's run


class _Preemption:
    """SIGTERM/SIGINT set a flag; the loop finishes the step, saves and returns (Slurm preemption)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Preemption:
        with contextlib.suppress(ValueError):  # not the main thread: no signal handling
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Trains ``model`` (this rank's parts, or a plain single-process module) on ``datasets``.

    ``tokenizer`` (its manifest entry; None for mock data) is recorded in every checkpoint.
    """

    def __init__(
        self,
        config: RunConfig,
        model: nn.Module | ParallelModel,
        datasets: tuple,
        options: TrainOptions,
        tokenizer: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(model, nn.Module):  # a single-process model
            model = ParallelModel([model.to(options.device)], device=options.device)
        self.config, self.model, self.options = config, model, options
        self.family = family_spec(config.model.family)
        self.steps = StepRunner(model, self.family, config.model)
        self.train_data, self.valid_data, self.test_data = datasets
        self.optimizers = [build_optimizer(part, config.train) for part in model.parts]
        precision = config.train.precision
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        # sharded gradients: the scaler all-reduces "found inf" so every rank skips the same steps
        scaler_type = torch.amp.GradScaler
        if is_distributed():
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler as scaler_type
        self.scaler = scaler_type(
            options.device.split(":")[0],
            init_scale=2.0**16,
            growth_interval=1000,
            enabled=precision == "fp16",
        )
        self.state = TrainState()
        self._consecutive_skips = 0
        self.phase = "start-up"  # what the ranks are doing together: named when a collective times out
        self.iters = total_iterations(config)
        self.amax = None  # the largest FP8 amax per log interval, and where
        if model.fp8 is not None:
            from mtk.parallel.fp8 import AmaxMonitor

            self.amax = AmaxMonitor(model.parts, model.fp8.linears)
        self.flops_per_token = self.family.flops_per_token(config.model)
        self.checkpointer = Checkpointer(
            RunDir(options.save),
            model.parts,
            self.optimizers,
            {"config": config.to_dict(), "tokenizer": tokenizer},
            load_dir=RunDir(options.load) if options.load is not None else None,
            keep_last=options.keep_last,
            async_save=options.async_save,
        )

    # ---- state ----------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "scaler": self.scaler.state_dict(),
            "iteration": self.state.iteration,
            "consumed_samples": self.state.consumed_samples,
            "consumed_tokens": self.state.consumed_tokens,
            "skipped_iterations": self.state.skipped_iterations,
            "rng": gather_objects(rng_state()),  # every rank's, so dropout resumes exactly
            "config": self.config.to_dict(),
        }

    def resume(self) -> bool:
        """Load the latest checkpoint of ``load`` (else of ``save``) if there is one, into any layout."""
        self.phase = "checkpoint load (each rank reads the shards it needs)"
        saved = self.checkpointer.load()
        if saved is None:
            return False
        self.scaler.load_state_dict(saved["scaler"])
        self.state.iteration = saved["iteration"]
        self.state.consumed_samples = saved["consumed_samples"]
        self.state.consumed_tokens = saved["consumed_tokens"]
        self.state.skipped_iterations = saved["skipped_iterations"]
        rngs = saved["rng"]
        # the same layout continues each rank's stream; another layout restarts from rank 0's
        set_rng_state(rngs[global_rank()] if len(rngs) == self.model.dims.world_size else rngs[0])
        return True

    def save(self) -> None:
        """Every rank writes its shards (in the background with ``async_save``); rank 0 completes it."""
        self.phase = "checkpoint save (each rank writes its shards)"
        self.checkpointer.save(self.state.iteration, self._trainer_state())

    def finish_save(self) -> None:
        """Wait for the save in flight, if any, and publish it."""
        self.phase = "checkpoint save (each rank writes its shards)"
        self.checkpointer.finish()

    # ---- one step ---------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.options.device.split(":")[0], dtype=self.autocast_dtype))
        if self.model.fp8 is not None:
            stack.enter_context(self.model.fp8.autocast())  # Transformer Engine's fp8_autocast
        return stack

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]], micro_batches: int) -> dict[str, float]:
        train = self.config.train
        self.model.train()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.phase = (
            f"iteration {self.state.iteration + 1}: forward/backward "
            "(parameter all-gather, gradient reduce-scatter, tensor/pipeline/context exchanges)"
        )
        local = self.steps.run(
            [next(batches) for _ in range(micro_batches)], self._autocast, self.scaler.scale
        )
        lr = learning_rate(train, self.state.iteration, self.iters)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
            self.scaler.unscale_(optimizer)
        self.phase = f"iteration {self.state.iteration + 1}: gradient-norm and loss all-reduce"
        grad_value = self.steps.clip_grad_norm(train.clip_grad or math.inf)
        # every rank sees the same values, so all take the same branch below
        loss_value = self.steps.reduce_loss(local)
        terms = self.steps.reduce_terms()
        scale = self.scaler.get_scale()
        finite = math.isfinite(loss_value) and math.isfinite(grad_value)
        if not finite and not self.scaler.is_enabled():
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            if not self.options.skip_nan:
                where = ""
                if self.amax is not None:  # an FP8 overflow: which linear saw the largest values
                    largest = self.amax.take()
                    where = f" (the largest FP8 amax: {largest['fp8_amax']:.3g} at {largest['fp8_amax_at']})"
                raise TrainingError(
                    f"iteration {self.state.iteration + 1}: {what} is {loss_value if what == 'loss' else grad_value}"
                    f"{where}; lower the learning rate, check the data, or pass --skip-nan to skip such steps"
                )
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
        else:
            for optimizer in self.optimizers:
                self.scaler.step(optimizer)  # with fp16, skipped by the scaler on overflow
        self.scaler.update()
        skipped = not finite
        return {
            "loss": loss_value,
            "grad_norm": grad_value,
            "lr": lr,
            "loss_scale": scale,
            "skipped": skipped,
            "terms": terms,
        }

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str) -> dict[str, float] | None:
        if dataset is None or self.config.train.eval_iters == 0:
            return None
        self.model.train(False)
        self.phase = f"{split} evaluation (parameter all-gather, loss all-reduce)"
        train = self.config.train
        options = self.options
        loader = iter(
            build_loader(dataset, train.micro_batch_size, 0, options.dp_rank, options.dp_size, num_workers=0)
        )
        per_step = micro_batches_per_step(train.global_batch_size, train.micro_batch_size, options.dp_size)
        losses, terms = [], []
        for _ in range(train.eval_iters):
            micro_batches = list(islice(loader, per_step))
            if len(micro_batches) < per_step:
                break
            losses.append(self.steps.run(micro_batches, self._autocast))
            terms.append(self.steps.reduce_terms())
        if not losses:
            return None
        loss = self.steps.reduce_loss(torch.stack(losses).mean())
        means = mean_terms(terms)
        return {
            "split": split,
            "iteration": self.state.iteration,
            "loss": loss,
            "ppl": math.exp(min(means.get("lm_loss", loss), 50.0)),  # of the language model's loss
            **means,
        }

    # ---- the run ----------------------------------------------------------------------------
    def run(self, logger: MetricsLogger) -> TrainState:
        train, options, state = self.config.train, self.options, self.state
        if state.iteration >= self.iters:
            logger.message(
                f"the run is complete: iteration {state.iteration} of {self.iters}; raise --train-iters to go on"
            )
            return state
        loader = build_loader(
            self.train_data,
            train.micro_batch_size,
            state.consumed_samples,
            options.dp_rank,
            options.dp_size,
            num_workers=options.num_workers,
            seed=train.seed,
        )
        batches = iter(loader)
        seq_length = self.config.model.seq_length
        first_iteration, first_skips = state.iteration, state.skipped_iterations
        interval_start, interval_tokens = time.perf_counter(), 0
        interval_losses: list[float] = []
        interval_terms: list[dict[str, float]] = []
        with _Preemption() as preemption:
            while state.iteration < self.iters:
                batch_size = global_batch_size(train, state.consumed_tokens)
                micro_batches = micro_batches_per_step(batch_size, train.micro_batch_size, options.dp_size)
                step = self.train_step(batches, micro_batches)
                state.iteration += 1
                state.consumed_samples += batch_size
                state.consumed_tokens += batch_size * seq_length
                state.skipped_iterations += int(step["skipped"])
                state.losses.append(step["loss"])
                interval_losses.append(step["loss"])
                interval_terms.append(step["terms"])
                interval_tokens += batch_size * seq_length
                if state.iteration % train.log_interval == 0 or state.iteration == self.iters:
                    seconds = time.perf_counter() - interval_start
                    finite = [x for x in interval_losses if math.isfinite(x)]
                    record = {
                        "iteration": state.iteration,
                        "consumed_samples": state.consumed_samples,
                        "consumed_tokens": state.consumed_tokens,
                        "loss": sum(finite) / len(finite) if finite else float("nan"),
                        **mean_terms(interval_terms),
                        **(self.amax.take() if self.amax is not None else {}),
                        "lr": step["lr"],
                        "grad_norm": step["grad_norm"],
                        "loss_scale": step["loss_scale"],
                        "skipped_iterations": state.skipped_iterations,
                        "global_batch_size": batch_size,
                        "tokens_per_s": interval_tokens / seconds,
                        "tflops": interval_tokens * self.flops_per_token / seconds / 1e12,
                        "seconds_per_iteration": seconds / len(interval_losses),
                    }
                    logger.log_train(record)
                    interval_start, interval_tokens, interval_losses = time.perf_counter(), 0, []
                    interval_terms = []
                self._count_skips(step["skipped"], step["loss_scale"])
                if state.iteration == self.iters:
                    break  # the last iteration is saved after the final evaluation, below
                if train.eval_interval and state.iteration % train.eval_interval == 0:
                    logger.log_eval(self.evaluate(self.valid_data, "valid"))
                self.phase = f"iteration {state.iteration}: preemption-flag all-reduce"
                stop = any_rank(preemption.requested) or (
                    options.stop_after is not None and state.iteration >= options.stop_after
                )
                if (train.save_interval and state.iteration % train.save_interval == 0) or stop:
                    self.save()
                if stop:
                    self.finish_save()
                    logger.message(
                        f"stopping at iteration {state.iteration} (checkpoint saved); run again to resume"
                    )
                    return state
            # evaluated before the final save: a checkpoint of the last iteration means the run owes nothing
            logger.log_eval(self.evaluate(self.valid_data, "valid"))
            logger.log_eval(self.evaluate(self.test_data, "test"))
            self.save()
            self.finish_save()
        ran = state.iteration - first_iteration
        if state.skipped_iterations - first_skips == ran:  # fewer than max_consecutive_skips, all skipped
            raise TrainingError(
                f"iterations {first_iteration + 1} to {state.iteration}: every step of this run was skipped "
                "for a non-finite loss or gradient, so the model did not change. Lower the learning rate, "
                "check the data, or train in bf16"
            )
        return state

    def _count_skips(self, skipped: bool, loss_scale: float) -> None:
        """Stop a run whose last ``max_consecutive_skips`` steps were all skipped: it learns nothing."""
        self._consecutive_skips = self._consecutive_skips + 1 if skipped else 0
        limit = self.options.max_consecutive_skips
        if self._consecutive_skips >= limit:
            last = self.state.iteration
            scale = f" (fp16 loss scale down to {loss_scale:g})" if self.scaler.is_enabled() else ""
            raise TrainingError(
                f"iterations {last - limit + 1} to {last}: all {limit} steps were skipped for a non-finite loss "
                f"or gradient{scale}; stopping. Lower the learning rate, check the data, or train in bf16"
            )
