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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mtk.checkpoint import latest_iteration, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mtk.config import RunConfig
from mtk.data.loader import build_loader
from mtk.parallel.distributed import any_rank, barrier, gather_objects, mean_across_ranks
from mtk.train.loss import masked_cross_entropy
from mtk.train.metrics import MetricsLogger, model_flops_per_token
from mtk.train.optim import build_optimizer
from mtk.train.schedule import global_batch_size, learning_rate


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
    on_log: Callable[[dict[str, Any]], None] | None = None


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_iterations: int = 0
    losses: list[float] = field(default_factory=list)  # per iteration, of this process's run


def total_iterations(config: RunConfig) -> int:
    train = config.train
    if train.train_iters is not None:
        return train.train_iters
    if train.train_samples is not None and not train.batch_size_ramp:
        return train.train_samples // train.global_batch_size
    raise TrainingError("give train_iters (or train_samples without a batch-size ramp)")


def split_sample_counts(config: RunConfig, data_parallel_size: int = 1) -> tuple[int, int, int]:
    """Samples each split must provide for the whole run, as Megatron computes them."""
    train = config.train
    iters = total_iterations(config)
    largest_batch = max([train.global_batch_size, *(int(b) for _, b in train.batch_size_ramp or [])])
    train_samples = train.train_samples or iters * largest_batch
    evaluations = iters // train.eval_interval + 1 if train.eval_interval else 0
    return (
        train_samples,
        evaluations * train.eval_iters * train.global_batch_size,
        train.eval_iters * train.global_batch_size,
    )


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
    def __init__(self, config: RunConfig, model: nn.Module, datasets: tuple, options: TrainOptions) -> None:
        self.config, self.model, self.options = config, model.to(options.device), options
        self.train_data, self.valid_data, self.test_data = datasets
        self.optimizer = build_optimizer(self.model, config.train)
        precision = config.train.precision
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(
            options.device.split(":")[0],
            init_scale=2.0**16,
            growth_interval=1000,
            enabled=precision == "fp16",
        )
        self.state = TrainState()
        self.phase = "start-up"  # what the ranks are doing together: named when a collective times out
        self.iters = total_iterations(config)
        self.flops_per_token = model_flops_per_token(config.model)

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The whole training state, gathered to rank 0 (other ranks get empty model/optimizer dicts).

        Full (unsharded) weights and optimizer state keyed by parameter name, so a checkpoint loads
        into any data-parallel layout; every rank's RNG state, so dropout resumes exactly.
        """
        self.phase = "checkpoint gather (all-gather of the parameter and optimizer shards)"
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {
            "model": get_model_state_dict(self.model, options=full),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=full),
            "scaler": self.scaler.state_dict(),
            "iteration": self.state.iteration,
            "consumed_samples": self.state.consumed_samples,
            "consumed_tokens": self.state.consumed_tokens,
            "skipped_iterations": self.state.skipped_iterations,
            "rng": gather_objects(rng_state()),
            "config": self.config.to_dict(),
        }

    def resume(self) -> bool:
        """Load the latest checkpoint of ``load`` (else of ``save``) if there is one."""
        for root in (self.options.load, self.options.save):
            if root is not None and latest_iteration(root) is not None:
                state = load_checkpoint(root)
                full = StateDictOptions(full_state_dict=True)
                set_model_state_dict(self.model, state["model"], options=full)
                set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=full)
                self.scaler.load_state_dict(state["scaler"])
                self.state.iteration = state["iteration"]
                self.state.consumed_samples = state["consumed_samples"]
                self.state.consumed_tokens = state["consumed_tokens"]
                self.state.skipped_iterations = state["skipped_iterations"]
                rngs = state["rng"]
                # the same layout continues each rank's stream; another layout restarts from rank 0's
                set_rng_state(rngs[self.options.dp_rank] if len(rngs) == self.options.dp_size else rngs[0])
                return True
        return False

    def save(self) -> None:
        state = self.state_dict()  # collective: every rank takes part in gathering the shards
        if self.options.dp_rank == 0:
            save_checkpoint(self.options.save, self.state.iteration, state, self.options.keep_last)
        barrier()

    # ---- one step ---------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.options.device.split(":")[0], dtype=self.autocast_dtype)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.options.device, non_blocking=True) for k, v in batch.items()}
        with self._autocast():
            logits = self.model(batch["tokens"], batch["position_ids"])
        return masked_cross_entropy(logits, batch["labels"], batch["loss_mask"])

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]], micro_batches: int) -> dict[str, float]:
        train = self.config.train
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.options.device)
        self.phase = f"iteration {self.state.iteration + 1}: forward/backward (parameter all-gather, gradient reduce-scatter)"
        for _ in range(micro_batches):
            loss = self._loss(next(batches)) / micro_batches
            self.scaler.scale(loss).backward()
            total += loss.detach()
        lr = learning_rate(train, self.state.iteration, self.iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        self.phase = f"iteration {self.state.iteration + 1}: gradient-norm and loss all-reduce"
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.clip_grad or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor when parameters are sharded
            grad_norm = grad_norm.full_tensor()
        # every rank sees the same values, so all take the same branch below
        loss_value, grad_value = mean_across_ranks(total).item(), grad_norm.item()
        scale = self.scaler.get_scale()
        finite = math.isfinite(loss_value) and math.isfinite(grad_value)
        if not finite and not self.scaler.is_enabled():
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            if not self.options.skip_nan:
                raise TrainingError(
                    f"iteration {self.state.iteration + 1}: {what} is {loss_value if what == 'loss' else grad_value}; "
                    "lower the learning rate, check the data, or pass --skip-nan to skip such steps"
                )
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.scaler.step(self.optimizer)  # with fp16, skipped by the scaler on overflow
        self.scaler.update()
        skipped = not finite
        return {
            "loss": loss_value,
            "grad_norm": grad_value,
            "lr": lr,
            "loss_scale": scale,
            "skipped": skipped,
        }

    @torch.no_grad()
    def evaluate(self, dataset: Any, split: str) -> dict[str, float] | None:
        if dataset is None or self.config.train.eval_iters == 0:
            return None
        self.model.eval()
        self.phase = f"{split} evaluation (parameter all-gather, loss all-reduce)"
        train = self.config.train
        options = self.options
        loader = build_loader(
            dataset, train.micro_batch_size, 0, options.dp_rank, options.dp_size, num_workers=0
        )
        wanted = train.eval_iters * train.global_batch_size // (train.micro_batch_size * options.dp_size)
        losses = [self._loss(batch) for _, batch in zip(range(wanted), loader, strict=False)]
        loss = mean_across_ranks(torch.stack(losses).mean()).item()
        return {
            "split": split,
            "iteration": self.state.iteration,
            "loss": loss,
            "ppl": math.exp(min(loss, 50.0)),
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
        interval_start, interval_tokens = time.perf_counter(), 0
        interval_losses: list[float] = []
        with _Preemption() as preemption:
            while state.iteration < self.iters:
                batch_size = global_batch_size(train, state.consumed_tokens)
                micro_batches = batch_size // (train.micro_batch_size * options.dp_size)
                step = self.train_step(batches, micro_batches)
                state.iteration += 1
                state.consumed_samples += batch_size
                state.consumed_tokens += batch_size * seq_length
                state.skipped_iterations += int(step["skipped"])
                state.losses.append(step["loss"])
                interval_losses.append(step["loss"])
                interval_tokens += batch_size * seq_length
                if state.iteration % train.log_interval == 0 or state.iteration == self.iters:
                    seconds = time.perf_counter() - interval_start
                    finite = [x for x in interval_losses if math.isfinite(x)]
                    record = {
                        "iteration": state.iteration,
                        "consumed_samples": state.consumed_samples,
                        "consumed_tokens": state.consumed_tokens,
                        "loss": sum(finite) / len(finite) if finite else float("nan"),
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
                if (
                    train.eval_interval
                    and state.iteration % train.eval_interval == 0
                    and state.iteration < self.iters
                ):
                    logger.log_eval(self.evaluate(self.valid_data, "valid"))
                self.phase = f"iteration {state.iteration}: preemption-flag all-reduce"
                stop = any_rank(preemption.requested) or (
                    options.stop_after is not None and state.iteration >= options.stop_after
                )
                if (train.save_interval and state.iteration % train.save_interval == 0) or stop:
                    self.save()
                if stop:
                    logger.message(
                        f"stopping at iteration {state.iteration} (checkpoint saved); run again to resume"
                    )
                    return state
            logger.log_eval(self.evaluate(self.valid_data, "valid"))
            logger.log_eval(self.evaluate(self.test_data, "test"))
            self.save()
        return state
