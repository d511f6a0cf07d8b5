"""``mtk bench``: steady-state training throughput of a preset on mock data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import console, fail
from .options import BF16, FP16, Device, Overrides, Preset, build_config, check_option, with_config_options

SUMMARY = "Measure steady-state training speed of a preset: step time, tokens/s, TFLOP/s, MFU, memory."
MAX_STEPS = 100_000  # of --iters and --warmup: a steady state shows within a few hundred steps


@with_config_options(
    "micro_batch_size", "global_batch_size", "seq_length", "recompute_granularity", "compile"
)
def bench(
    preset: Preset,
    config_values: dict[str, Any],
    mock_data: Annotated[
        bool, typer.Option("--mock-data/--no-mock-data", help="Benchmark on mock data (the only mode).")
    ] = True,
    iters: Annotated[int, typer.Option("--iters", help="Timed training steps.")] = 10,
    warmup: Annotated[
        int, typer.Option("--warmup", help="Untimed steps first (allocator, kernels, caches).")
    ] = 3,
    overrides: Overrides = [],  # noqa: B006 - typer copies it
    bf16: BF16 = False,
    fp16: FP16 = False,
    device: Device = None,
    peak_tflops: Annotated[
        float | None, typer.Option("--peak-tflops", help="Device peak for MFU when not an H100/H200/A100.")
    ] = None,
    fp8: Annotated[
        bool,
        typer.Option(
            "--compare-fp8",
            "--fp8",
            help="Step the model without FP8 and with it (the preset's format, else hybrid) and compare, "
            "beside the seed's published FP8 table. Without FP8 hardware the FP8 run is emulated: a "
            "numerics check, no speed-up claimed. (--fp8, as the design card types it, is the same switch; "
            "the FP8 format itself comes from the preset or --set fp8=e4m3.)",
        ),
    ] = False,
    fsdp: Annotated[
        bool,
        typer.Option(
            "--fsdp",
            help="Wrap the model with FSDP2 as one data-parallel rank (measures the wrapper's cost).",
        ),
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the result as JSON to this file.")
    ] = None,
) -> None:
    """Time training steps after warm-up. TFLOP/s counts model FLOPs (the family's formula, e.g. 6 x
    parameters + 12 x layers x hidden x seq per token for GPT)."""
    import torch
    from rich.table import Table

    from mtk.config import ConfigError, Range, check_run
    from mtk.models import family_spec
    from mtk.train.bench import benchmark, benchmark_fp8

    check_option("--iters", iters, Range(low=1, high=MAX_STEPS))
    check_option("--warmup", warmup, Range(low=0, high=MAX_STEPS))
    if not mock_data:
        fail("mtk bench measures on mock data; use `mtk train --data ...` and its metrics for real data")
    values = {"mock_data": True, "data_path": None, "train_iters": iters + warmup, **config_values}
    if fsdp:
        values["data_parallel_sharding_strategy"] = "optim_grads_params"
    config = build_config(preset, overrides, values, bf16, fp16)
    try:
        check_run(config, 1, family_spec(config.model.family))
    except ConfigError as err:
        fail(str(err))
    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if fp8:
            _show_fp8(benchmark_fp8(config, preset, iters, warmup, chosen, peak_tflops), preset, json_out)
            return
        result = benchmark(config, preset, iters, warmup, chosen, peak_tflops)
    except ConfigError as err:
        fail(str(err))
    table = Table(title=f"mtk bench {preset}", title_justify="left", show_header=False)
    rows = result.to_dict()
    for key, value in rows.items():
        shown = (
            f"{value:,.4g}"
            if isinstance(value, float)
            else (f"{value:,}" if isinstance(value, int) else str(value))
        )
        table.add_row(key, shown)
    console.print(table)
    console.print(f"model built as `mtk train` builds it: {result.built}", highlight=False)
    _write_json(json_out, rows)


def _write_json(path: Path | None, rows: dict) -> None:
    if path is None:
        return
    try:
        path.write_text(json.dumps(rows, indent=2) + "\n")
    except OSError as err:
        fail(f"--json {path}: {err.strerror or err}")
    console.print(f"wrote {path}")


def _show_fp8(comparison, preset: str, json_out: Path | None) -> None:
    """The two runs side by side, then the published table; emulated figures say so."""
    from rich.table import Table

    base, low = comparison.baseline, comparison.fp8
    label = "FP8 (emulated)" if comparison.emulated else "FP8"
    table = Table(title=f"mtk bench --fp8 {preset} on {base.device}", title_justify="left")
    for column in ("", base.precision, label):
        table.add_column(column, justify="right" if column else "left")

    def number(value, unit=""):
        return "-" if value is None else f"{value:,.4g}{unit}"

    table.add_row("step time (s)", number(base.step_seconds), number(low.step_seconds))
    table.add_row("tokens/s", f"{base.tokens_per_s:,.0f}", f"{low.tokens_per_s:,.0f}")
    table.add_row("TFLOP/s", number(base.tflops), number(low.tflops))
    mfu = [None if r.mfu is None else 100 * r.mfu for r in (base, low)]
    table.add_row("MFU (%, of the device's peak for it)", number(mfu[0]), number(mfu[1]))
    table.add_row("peak memory (GiB)", number(base.peak_memory_gib), number(low.peak_memory_gib))
    console.print(table)
    for run in (base, low):
        console.print(f"model built as `mtk train` builds it: {run.built}", highlight=False)
    console.print(low.fp8)
    if comparison.emulated:
        console.print(
            "no FP8 hardware here: the FP8 figures are emulated, a numerics check; no speed-up is claimed"
        )
    else:
        console.print(f"FP8 / {base.precision} speed-up: [bold]{comparison.speedup:.2f}x[/]")
    published = Table(title="published (Megatron-LM, H100, FP8)", title_justify="left")
    for column in ("preset", "GPUs", "TP", "PP", "CP", "tokens/s/GPU", "TFLOP/s/GPU"):
        published.add_column(column, justify="left" if column == "preset" else "right")
    for name, row in comparison.published.items():
        published.add_row(
            name, str(row["gpus"]), str(row["tensor_parallel"]), str(row["pipeline_parallel"]),
            str(row["context_parallel"]), f"{row['tokens_per_s_per_gpu']:,}", f"{row['tflops_per_gpu']:,}",
        )  # fmt: skip
    console.print(published)
    if comparison.ratio_to_published is not None:
        console.print(
            f"measured FP8 tokens/s on this GPU / published per GPU: {comparison.ratio_to_published:.2f}"
        )
    elif preset not in comparison.published:
        console.print(f"{preset} has no published row: compare the llama3 presets' shapes on a GPU")
    _write_json(json_out, comparison.to_dict())
