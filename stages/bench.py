"""``mtk bench``: steady-state training throughput of a preset on mock data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import console, fail, inherited
from .options import (
    BF16,
    FP16,
    Device,
    OptionalPreset,
    Overrides,
    build_config,
    check_option,
    with_config_options,
)

MAX_STEPS = 100_000  # of --iters and --warmup: a steady state shows within a few hundred steps
FP8_RECIPE = "llama3-8b"  # the seed's FP8 recipe: what `mtk bench --fp8` measures with nothing to go on


@with_config_options(
    "micro_batch_size", "global_batch_size", "seq_length", "recompute_granularity", "compile"
)
def bench(
    config_values: dict[str, Any],
    preset: OptionalPreset = None,
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
    parameters + 12 x layers x hidden x seq per token for GPT).

    Without --preset: the preset of the workspace's last run, else with --fp8 the seed's FP8 recipe
    (llama3-8b), with fewer layers when it does not fit this machine's memory (said, with by how much)."""
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
    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    explicit = preset is not None
    preset = preset or _default_preset(fp8)
    config = build_config(preset, overrides, values, bf16, fp16)
    if not explicit:  # a recipe for many GPUs, measured on one: its layers, fewer where they do not fit
        config = _on_one_process(config)
        layers = (
            None
            if any(o.startswith("num_layers=") for o in overrides)
            else fitting_depth(config, preset, chosen)
        )
        if layers is not None:
            config = _on_one_process(
                build_config(preset, overrides, values | {"num_layers": layers}, bf16, fp16)
            )
            preset = f"{preset} ({layers} of its layers)"  # measured on fewer layers: no published row
    try:
        check_run(config, 1, family_spec(config.model.family))
    except ConfigError as err:
        fail(str(err))
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


def _default_preset(fp8: bool) -> str:
    """The preset of the workspace's last run, else (with --fp8) the seed's FP8 recipe, said out loud."""
    from mtk import workspace

    try:
        has_run = workspace.latest("run", lambda record: bool(record.facts.get("preset"))) is not None
    except workspace.WorkspaceError as err:
        fail(str(err))
    if not has_run and fp8:
        console.print(f"preset: {FP8_RECIPE} (the seed's FP8 recipe: no run in this workspace; --preset "
                      "to choose)", highlight=False)  # fmt: skip
        return FP8_RECIPE
    found = inherited(
        "run", "--preset", "give --preset NAME (`mtk presets list`), or train one with `mtk train` first",
        fits=lambda record: bool(record.facts.get("preset")), value=lambda r, path: f"{r.facts['preset']}, of {path}",
    )  # fmt: skip
    return found.facts["preset"]


def _on_one_process(config):  # noqa: ANN001, ANN202 - a RunConfig
    from dataclasses import replace

    from mtk.train.build import one_process

    return replace(config, parallel=one_process(config.parallel))


def fitting_depth(config, name: str, device: str, available: int | None = None) -> int | None:  # noqa: ANN001
    """None when training ``config`` (of preset ``name``) fits ``device``'s memory (``available``
    bytes; default: what it has free), by mtk's own estimate (``mtk plan``), else the most layers that
    do (saying so and by how much); the command ends when not even one layer fits."""
    from dataclasses import replace

    import torch

    from mtk.models.spec import GIB, available_memory
    from mtk.plan import HEADROOM, estimate_memory, preset_layout

    where = torch.device(device)
    available = available if available is not None else available_memory(where)
    if available is None:
        return None

    def needed(layers: int) -> float:
        shrunk = replace(config, model=replace(config.model, num_layers=layers))
        return estimate_memory(shrunk, preset_layout(config), 1).total

    total = config.model.num_layers
    if needed(total) <= HEADROOM * available:
        return None
    layers = max((n for n in range(1, total) if needed(n) <= HEADROOM * available), default=0)
    memory = f"this machine's {available / GIB:,.0f} GiB ({where.type}; about {needed(total) / GIB:,.0f} GiB needed)"
    if not layers:
        fail(f"{name} does not fit {memory}, not even one layer of it: give a smaller --preset, or a "
             "shorter --seq-length")  # fmt: skip
    console.print(f"{name} does not fit {memory}: benchmarking {layers} of its {total} layers, "
                  f"{total / layers:,.1f}x fewer (per-layer figures comparable with the published table)",
                  highlight=False)  # fmt: skip
    return layers


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
