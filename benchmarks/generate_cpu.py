"""`mtk generate`'s decoding eager (dynamic KV cache) against compiled (static KV cache, the one-token
step through torch.compile) on CPU, greedy, random weights, in alternating rounds, each a fresh process
(the inductor cache warm after the first compiled round, as a second run on a machine is).

Each process generates twice with the same shapes: the first call's time less the second's is the
compile time (the first compiled one-token step), the second call gives the steady decoding speed
(the prompt's prefill included). Medians over the rounds.

    python benchmarks/generate_cpu.py --shapes gpt-tiny llama-tiny llama-512x8 --rounds 3
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
# name -> (preset, overrides): the presets' shapes, and a bigger Llama-shaped one
SHAPES = {
    "gpt-tiny": ("gpt-tiny", {}),
    "llama-tiny": ("llama-tiny", {}),
    "llama-512x8": ("llama-tiny", {"hidden_size": 512, "num_layers": 8, "num_attention_heads": 8,
                                   "num_query_groups": 4, "ffn_hidden_size": 1408}),
}  # fmt: skip


def worker(shape: str, compiled: bool, prompt_length: int, new_tokens: int, threads: int) -> dict:
    """Time two greedy generations of one process (the first one compiles)."""
    import torch

    from mtk.config import apply_overrides
    from mtk.generate import generate
    from mtk.models.gpt import GPTModel
    from mtk.presets import load_preset

    if threads:
        torch.set_num_threads(threads)
    preset, overrides = SHAPES[shape]
    torch.manual_seed(0)
    model = GPTModel(apply_overrides(load_preset(preset).sections, overrides).model).eval()
    prompt = torch.randint(0, model.config.vocab_size, (prompt_length,)).tolist()
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        produced = generate(model, prompt, new_tokens, temperature=0, compile=compiled)
        seconds.append(time.perf_counter() - start)
    return {"first_s": seconds[0], "second_s": seconds[1], "tokens": len(produced)}


def run(shape: str, compiled: bool, prompt_length: int, new_tokens: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--worker", shape, "--prompt-length", str(prompt_length),
               "--new-tokens", str(new_tokens), "--threads", str(threads),
               *(["--compiled"] if compiled else [])]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=112)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--worker", choices=list(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(
            json.dumps(worker(args.worker, args.compiled, args.prompt_length, args.new_tokens, args.threads))
        )
        return
    for shape in args.shapes:
        speed: dict[bool, list[float]] = {False: [], True: []}
        compile_s: list[float] = []
        for _ in range(args.rounds):
            for compiled in (False, True):
                result = run(shape, compiled, args.prompt_length, args.new_tokens, args.threads)
                speed[compiled].append(result["tokens"] / result["second_s"])
                if compiled:
                    compile_s.append(result["first_s"] - result["second_s"])
                print(f"{shape} {'compiled' if compiled else 'eager':8} {speed[compiled][-1]:8.1f} tokens/s "
                      f"(first call {result['first_s']:.2f} s)", flush=True)  # fmt: skip
        eager, compiled_speed = (statistics.median(speed[c]) for c in (False, True))
        print(f"{shape}: eager {eager:.1f} tokens/s, compiled {compiled_speed:.1f} tokens/s, "
              f"compiled / eager {compiled_speed / eager:.2f}x, compile {statistics.median(compile_s):.1f} s "
              f"(medians of {args.rounds} alternating rounds)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
