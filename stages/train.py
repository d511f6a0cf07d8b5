"""``mtk train``: pretrain a preset on prepared data or mock data; resumes from its own checkpoints."""

from __future__ import annotations

import os
from enum import Enum, StrEnum
from pathlib import Path

import typer

from stages.common import console, fail

SUMMARY = "Train a preset (GPT-3, Llama 3 ...) on prepared or mock data; checkpoints resume exactly."


class Recompute(StrEnum):
    selective = "selective"
    full = "full"


class Sharding(StrEnum):
    no_shard = "no_shard"
    optim_grads = "optim_grads"
    optim_grads_params = "optim_grads_params"


class DecayStyle(StrEnum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


# first-class flags -> config keys (Megatron's names); None means "keep the preset's value"
FLAG_KEYS = {
    "micro_batch_size": "micro_batch_size",
    "global_batch_size": "global_batch_size",
    "seq_length": "seq_length",
    "train_iters": "train_iters",
    "train_samples": "train_samples",
    "lr": "lr",
    "min_lr": "min_lr",
    "lr_decay_style": "lr_decay_style",
    "lr_decay_iters": "lr_decay_iters",
    "lr_warmup_iters": "lr_warmup_iters",
    "lr_warmup_fraction": "lr_warmup_fraction",
    "lr_warmup_samples": "lr_warmup_samples",
    "weight_decay": "weight_decay",
    "clip_grad": "clip_grad",
    "log_interval": "log_interval",
    "eval_interval": "eval_interval",
    "eval_iters": "eval_iters",
    "save_interval": "save_interval",
    "split": "split",
    "seed": "seed",
    "tp": "tensor_model_parallel_size",
    "pp": "pipeline_model_parallel_size",
    "cp": "context_parallel_size",
    "vp": "virtual_pipeline_model_parallel_size",
    "recompute_granularity": "recompute_granularity",
    "data_parallel_sharding_strategy": "data_parallel_sharding_strategy",
}


def train(
    preset: str = typer.Option(
        ..., "--preset", "-p", help="Preset name (`mtk presets list`).", show_default=False
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        help='Prepared data prefix (P_text_document), or a blend "0.3 PREFIX_A 0.7 PREFIX_B". '
        "The tokenizer and vocabulary are inherited from its manifest.",
        show_default=False,
    ),
    mock_data: bool = typer.Option(
        False, "--mock-data", help="Train on random tokens (benchmarks, smoke tests)."
    ),
    save: Path = typer.Option(
        ...,
        "--save",
        help="Run directory: config, manifest, metrics, checkpoints. "
        "A directory that holds a checkpoint is resumed.",
        show_default=False,
    ),
    load: Path | None = typer.Option(
        None, "--load", help="Resume from this run directory's latest checkpoint instead."
    ),
    tensorboard_dir: Path | None = typer.Option(
        None, "--tensorboard-dir", help="Write TensorBoard scalars here."
    ),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        help="Override any config key: --set num_layers=4 "
        "(Megatron names; `mtk presets show NAME` lists them). Repeatable.",
    ),
    vocab_size: int | None = typer.Option(
        None, "--vocab-size", help="Vocabulary for --mock-data (default: the preset's)."
    ),
    micro_batch_size: int | None = typer.Option(
        None, "--micro-batch-size", help="Samples per forward/backward."
    ),
    global_batch_size: int | None = typer.Option(
        None, "--global-batch-size", help="Samples per optimizer step (accumulated)."
    ),
    seq_length: int | None = typer.Option(None, "--seq-length", help="Tokens per sample."),
    train_iters: int | None = typer.Option(None, "--train-iters", help="Optimizer steps to run."),
    train_samples: int | None = typer.Option(
        None, "--train-samples", help="Samples to train on (instead of --train-iters)."
    ),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate."),
    min_lr: float | None = typer.Option(None, "--min-lr", help="Learning rate at the end of decay."),
    lr_decay_style: DecayStyle | None = typer.Option(None, "--lr-decay-style", help="Decay after warmup."),
    lr_decay_iters: int | None = typer.Option(
        None, "--lr-decay-iters", help="Steps of decay (default: the run)."
    ),
    lr_warmup_iters: int | None = typer.Option(None, "--lr-warmup-iters", help="Linear warmup steps."),
    lr_warmup_samples: int | None = typer.Option(
        None, "--lr-warmup-samples", help="Warmup length in samples."
    ),
    lr_warmup_fraction: float | None = typer.Option(
        None, "--lr-warmup-fraction", help="Warmup as a fraction of decay steps."
    ),
    weight_decay: float | None = typer.Option(
        None, "--weight-decay", help="AdamW decoupled weight decay (not on norms/biases)."
    ),
    clip_grad: float | None = typer.Option(
        None, "--clip-grad", help="Clip the global gradient norm to this (0: off)."
    ),
    bf16: bool = typer.Option(False, "--bf16", help="bf16 mixed precision."),
    fp16: bool = typer.Option(False, "--fp16", help="fp16 mixed precision with dynamic loss scaling."),
    log_interval: int | None = typer.Option(
        None, "--log-interval", help="Steps between log lines / metrics records."
    ),
    eval_interval: int | None = typer.Option(
        None, "--eval-interval", help="Steps between validation runs (0: never)."
    ),
    eval_iters: int | None = typer.Option(None, "--eval-iters", help="Global batches per evaluation."),
    save_interval: int | None = typer.Option(
        None, "--save-interval", help="Steps between checkpoints (always at the end)."
    ),
    keep_last: int | None = typer.Option(None, "--keep-last", help="Keep only the newest K checkpoints."),
    split: str | None = typer.Option(
        None, "--split", help="Train/valid/test split of the data, e.g. 949,50,1."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed of data order and initialization."),
    skip_nan: bool = typer.Option(
        False, "--skip-nan", help="Skip steps with a non-finite loss or gradient instead of stopping."
    ),
    num_workers: int = typer.Option(2, "--num-workers", help="DataLoader worker processes."),
    device: str | None = typer.Option(
        None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."
    ),
    data_cache_path: Path | None = typer.Option(
        None,
        "--data-cache-path",
        help="Where sample indices are cached (default: .mtk-cache beside the data).",
    ),
    nproc_per_node: int | None = typer.Option(
        None,
        "--nproc-per-node",
        min=1,
        help="Start this many local processes through torchrun (--tp/--pp/--cp ranks, data parallel for the rest).",
    ),
    tp: int | None = typer.Option(None, "--tp", help="Tensor-parallel size (tensor_model_parallel_size)."),
    pp: int | None = typer.Option(
        None, "--pp", help="Pipeline-parallel size (pipeline_model_parallel_size)."
    ),
    cp: int | None = typer.Option(None, "--cp", help="Context-parallel size (context_parallel_size)."),
    vp: int | None = typer.Option(
        None, "--vp", help="Virtual pipeline stages per rank (interleaved schedule)."
    ),
    recompute_granularity: Recompute | None = typer.Option(
        None,
        "--recompute-granularity",
        help="Recompute activations in backward: 'selective' (attention) or 'full'.",
    ),
    data_parallel_sharding_strategy: Sharding | None = typer.Option(
        None,
        "--data-parallel-sharding-strategy",
        help="What data-parallel ranks shard: no_shard (DDP), optim_grads (Megatron's distributed "
        "optimizer, ZeRO-2), optim_grads_params (FSDP, ZeRO-3). Default: optim_grads when the preset "
        "sets use_distributed_optimizer, else no_shard.",
    ),
    use_distributed_optimizer: bool = typer.Option(
        False,
        "--use-distributed-optimizer",
        help="Shard optimizer state and gradients over data-parallel ranks (= optim_grads).",
    ),
    grad_reduce_in_bf16: bool = typer.Option(
        False, "--grad-reduce-in-bf16", help="Average data-parallel gradients in bf16 instead of fp32."
    ),
    async_save: bool = typer.Option(
        False, "--async-save", help="Write checkpoints in the background while training continues."
    ),
    timeout_minutes: float = typer.Option(
        10.0,
        "--timeout-minutes",
        min=0.01,
        help="Abort the job when a collective waits longer (a hung or dead rank).",
    ),
    exit_after: int | None = typer.Option(
        None, "--exit-after", help="Save and stop after this iteration (resume later)."
    ),
) -> None:
    """Pretrain a model; the effective config is printed and saved in the run directory.

    Example: mtk train --preset gpt-tiny --data data/corpus_text_document --save runs/tiny --train-iters 200
    """
    from mtk.config import ConfigError, apply_overrides, parse_override
    from mtk.manifest import ManifestError
    from mtk.presets import load_preset
    from mtk.train.run import TrainingError, TrainOptions, run_training

    if nproc_per_node is not None:
        _relaunch_with_torchrun(nproc_per_node)
    if (data is None) == (not mock_data):
        fail("give exactly one of --data PREFIX and --mock-data")
    if bf16 and fp16:
        fail("--bf16 and --fp16 exclude each other")
    flags = dict(locals())
    try:
        base = load_preset(preset)
        values = dict(parse_override(item) for item in overrides)
        for flag, key in FLAG_KEYS.items():
            if flags[flag] is not None:
                value = flags[flag]
                values[key] = value.value if isinstance(value, Enum) else value
        if bf16 or fp16:
            values["precision"] = "bf16" if bf16 else "fp16"
        if use_distributed_optimizer:
            values["use_distributed_optimizer"] = True
        if grad_reduce_in_bf16:
            values["grad_reduce_in_bf16"] = True
        config = apply_overrides(base.sections, values)
    except ConfigError as err:
        fail(str(err))
    options = TrainOptions(
        save=save,
        load=load,
        keep_last=keep_last,
        tensorboard_dir=tensorboard_dir,
        skip_nan=skip_nan,
        num_workers=num_workers,
        device=device,
        stop_after=exit_after,
        timeout_minutes=timeout_minutes,
        async_save=async_save,
    )
    try:
        state = run_training(config, options, data, vocab_size, data_cache_path, show=_printer(config))
    except (ConfigError, ManifestError, TrainingError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    if os.environ.get("RANK", "0") != "0":
        return
    console.print(
        f"done: iteration {state.iteration}, run directory {save} (loss curve: {save / 'loss.png'})"
    )


def _printer(config):
    """Print the effective config once (as a table), then pass log lines through."""
    from rich.table import Table

    shown = False

    def show(line: str) -> None:
        nonlocal shown
        if not shown:
            table = Table(title="effective config", title_justify="left", show_header=False)
            for section, values in config.to_dict().items():
                for key, value in values.items():
                    table.add_row(f"{section}.{key}", str(value))
            console.print(table)
            shown = True
        console.print(line, highlight=False)

    return show


def _relaunch_with_torchrun(nproc_per_node: int) -> None:
    """Run this same command as ``nproc_per_node`` local ranks under torchrun, and exit with its status."""
    import os
    import subprocess
    import sys

    if "LOCAL_RANK" in os.environ:
        fail("--nproc-per-node is for starting a job; under torchrun leave it out")
    args, skip = [], False
    for arg in sys.argv[1:]:  # drop --nproc-per-node N / --nproc-per-node=N
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
               "-m", "stages.main", *args]  # fmt: skip
    raise typer.Exit(subprocess.call(command))
