"""``mtk bench``: steady-state training throughput of a preset on mock data."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from stages.common import console, fail

SUMMARY = "Measure steady-state training speed of a preset: step time, tokens/s, TFLOP/s, MFU, memory."


def bench(
    preset: str = typer.Option(
        ..., "--preset", "-p", help="Preset name (`mtk presets list`).", show_default=False
    ),
    mock_data: bool = typer.Option(
        True, "--mock-data/--no-mock-data", help="Benchmark on mock data (the only mode)."
    ),
    iters: int = typer.Option(10, "--iters", min=1, help="Timed training steps."),
    warmup: int = typer.Option(
        3, "--warmup", min=0, help="Untimed steps first (allocator, kernels, caches)."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override any config key, e.g. --set num_layers=4. Repeatable."
    ),
    micro_batch_size: int | None = typer.Option(
        None, "--micro-batch-size", help="Samples per forward/backward."
    ),
    global_batch_size: int | None = typer.Option(None, "--global-batch-size", help="Samples per step."),
    seq_length: int | None = typer.Option(None, "--seq-length", help="Tokens per sample."),
    bf16: bool = typer.Option(False, "--bf16", help="bf16 mixed precision."),
    fp16: bool = typer.Option(False, "--fp16", help="fp16 mixed precision."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)."),
    peak_tflops: float | None = typer.Option(
        None, "--peak-tflops", help="Device peak for MFU when not an H100/H200/A100."
    ),
    recompute_granularity: str | None = typer.Option(
        None, "--recompute-granularity", help="Recompute activations: selective or full (default: none)."
    ),
    fsdp: bool = typer.Option(
        False,
        "--fsdp",
        help="Wrap the model with FSDP2 as one data-parallel rank (measures the wrapper's cost).",
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the result as JSON to this file."),
) -> None:
    """Time training steps after warm-up. TFLOP/s counts model FLOPs: 6 x parameters + 12 x layers x hidden x seq per token."""
    import torch
    from rich.table import Table

    from mtk.config import ConfigError, apply_overrides, parse_override, validate_run
    from mtk.presets import load_preset
    from mtk.train.bench import benchmark

    if not mock_data:
        fail("mtk bench measures on mock data; use `mtk train --data ...` and its metrics for real data")
    try:
        values = dict(parse_override(item) for item in overrides)
        for key, value in (
            ("micro_batch_size", micro_batch_size),
            ("global_batch_size", global_batch_size),
            ("seq_length", seq_length),
        ):
            if value is not None:
                values[key] = value
        if bf16 or fp16:
            values["precision"] = "bf16" if bf16 else "fp16"
        if recompute_granularity is not None:
            values["recompute_granularity"] = recompute_granularity
        if fsdp:
            values["data_parallel_sharding_strategy"] = "optim_grads_params"
        values.setdefault("train_iters", iters + warmup)
        config = apply_overrides(load_preset(preset).sections, values)
        validate_run(config)
    except ConfigError as err:
        fail(str(err))
    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = benchmark(config, preset, iters, warmup, chosen, peak_tflops)
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
    if json_out is not None:
        json_out.write_text(json.dumps(rows, indent=2) + "\n")
        console.print(f"wrote {json_out}")
