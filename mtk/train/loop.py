"""The training loop: micro-batch accumulation, precision, clipping, schedules, eval, checkpoints, signals.

Everything that changes during a run lives in the checkpoint (model, optimizer, loss scaler, RNG
states, iteration, consumed samples, the schedule's position, the validation position), and data
order is a pure function of consumed samples, so a resumed run continues exactly as the uninterrupted
one would have.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from mtk.checkpoint import Checkpointer, RunDir, rng_state, set_rng_state
from mtk.collectives import any_rank, gather_objects, global_rank
from mtk.config import RunConfig, micro_batches_per_step
from mtk.data.loader import PretrainingSampler, build_loader
from mtk.models import family_spec
from mtk.parallel.apply import ParallelModel
from mtk.train.metrics import MetricsLogger
from mtk.train.optim import build_optimizer
from mtk.train.scaler import LossScaler
from mtk.train.schedule import global_batch_size, learning_rate, total_iterations
from mtk.train.step import StepRunner

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the heap
HEAP_TRIM_THRESHOLD = 1 << 30  # freed heap kept up to 1 GiB rather than given back


def keep_host_heap() -> bool:
    """Keep freed host memory for reuse (glibc only; False elsewhere): a CPU step allocates and frees
    logits-sized buffers (16 MiB for gpt-tiny's 8 x 128 x 4,096 logits) every step, and glibc's
    defaults give them back to the kernel (mmap, heap trimming) only to fault them in again, zeroed,
    the next step; on 2 cores that was a third of gpt-tiny's step. Numerics are untouched. Blocks up to
    32 MiB then come from the heap and up to 1 GiB of freed heap stays with the process."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD)
    )


def mean_terms(steps: list[dict[str, float]]) -> dict[str, float]:
    """Each loss term's mean over ``steps`` (finite values), keyed as metrics record it: ``lm_loss``."""
    names = steps[0] if steps else {}
    means = {}
    for name in names:
        finite = [step[name] for step in steps if math.isfinite(step[name])]
        means[name.replace(" ", "_")] = sum(finite) / len(finite) if finite else float("nan")
    return means


def _wrapping_loader(
    dataset: Any, start: int, samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> DataLoader:
    """This rank's micro-batches of ``samples`` samples of ``dataset`` from sample ``start`` on, the
    dataset read as if repeated end to end (Megatron sizes the valid split so that a run never wraps)."""
    size = len(dataset)
    start %= size
    sampler = PretrainingSampler(start + samples, start, micro_batch_size, dp_rank, dp_size)
    batches = [[index % size for index in batch] for batch in sampler]
    return DataLoader(dataset, batch_sampler=batches, num_workers=0, pin_memory=torch.cuda.is_available())


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
    num_workers: int = 2  # the defaults are `mtk train`'s (--num-workers, --device)
    device: str | None = None  # None: cuda (cuda:LOCAL_RANK under torchrun) when CUDA is available, else cpu
    stop_after: int | None = None  # stop (and save) after this iteration, as if preempted
    dp_rank: int = 0  # this process's data-parallel rank ...
    dp_size: int = 1  # ... among this many (the model is sharded over them by mtk.parallel)
    timeout_minutes: float = 10.0  # a collective waiting longer than this aborts the job
    async_save: bool = False  # write checkpoints in the background while training goes on
    max_consecutive_skips: int = 100  # stop when this many steps in a row were skipped (NaN, fp16 overflow)

    def __post_init__(self) -> None:
        if self.device is None:  # what the process group set-up makes of None (mtk.parallel.distributed)
            self.device = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_iterations: int = 0
    # the schedule's position: the updates applied (a skipped step is not one) and their samples, as
    # Megatron steps its opt_param_scheduler only after a successful update
    schedule_steps: int = 0
    schedule_samples: int = 0
    consumed_valid_samples: int = 0  # where the next validation reads the valid split (Megatron's)
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
        if str(options.device).startswith("cpu"):
            keep_host_heap()  # the step's large buffers reused, not faulted in again each step
        self.family = family_spec(config.model.family)
        self.steps = StepRunner(model, self.family, config.model)
        self.train_data, self.valid_data, self.test_data = datasets
        self.optimizers = [build_optimizer(part, config.train) for part in model.parts]
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.train.precision)
        self.scaler = LossScaler(config.train)
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
            "schedule_steps": self.state.schedule_steps,
            "schedule_samples": self.state.schedule_samples,
            "consumed_valid_samples": self.state.consumed_valid_samples,
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
        # checkpoints of earlier mtk: the schedule followed the iteration, validation read from the start
        self.state.schedule_steps = saved.get("schedule_steps", saved["iteration"])
        self.state.schedule_samples = saved.get("schedule_samples", saved["consumed_samples"])
        self.state.consumed_valid_samples = saved.get("consumed_valid_samples", 0)
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

    def scheduled_lr(self) -> float:
        """The rate of the next update: the schedule after the samples of the updates applied so far
        (``schedule_samples``; a skipped step is not an update)."""
        return learning_rate(self.config.train, self.state.schedule_samples)

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]], micro_batches: int) -> dict[str, float]:
        """Forward and backward of one global batch, then the update unless the loss or a gradient is
        not finite (``skipped``: with loss scaling an fp16 overflow, else an error or ``--skip-nan``).

        The loss and the gradient norm are reduced over every rank (an inf or NaN in any rank's
        gradients makes the norm non-finite everywhere): every rank takes the same branch, so all skip
        the same steps and their loss scalers stay equal.
        """
        train = self.config.train
        self.model.train()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.phase = (
            f"iteration {self.state.iteration + 1}: forward/backward "
            "(parameter all-gather, gradient reduce-scatter, tensor/pipeline/context exchanges)"
        )
        scale = self.scaler.scale
        local = self.steps.run(
            [next(batches) for _ in range(micro_batches)], self._autocast, self.scaler.scale_loss
        )
        lr = self.scheduled_lr()
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        self.scaler.unscale_(parameter for part in self.model.parts for parameter in part.parameters())
        self.phase = f"iteration {self.state.iteration + 1}: gradient-norm and loss all-reduce"
        grad_value = self.steps.clip_grad_norm(train.clip_grad or math.inf)
        loss_value = self.steps.reduce_loss(local)
        terms = self.steps.reduce_terms()
        skipped = not (math.isfinite(loss_value) and math.isfinite(grad_value))
        if skipped and not self.scaler.enabled and not self.options.skip_nan:
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            where = ""
            if self.amax is not None:  # an FP8 overflow: which linear saw the largest values
                largest = self.amax.take()
                where = f" (the largest FP8 amax: {largest['fp8_amax']:.3g} at {largest['fp8_amax_at']})"
            raise TrainingError(
                f"iteration {self.state.iteration + 1}: {what} is {loss_value if what == 'loss' else grad_value}"
                f"{where}; lower the learning rate, check the data, or pass --skip-nan to skip such steps"
            )
        for optimizer in self.optimizers:
            if skipped:
                optimizer.zero_grad(set_to_none=True)
            else:
                optimizer.step()
        self.scaler.update(found_inf=skipped)
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
        """The loss over ``eval_iters`` global batches of ``dataset`` (None without data or ``eval_iters``).

        The valid split is read on from ``consumed_valid_samples``, as Megatron's validation iterator
        walks forward, so each evaluation reads other samples (the split read as if repeated end to end);
        the test split from its start.
        """
        train = self.config.train
        if dataset is None or len(dataset) == 0 or train.eval_iters == 0:
            return None
        samples = train.eval_iters * train.global_batch_size
        start = self.state.consumed_valid_samples if split == "valid" else 0
        self.model.train(False)
        self.phase = f"{split} evaluation (parameter all-gather, loss all-reduce)"
        options = self.options
        per_step = micro_batches_per_step(train.global_batch_size, train.micro_batch_size, options.dp_size)
        loader = iter(
            _wrapping_loader(
                dataset, start, samples, train.micro_batch_size, options.dp_rank, options.dp_size
            )
        )
        losses, terms = [], []
        for _ in range(train.eval_iters):
            losses.append(self.steps.run([next(loader) for _ in range(per_step)], self._autocast))
            terms.append(self.steps.reduce_terms())
        if split == "valid":
            self.state.consumed_valid_samples += samples
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
                batch_size = global_batch_size(self.config, state.consumed_samples)
                micro_batches = micro_batches_per_step(batch_size, train.micro_batch_size, options.dp_size)
                step = self.train_step(batches, micro_batches)
                state.iteration += 1
                state.consumed_samples += batch_size
                state.consumed_tokens += batch_size * seq_length
                state.skipped_iterations += int(step["skipped"])
                if not step["skipped"]:  # Megatron steps its lr schedule only after a successful update
                    state.schedule_steps += 1
                    state.schedule_samples += batch_size
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
            scaled = (
                f" (the fp16 loss scale came down to {self.scaler.scale:g}; a run this short may need a "
                "lower --initial-loss-scale)"
                if self.scaler.dynamic
                else ""
            )
            raise TrainingError(
                f"iterations {first_iteration + 1} to {state.iteration}: every step of this run was skipped "
                f"for a non-finite loss or gradient{scaled}, so the model did not change. Lower the learning "
                "rate, check the data, or train in bf16"
            )
        return state

    def _count_skips(self, skipped: bool, loss_scale: float) -> None:
        """Stop a run whose last ``max_consecutive_skips`` steps were all skipped: it learns nothing."""
        self._consecutive_skips = self._consecutive_skips + 1 if skipped else 0
        limit = self.options.max_consecutive_skips
        if self._consecutive_skips >= limit:
            last = self.state.iteration
            scale = f" (fp16 loss scale down to {loss_scale:g})" if self.scaler.enabled else ""
            raise TrainingError(
                f"iterations {last - limit + 1} to {last}: all {limit} steps were skipped for a non-finite loss "
                f"or gradient{scale}; stopping. Lower the learning rate, check the data, or train in bf16"
            )
