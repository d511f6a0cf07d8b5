"""What recomputation and the FSDP2 wrapper cost on one device: `mtk bench` with each variant.

    python benchmarks/wrappers.py --preset gpt3-857m --bf16 [--iters 20 --warmup 5]   # on one GPU
    python benchmarks/wrappers.py --preset gpt-tiny --seq-length 128                  # CPU smoke run

Prints tokens/s, TFLOP/s, MFU and peak memory for: plain, selective and full recomputation, and the
model wrapped by FSDP2 as one data-parallel rank (sharding over one rank: only the wrapper's cost).
"""

from __future__ import annotations

import argparse

import torch

from mtk.config import apply_overrides
from mtk.presets import load_preset
from mtk.train.bench import benchmark

VARIANTS = {
    "plain": {},
    "recompute selective": {"recompute_granularity": "selective"},
    "recompute full": {"recompute_granularity": "full"},
    "FSDP2 wrapper": {"data_parallel_sharding_strategy": "optim_grads_params"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt3-857m")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seq-length", type=int)
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = {"train_iters": args.iters + args.warmup, "mock_data": True}  # bench measures on mock data
    if args.bf16:
        base["precision"] = "bf16"
    if args.seq_length:
        base["seq_length"] = args.seq_length
    if args.micro_batch_size:
        base["micro_batch_size"] = args.micro_batch_size
    print(f"{'variant':<22} {'tokens/s':>12} {'TFLOP/s':>9} {'MFU':>7} {'peak GiB':>9}")
    for name, values in VARIANTS.items():
        config = apply_overrides(load_preset(args.preset).sections, {**base, **values})
        r = benchmark(config, args.preset, args.iters, args.warmup, device, None)
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "-"
        print(f"{name:<22} {r.tokens_per_s:>12,.0f} {r.tflops:>9.1f} {mfu:>7} {r.peak_memory_gib:>9.2f}")


if __name__ == "__main__":
    main()
