"""`mtk bench` eager against `--compile` (torch.compile per transformer block) on CPU, in alternating
rounds, each a fresh process (the inductor cache warm after the first compiled round, as a second
run on a machine is): step time and tokens/s, medians over the rounds (a shared machine: single rounds vary widely).

    python benchmarks/compile_cpu.py --presets gpt-tiny --rounds 3 --iters 30 --warmup 5
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def bench(preset: str, compiled: bool, iters: int, warmup: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "bench.json"
        flag = "--compile" if compiled else "--no-compile"
        command = [sys.executable, "-m", "stages.main", "bench", "--preset", preset, flag, "--iters", str(iters),
                   "--warmup", str(warmup), "--device", "cpu", "--json", str(out), *extra]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["gpt-tiny"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--extra", default="", help="more `mtk bench` arguments in one string, e.g. --extra='--fp8 hybrid'"
    )
    args = parser.parse_args()
    for preset in args.presets:
        steps: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for compiled in (False, True):
                result = bench(preset, compiled, args.iters, args.warmup, shlex.split(args.extra))
                steps[compiled].append(result["step_seconds"])
                print(f"{preset} {'compiled' if compiled else 'eager':8} {result['step_seconds'] * 1e3:8.2f} ms/step "
                      f"{result['tokens_per_s']:10,.0f} tokens/s  {result['built']}", flush=True)  # fmt: skip
        eager, compiled = (statistics.median(steps[c]) for c in (False, True))
        print(f"{preset}: eager {eager * 1e3:.2f} ms/step, compiled {compiled * 1e3:.2f} ms/step, "
              f"compiled / eager speed {eager / compiled:.2f}x (medians of {args.rounds} alternating rounds)")  # fmt: skip


if __name__ == "__main__":
    main()
