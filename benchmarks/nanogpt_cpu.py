"""mtk against nanoGPT's ``model.py`` on CPU, the same model trained the same way, eager and compiled.

    python benchmarks/nanogpt_cpu.py --nanogpt DIR [--rounds 3 --iters 30 --warmup 5] [--nanogpt-foreach]

DIR is the folder holding nanoGPT's ``model.py`` (https://github.com/karpathy/nanoGPT, not vendored
here: ``git clone https://github.com/karpathy/nanoGPT DIR``); it is imported from there.

The model: gpt-tiny's shape (layers, hidden, heads, sequence length, the preset's vocabulary of 4,096,
a multiple of ``make_vocab_size_divisible_by`` 128 so mtk pads nothing and nanoGPT's ``vocab_size``
is the same), learned positions, LayerNorm, exact-GELU MLP 4x, biases, tied embeddings, dropout 0,
fp32. The batch: the preset's global batch as one micro-batch (no accumulation). The optimizer: AdamW
with the preset's lr, betas, eps and weight decay (not on biases and norms, both), warm-up and cosine
schedule, gradient clipping at 1.0.

mtk: ``mtk bench --preset gpt-tiny`` (``--no-compile`` / ``--compile``: torch.compile per
transformer block), which steps the model ``mtk train`` builds, fed by its data loader over mock
data. nanoGPT: the step of its ``train.py`` (forward with targets, backward, ``clip_grad_norm_``,
``optimizer.step()``, ``zero_grad(set_to_none=True)``, the lr set each step, the next batch drawn
after the forward, ``loss.item()`` every 10 steps) on random tokens, with the optimizer of its
``configure_optimizers`` (on CPU: PyTorch's default, the per-tensor loop; ``--nanogpt-foreach``
gives it ``foreach=True``, mtk's implementation), eager and with ``torch.compile(model)`` (the whole
model, as ``train.py`` compiles it). Rounds alternate (mtk eager, nanoGPT eager, mtk compiled,
nanoGPT compiled), each run a fresh process; medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PRESET = "gpt-tiny"
ROOT = Path(__file__).resolve().parent.parent
LOG_INTERVAL = 10  # nanoGPT's train.py default: loss.item() on these steps only


def run_config(batch: int | None):
    """gpt-tiny's config with its global batch (or ``batch``) as the micro-batch."""
    sys.path.insert(0, str(ROOT))
    from mtk.config import apply_overrides
    from mtk.presets import load_preset

    sections = load_preset(PRESET).sections
    global_batch = batch or sections["train"]["global_batch_size"]
    return apply_overrides(sections, {"micro_batch_size": global_batch, "global_batch_size": global_batch})


def mtk_run(compiled: bool, iters: int, warmup: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "bench.json"
        command = [sys.executable, "-m", "stages.main", "bench", "--preset", PRESET,
                   "--compile" if compiled else "--no-compile", "--iters", str(iters), "--warmup", str(warmup),
                   "--device", "cpu", "--micro-batch-size", str(batch), "--global-batch-size", str(batch),
                   "--json", str(out)]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
        result = json.loads(out.read_text())
    return {
        "step_seconds": result["step_seconds"],
        "tokens_per_s": result["tokens_per_s"],
        "note": result["built"],
    }


def nanogpt_run(nanogpt: Path, compiled: bool, iters: int, warmup: int, batch: int, foreach: bool) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "nanogpt.json"
        command = [sys.executable, __file__, "--child", "--nanogpt", str(nanogpt), "--iters", str(iters),
                   "--warmup", str(warmup), "--batch", str(batch), "--json", str(out)]  # fmt: skip
        command += ["--compiled"] if compiled else []
        command += ["--nanogpt-foreach"] if foreach else []
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
        return json.loads(out.read_text())


def nanogpt_child(args: argparse.Namespace) -> None:
    """One nanoGPT measurement in this process: its train.py step, timed after ``args.warmup`` steps."""
    import math
    import time

    import numpy as np
    import torch

    config = run_config(args.batch)
    model_config, train = config.model, config.train
    sys.path.insert(0, str(args.nanogpt.resolve()))
    from model import GPT, GPTConfig  # nanoGPT's model.py

    vocab = model_config.padded_vocab_size()
    if vocab != model_config.vocab_size:
        raise SystemExit(
            f"mtk pads the vocabulary {model_config.vocab_size} to {vocab}: choose one that needs none"
        )
    batch, length = train.global_batch_size, model_config.seq_length
    torch.manual_seed(train.seed)
    gpt_config = GPTConfig(block_size=length, vocab_size=vocab, n_layer=model_config.num_layers,
                           n_head=model_config.num_attention_heads, n_embd=model_config.hidden_size,
                           dropout=0.0, bias=True)  # fmt: skip
    model = GPT(gpt_config)
    from mtk.models import family_spec

    expected = family_spec("gpt").num_parameters(model_config)
    if model.get_num_params(non_embedding=False) != expected:
        raise SystemExit(f"nanoGPT has {model.get_num_params(False):,} parameters, mtk's model {expected:,}")
    if model_config.ffn_hidden_size != 4 * model_config.hidden_size or model_config.openai_gelu:
        raise SystemExit("the mtk model is not nanoGPT's: the MLP is not 4x with exact GELU")
    optimizer = model.configure_optimizers(
        train.weight_decay, train.lr, (train.adam_beta1, train.adam_beta2), "cpu"
    )
    for group in optimizer.param_groups:
        group["eps"] = train.adam_eps  # nanoGPT's default 1e-8, mtk's preset value
        if args.nanogpt_foreach:
            group["foreach"] = True
    if args.compiled:
        model = torch.compile(model)

    steps = args.warmup + args.iters
    warmup_iters, lr_decay_iters = train.lr_warmup_iters, steps

    def get_lr(it: int) -> float:  # nanoGPT's train.py
        if it < warmup_iters:
            return train.lr * (it + 1) / (warmup_iters + 1)
        if it > lr_decay_iters:
            return train.min_lr
        decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
        return train.min_lr + coeff * (train.lr - train.min_lr)

    data = np.random.default_rng(train.seed).integers(0, vocab, size=1 << 20, dtype=np.uint16)

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:  # nanoGPT's train.py, from memory
        ix = torch.randint(len(data) - length, (batch,))
        x = torch.stack([torch.from_numpy((data[i : i + length]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1 : i + 1 + length]).astype(np.int64)) for i in ix])
        return x, y

    model.train()
    x, y = get_batch()
    start = 0.0
    for it in range(steps):
        if it == args.warmup:
            start = time.perf_counter()
        lr = get_lr(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        _, loss = model(x, y)
        x, y = get_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if it % LOG_INTERVAL == 0:
            loss.item()
    seconds = (time.perf_counter() - start) / args.iters
    what = "torch.compile(model)" if args.compiled else "eager"
    foreach = "foreach" if args.nanogpt_foreach else "per-tensor"
    result = {
        "step_seconds": seconds,
        "tokens_per_s": batch * length / seconds,
        "note": f"{what}, {foreach} AdamW",
    }
    args.json.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nanogpt", type=Path, required=True, help="the folder holding nanoGPT's model.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's)")
    parser.add_argument(
        "--nanogpt-foreach", action="store_true", help="nanoGPT's AdamW with foreach=True (as mtk's)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.nanogpt / "model.py").is_file():
        parser.error(f"no model.py in {args.nanogpt}: git clone https://github.com/karpathy/nanoGPT there")
    if args.child:
        nanogpt_child(args)
        return
    config = run_config(args.batch)
    batch, length = config.train.global_batch_size, config.model.seq_length
    print(f"{PRESET}: {config.model.num_layers} layers, hidden {config.model.hidden_size}, "
          f"{config.model.num_attention_heads} heads, vocab {config.model.padded_vocab_size()} (no padding), "
          f"batch {batch} x {length} tokens in one micro-batch, fp32, {args.iters} timed steps after "
          f"{args.warmup}", flush=True)  # fmt: skip
    runs = {"mtk": lambda c: mtk_run(c, args.iters, args.warmup, batch),
            "nanoGPT": lambda c: nanogpt_run(args.nanogpt, c, args.iters, args.warmup, batch,
                                             args.nanogpt_foreach)}  # fmt: skip
    rates: dict[tuple[str, bool], list[float]] = {(n, c): [] for n in runs for c in (False, True)}
    for round_ in range(1, args.rounds + 1):
        for compiled in (False, True):
            for name, run in runs.items():
                result = run(compiled)
                rates[name, compiled].append(result["tokens_per_s"])
                print(f"round {round_} {name:8} {'compiled' if compiled else 'eager':8} "
                      f"{result['step_seconds'] * 1e3:7.2f} ms/step {result['tokens_per_s']:9,.0f} tokens/s  "
                      f"{result['note']}", flush=True)  # fmt: skip
    print(f"\nmedians of {args.rounds} alternating rounds (tokens/s):\n")
    print("| | mtk | nanoGPT | mtk / nanoGPT |\n|---|---|---|---|")
    for compiled in (False, True):
        ours, theirs = (statistics.median(rates[n, compiled]) for n in runs)
        print(
            f"| {'compiled' if compiled else 'eager'} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f}x |"
        )


if __name__ == "__main__":
    main()
