"""mtk's training-step overhead over a bare PyTorch loop, on CPU, same model and batch.

    python benchmarks/train_cpu.py [--steps 30] [--rounds 5] [--hidden 128 --layers 4]

The bare loop: pre-built batches, forward with the model's loss (its output layer fused with the
cross-entropy, as in mtk's step), backward, clip, AdamW step. mtk: the
Trainer's step fed by its DataLoader over mock data (schedules, loss masking, finiteness checks,
loss-scaler plumbing). Rounds alternate between the two; medians are reported. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mtk.config import apply_overrides
from mtk.data.loader import build_loader
from mtk.data.mock import MockGPTDataset
from mtk.models import family_spec
from mtk.models.gpt import GPTModel
from mtk.presets import load_preset
from mtk.train.loop import Trainer, TrainOptions


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()

    overrides = {"hidden_size": args.hidden, "num_layers": args.layers, "seq_length": args.seq, "train_iters": 10**6,
                 "micro_batch_size": args.batch, "global_batch_size": args.batch, "lr_warmup_iters": 0}  # fmt: skip
    config = apply_overrides(load_preset("gpt-tiny").sections, overrides)
    samples = (args.steps + 2) * args.batch * (args.rounds + 1)
    data = MockGPTDataset(samples, args.seq, config.model.vocab_size, 0)
    tokens_per_step = args.batch * args.seq

    torch.manual_seed(0)
    bare_model = GPTModel(config.model)
    optimizer = torch.optim.AdamW(bare_model.parameters(), lr=1e-3, weight_decay=0.1, foreach=True)
    batches = [data[i] for i in range(args.batch)]
    tokens = torch.stack([b["tokens"] for b in batches])
    labels = torch.stack([b["labels"] for b in batches])

    def bare_steps() -> float:
        start = time.perf_counter()
        for _ in range(args.steps):
            optimizer.zero_grad(set_to_none=True)
            total, count = bare_model(tokens, targets=labels)
            loss = total / count
            loss.backward()
            torch.nn.utils.clip_grad_norm_(bare_model.parameters(), 1.0)
            optimizer.step()
        return args.steps * tokens_per_step / (time.perf_counter() - start)

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(
            config,
            GPTModel(config.model),
            (data, None, None),
            TrainOptions(save=Path(scratch), num_workers=0, device="cpu"),
        )
        stream = iter(build_loader(data, args.batch, num_workers=0))

        def mtk_steps() -> float:
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step(stream, 1)
            return args.steps * tokens_per_step / (time.perf_counter() - start)

        bare_steps(), mtk_steps()  # warm-up
        bare, ours = [], []
        for _ in range(args.rounds):
            bare.append(bare_steps())
            ours.append(mtk_steps())
    bare_rate, mtk_rate = statistics.median(bare), statistics.median(ours)
    print(
        f"model: {family_spec(config.model.family).num_parameters(config.model):,} parameters, batch {args.batch} x {args.seq} tokens, {torch.get_num_threads()} threads"
    )
    print(
        f"bare PyTorch loop: {bare_rate:,.0f} tokens/s (median of {args.rounds} rounds of {args.steps} steps)"
    )
    print(f"mtk Trainer step : {mtk_rate:,.0f} tokens/s")
    print(f"overhead         : {100 * (bare_rate / mtk_rate - 1):+.1f}%")


if __name__ == "__main__":
    main()
