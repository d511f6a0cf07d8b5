"""``mtk bench``: steady-state training throughput of a preset on mock data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import console, fail
from .options import BF16, FP16, Device, Overrides, Preset, build_config, with_config_options

SUMMARY = "Measure steady-state training speed of a preset: step time, tokens/s, TFLOP/s, MFU, memory."


@with_config_options("micro_batch_size", "global_batch_size", "seq_length", "recompute_granularity")
def bench(
    preset: Preset,
    config_values: dict[str, Any],
    mock_data: Annotated[
        bool, typer.Option("--mock-data/--no-mock-data", help="Benchmark on mock data (the only mode).")
    ] = True,
    iters: Annotated[int, typer.Option("--iters", min=1, help="Timed training steps.")] = 10,
    warmup: Annotated[
        int, typer.Option("--warmup", min=0, help="Untimed steps first (allocator, kernels, caches).")
    ] = 3,
    overrides: Overrides = [],  # noqa: B006 - typer copies it
    bf16: BF16 = False,
    fp16: FP16 = False,
    device: Device = None,
    peak_tflops: Annotated[
        float | None, typer.Option("--peak-tflops", help="Device peak for MFU when not an H100/H200/A100.")
    ] = None,
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

    from mtk.config import ConfigError, check_run
    from mtk.models import family_spec
    from mtk.train.bench import benchmark

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
        try:
            json_out.write_text(json.dumps(rows, indent=2) + "\n")
        except OSError as err:
            fail(f"--json {json_out}: {err.strerror or err}")
        console.print(f"wrote {json_out}")
