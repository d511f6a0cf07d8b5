"""``mtk plan``: per-GPU memory of a layout, and a layout that fits the GPUs you have."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .common import console, fail
from .options import build_config, with_config_options


@with_config_options(
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "context_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "micro_batch_size",
    "recompute_granularity",
    "data_parallel_sharding_strategy",
)
def plan(
    config_values: dict[str, Any],
    preset: Annotated[
        str | None,
        typer.Option("--preset", "-p", help="Preset name (`mtk presets list`); leave out with --all."),
    ] = None,
    all_presets: Annotated[
        bool, typer.Option("--all", help="One line per seed recipe (tiny presets left out).")
    ] = False,
    gpus: Annotated[
        int | None,
        typer.Option(
            "--gpus",
            min=1,
            help="GPUs in the job (default: the recipe's published count, else TP x PP x CP).",
        ),
    ] = None,
    gpu_mem: Annotated[
        float, typer.Option("--gpu-mem", min=1.0, help="Memory of one GPU in GiB (H100: 80).")
    ] = 80.0,
    gpus_per_node: Annotated[
        int, typer.Option("--gpus-per-node", min=1, help="Tensor parallelism stays within a node.")
    ] = 8,
) -> None:
    """Weights, gradients, optimizer state, activations and logits on the busiest GPU, then the cheapest
    layout that fits in 90% of --gpu-mem. Layout options left out keep the preset's.
    Example: mtk plan --preset gpt3-175b --gpus 1024"""
    from rich.table import Table

    from mtk.plan import GIB, HEADROOM, estimate_memory, layout_problems, preset_layout, suggest_layout
    from mtk.presets import load_preset, preset_names

    if all_presets == (preset is not None):
        fail("give --preset NAME or --all")
    names = [n for n in preset_names() if not load_preset(n).tiny] if all_presets else [preset]
    rows = []
    for name in names:
        config = build_config(name, [], config_values)
        layout = preset_layout(config)
        world = gpus or load_preset(name).published.get("gpus") or layout.tp * layout.pp * layout.cp
        problems = layout_problems(config, layout, world)
        if problems:
            fail(
                f"{name}: {layout.describe(world)} is not a valid layout on {world} GPUs: "
                + "; ".join(problems)
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
        fits = estimate.total <= HEADROOM * gpu_mem * GIB
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
    console.print(
        "ddp: gradients all-reduced (no_shard); zero2: optimizer state and gradients sharded "
        "(optim_grads, --use-distributed-optimizer); zero3: parameters too (optim_grads_params, FSDP)",
        highlight=False,
    )
    console.print(
        "activations are counted as eager PyTorch keeps them; torch.compile (per transformer block, on "
        "by default on GPUs, --no-compile turns it off) fuses element-wise kernels and keeps fewer",
        highlight=False,
    )
