"""Steady-state training-step benchmark on mock data: step time, tokens/s, TFLOP/s, MFU, peak memory."""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mtk.config import RunConfig, micro_batches_per_step
from mtk.data.loader import build_loader
from mtk.parallel.fp8 import plan_fp8
from mtk.train.build import build_model, check_config
from mtk.train.loop import Trainer, TrainOptions
from mtk.train.metrics import device_peak_tflops, memory_gib


@dataclass
class BenchResult:
    preset: str
    device: str
    precision: str
    parameters: int
    global_batch_size: int
    micro_batch_size: int
    seq_length: int
    warmup_iters: int
    iters: int
    step_seconds: float
    tokens_per_s: float
    tflops: float
    flops_convention: str
    peak_tflops: float | None
    mfu: float | None
    peak_memory_gib: float
    recompute: str | None = None
    data_parallel_sharding: str | None = None  # wrapped as one data-parallel rank (wrapper cost)
    fp8: str | None = None  # the FP8 in effect (mtk.parallel.fp8.FP8Plan.summary), None without
    # what was applied to the plain model, built as `mtk train` builds it (mtk.train.build.BuiltModel.describe)
    built: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def _one_rank_group(config: RunConfig, device: str):
    """With a sharding strategy, a one-process group for the duration and its mesh, so that the model is
    wrapped as one rank of a data-parallel group (FSDP2 / replicate) to measure what the wrappers cost;
    None (no group) without one."""
    if config.parallel.data_parallel_sharding_strategy is None:
        yield None
        return
    import torch.distributed as dist

    from mtk.parallel.dims import ParallelDims

    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield ParallelDims(world_size=1).build_mesh(device.split(":")[0])
    finally:
        dist.destroy_process_group()


def benchmark(
    config: RunConfig, preset: str, iters: int, warmup: int, device: str, peak_tflops: float | None
) -> BenchResult:
    """Time ``iters`` training steps of ``config`` (on mock data) after ``warmup`` untimed ones
    (compilation, allocator, caches). ConfigError, before anything is allocated, when the step cannot
    fit ``device``.

    The model is the one ``mtk train`` builds on one process (``mtk.train.build.build_model``: FP8,
    recomputation, initial weights from the seed); with a data-parallel sharding strategy it is
    also wrapped as the only rank of a data-parallel group."""
    train = config.train
    family = check_config(config, 1, device)
    torch.manual_seed(train.seed)
    samples = (iters + warmup) * train.global_batch_size
    data, _, _ = family.datasets(config, (samples, 0, 0), None)
    with tempfile.TemporaryDirectory() as scratch, _one_rank_group(config, device) as mesh:
        built = build_model(config, device, 1, mesh, check=False, wrap_alone=mesh is not None)
        trainer = Trainer(
            config, built.model, (data, None, None), TrainOptions(save=Path(scratch), device=device)
        )
        batches = iter(build_loader(data, train.micro_batch_size, num_workers=0))
        micro_batches = micro_batches_per_step(train.global_batch_size, train.micro_batch_size, 1)
        for _ in range(warmup):
            trainer.train_step(batches, micro_batches)
        _sync(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(iters):
            trainer.train_step(batches, micro_batches)
        _sync(device)
        seconds = (time.perf_counter() - start) / iters
    fp8 = built.model.fp8
    tokens = train.global_batch_size * config.model.seq_length
    tflops = tokens * family.flops_per_token(config.model) / seconds / 1e12
    peak = peak_tflops or device_peak_tflops("fp8" if fp8 and not fp8.emulated else train.precision, device)
    return BenchResult(
        preset=preset,
        device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        precision=train.precision,
        parameters=family.num_parameters(config.model),
        global_batch_size=train.global_batch_size,
        micro_batch_size=train.micro_batch_size,
        seq_length=config.model.seq_length,
        warmup_iters=warmup,
        iters=iters,
        step_seconds=seconds,
        tokens_per_s=tokens / seconds,
        tflops=tflops,
        flops_convention=family.flops_convention,
        peak_tflops=peak,
        mfu=tflops / peak if peak else None,
        peak_memory_gib=memory_gib(device),
        recompute=config.parallel.recompute_granularity,
        data_parallel_sharding=config.parallel.data_parallel_sharding_strategy,
        fp8=fp8.summary() if fp8 else None,
        built=built.describe(),
    )


@dataclass
class FP8Comparison:
    """The same model stepped without and with FP8, and the seed's published FP8 rows."""

    baseline: BenchResult
    fp8: BenchResult
    emulated: bool
    speedup: float | None  # FP8 tokens/s over the baseline's; None when emulated (no claim)
    published: dict[str, dict]  # preset -> its published row (tokens/s/GPU, TFLOP/s/GPU ...)
    ratio_to_published: float | None  # measured FP8 tokens/s (one GPU) / the preset's published per GPU

    def to_dict(self) -> dict:
        return asdict(self)


def published_fp8_rows() -> dict[str, dict]:
    """The seed recipes' published FP8 throughput, by preset."""
    from mtk.presets import load_preset, preset_names

    rows = {}
    for name in preset_names():
        published = load_preset(name).published
        if "FP8" in str(published.get("device", "")):
            rows[name] = published
    return rows


def benchmark_fp8(
    config: RunConfig, preset: str, iters: int, warmup: int, device: str, peak_tflops: float | None
) -> FP8Comparison:
    """``benchmark`` of ``config`` without FP8 and with it (its format, else hybrid), in this process."""
    from dataclasses import replace

    base = replace(config, train=replace(config.train, fp8=None))
    with_fp8 = replace(config, train=replace(config.train, fp8=config.train.fp8 or "hybrid"))
    baseline = benchmark(base, preset, iters, warmup, device, peak_tflops)
    low = benchmark(with_fp8, preset, iters, warmup, device, peak_tflops)
    emulated = plan_fp8(with_fp8, device).emulated
    published = published_fp8_rows()
    row = published.get(preset)
    return FP8Comparison(
        baseline=baseline,
        fp8=low,
        emulated=emulated,
        speedup=None if emulated else low.tokens_per_s / baseline.tokens_per_s,
        published=published,
        ratio_to_published=low.tokens_per_s / row["tokens_per_s_per_gpu"] if row and not emulated else None,
    )
