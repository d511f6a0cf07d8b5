"""RETRO generation (`mtk generate --retro-project`) on its cache (decoder KV cache, each chunk's
neighbours encoded once) against the whole sequence at every step (the decoding before the cache),
eager on CPU, greedy, random weights, a fake retriever (deterministic neighbour tokens from each
chunk's tokens; retrieval time is not what is measured). Alternating rounds, each a fresh process;
each process warms up on a short generation, then times one whole generation (the prompt included).
Medians over the rounds; both ways must give the same tokens.

    python benchmarks/retro_generate.py --shapes retro-tiny retro-512x12 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the worker imports this checkout's mtk
# name -> (overrides of retro-tiny, prompt length, new tokens): the preset's shape (7 chunks of 16
# generated), and a bigger one (hidden 512, 12 layers: CCA in layers 6, 9, 12; 7.5 chunks of 32)
SHAPES = {
    "retro-tiny": ({}, 8, 112),
    "retro-512x12": ({"hidden_size": 512, "num_layers": 12, "num_attention_heads": 8,
                      "retro_chunk_length": 32, "seq_length": 512}, 16, 240),
}  # fmt: skip


def worker(shape: str, cached: bool, threads: int) -> dict:
    import torch

    from mtk.config import apply_overrides
    from mtk.generate import generate
    from mtk.models.generation import RetrievalDecoding
    from mtk.models.retro import SPEC, RetroModel
    from mtk.presets import load_preset

    class WholeSequence(RetrievalDecoding):
        """Before the cache: the whole sequence and all its neighbours through the model each step."""

        def start(self, model, batch, max_length, *, retrieve=None, **_):
            return lambda new, sequence: model(sequence, neighbours=retrieve(sequence[0].tolist()))[:, -1]

    if threads:
        torch.set_num_threads(threads)
    overrides, prompt_length, new_tokens = SHAPES[shape]
    torch.manual_seed(0)
    config = apply_overrides(load_preset("retro-tiny").sections, overrides).model
    model = RetroModel(config).eval()
    m, k = config.retro_chunk_length, config.retro_num_neighbors

    def retrieve(tokens: list[int]) -> torch.Tensor:
        chunks = -(-len(tokens) // m)
        padded = torch.tensor(tokens + [0] * (chunks * m - len(tokens))).view(chunks, 1, m)
        return ((padded.sum(-1, keepdim=True) + torch.arange(k * 2 * m).view(1, k, 2 * m)) % 1000)[None]

    if not cached:
        SPEC.generation = WholeSequence()  # this process's RETRO family decodes the old way
    prompt = torch.randint(0, config.vocab_size, (prompt_length,)).tolist()
    generate(model, prompt, 2, temperature=0, retrieve=retrieve)  # warm-up
    start = time.perf_counter()
    produced = generate(model, prompt, new_tokens, temperature=0, retrieve=retrieve)
    return {"seconds": time.perf_counter() - start, "tokens": produced}


def run(shape: str, cached: bool, threads: int) -> dict:
    command = [sys.executable, __file__, "--worker", shape, "--threads", str(threads),
               *(["--cached"] if cached else [])]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--worker", choices=list(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.cached, args.threads)))
        return
    for shape in args.shapes:
        speed: dict[bool, list[float]] = {False: [], True: []}
        tokens: dict[bool, list[int]] = {}
        for _ in range(args.rounds):
            for cached in (False, True):
                result = run(shape, cached, args.threads)
                speed[cached].append(len(result["tokens"]) / result["seconds"])
                tokens[cached] = result["tokens"]
                print(
                    f"{shape} {'cache' if cached else 'whole':5} {speed[cached][-1]:8.1f} tokens/s",
                    flush=True,
                )
        if tokens[False] != tokens[True]:
            raise SystemExit(f"{shape}: the cached generation's tokens differ from the whole-sequence one's")
        whole, cache = (statistics.median(speed[c]) for c in (False, True))
        print(f"{shape}: whole sequence {whole:.1f} tokens/s, cache {cache:.1f} tokens/s, "
              f"speed-up {cache / whole:.1f}x, same {len(tokens[True])} tokens "
              f"(medians of {args.rounds} alternating rounds)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
