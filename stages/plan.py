"""``mtk plan``: per-GPU memory of a layout, and a layout that fits the GPUs you have."""

from __future__ import annotations

import typer

from stages.common import console, fail

SUMMARY = "Estimate per-GPU memory of a preset's parallel layout and suggest one that fits your GPUs."


def plan(
    preset: str | None = typer.Option(
        None, "--preset", "-p", help="Preset name (`mtk presets list`); leave out with --all."
    ),
    all_presets: bool = typer.Option(
        False, "--all", help="One line per seed recipe (tiny presets left out)."
    ),
    gpus: int | None = typer.Option(
        None,
        "--gpus",
        min=1,
        help="GPUs in the job (default: the recipe's published count, else TP x PP x CP).",
    ),
    gpu_mem: float = typer.Option(80.0, "--gpu-mem", min=1.0, help="Memory of one GPU in GiB (H100: 80)."),
    gpus_per_node: int = typer.Option(
        8, "--gpus-per-node", min=1, help="Tensor parallelism stays within a node."
    ),
    tp: int | None = typer.Option(None, "--tp", help="Tensor-parallel size (default: the preset's)."),
    pp: int | None = typer.Option(None, "--pp", help="Pipeline-parallel size (default: the preset's)."),
    cp: int | None = typer.Option(None, "--cp", help="Context-parallel size (default: the preset's)."),
    vp: int | None = typer.Option(
        None, "--vp", help="Virtual pipeline stages per rank (default: the preset's)."
    ),
    micro_batch_size: int | None = typer.Option(
        None, "--micro-batch-size", help="Samples per forward/backward."
    ),
    recompute_granularity: str | None = typer.Option(
        None, "--recompute-granularity", help="none, selective or full (default: the preset's)."
    ),
    strategy: str | None = typer.Option(
        None,
        "--data-parallel-sharding-strategy",
        help="no_shard, optim_grads or optim_grads_params (default: the preset's).",
    ),
) -> None:
    """Weights, gradients, optimizer state, activations and logits on the busiest GPU, then the cheapest
    layout that fits in 90% of --gpu-mem. Example: mtk plan --preset gpt3-175b --gpus 1024"""
    from dataclasses import replace

    from rich.table import Table

    from mtk.config import ConfigError
    from mtk.plan import GIB, estimate_memory, preset_layout, suggest_layout, valid
    from mtk.presets import load_preset, preset_names

    if all_presets == (preset is not None):
        fail("give --preset NAME or --all")
    names = [n for n in preset_names() if not load_preset(n).tiny] if all_presets else [preset]
    rows = []
    for name in names:
        try:
            loaded = load_preset(name)
        except ConfigError as err:
            fail(str(err))
        config = loaded.config
        if micro_batch_size is not None:
            config = replace(config, train=replace(config.train, micro_batch_size=micro_batch_size))
        layout = preset_layout(config)
        changes = {"tp": tp, "pp": pp, "cp": cp, "vp": vp, "strategy": strategy}
        layout = replace(layout, **{k: v for k, v in changes.items() if v is not None})
        if recompute_granularity is not None:
            layout = replace(
                layout, recompute=None if recompute_granularity == "none" else recompute_granularity
            )
        world = gpus or loaded.published.get("gpus") or layout.tp * layout.pp * layout.cp
        if not valid(config, layout, world):
            fail(
                f"{name}: {layout.describe(world)} is not a valid layout on {world} GPUs (see `mtk train` for why)"
            )
        estimate = estimate_memory(config, layout, world)
        suggestion = suggest_layout(config, world, gpu_mem, gpus_per_node)
        rows.append((name, world, layout, estimate, suggestion))
    if not all_presets:
        name, world, layout, estimate, suggestion = rows[0]
        table = Table(title=f"{name} on {world} GPUs: {layout.describe(world)}", title_justify="left")
        table.add_column("per GPU")
        table.add_column("GiB", justify="right")
        for part in ("weights", "gradients", "optimizer", "activations", "logits", "total"):
            table.add_row(part, f"{getattr(estimate, part) / GIB:,.1f}")
        console.print(table)
    table = Table(title=f"layouts for {gpu_mem:g} GiB GPUs", title_justify="left")
    for column in ("preset", "GPUs", "preset layout", "GiB/GPU", "fits", "suggested layout", "GiB/GPU "):
        table.add_column(column, justify="right" if "GiB" in column or column == "GPUs" else "left")
    for name, world, layout, estimate, suggestion in rows:
        fits = estimate.total <= 0.9 * gpu_mem * GIB
        suggested = (
            (suggestion[0].describe(world), f"{suggestion[1].total / GIB:,.1f}")
            if suggestion
            else ("none fits: more GPUs or memory", "-")
        )
        table.add_row(
            name,
            str(world),
            layout.describe(world),
            f"{estimate.total / GIB:,.1f}",
            "yes" if fits else "no",
            *suggested,
        )
    console.print(table)
