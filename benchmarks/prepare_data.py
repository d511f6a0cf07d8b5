"""Preprocessing throughput: `mtk prepare-data` vs the raw `tokenizers` batch-encode rate (and Megatron).

    python benchmarks/prepare_data.py [--mb 50] [--workers 1 2] [--megatron-dir PATH] [--out bench-out]

Generates a deterministic English-like JSONL corpus of --mb MB, trains a 32k byte-level BPE on part
of it, then measures, each in a fresh process: the raw `tokenizers` encode_batch rate on the same
texts and cores (the ceiling for a `tokenizers`-based pipeline), `mtk prepare-data` with 1 and 2
workers, peak memory on the corpus and on a 4x larger one, and Megatron-LM's
tools/preprocess_data.py when --megatron-dir points at a Megatron-LM checkout. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def generate_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """Zipf-distributed pseudo-English with punctuation, numbers and some non-ASCII words."""
    rng = np.random.default_rng(seed)
    onsets = "b c d f g h j k l m n p r s t v w z br ch cl dr fl gr pl pr sh st th tr".split()
    vowels = "a e i o u ai ea ee ie oo ou".split()
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "rt", "ck"]
    syllables = [o + v + c for o in onsets for v in vowels for c in codas]
    picks = rng.integers(0, len(syllables), (200000, 3))
    lengths = rng.integers(1, 4, 200000)
    lexicon = sorted({"".join(syllables[s] for s in row[:n]) for row, n in zip(picks, lengths, strict=True)})
    lexicon += ["café", "naïve", "東京", "Zürich", "señor", "don't", "it's", "we're", "🙂"]
    ranks = np.arange(1, len(lexicon) + 1)
    weights = 1 / ranks**1.1
    cumulative = np.cumsum(weights / weights.sum())
    order = rng.permutation(len(lexicon))
    target, written, docs = int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            drawn = np.searchsorted(cumulative, rng.random(rng.integers(100, 1500)) * cumulative[-1])
            words = [lexicon[i] for i in order[drawn]]
            for i in range(0, len(words), 12):
                words[i] = words[i].capitalize()
                if i:
                    words[i - 1] += "." if rng.random() < 0.8 else ","
            for i in rng.integers(0, len(words), len(words) // 50):
                words[i] = str(rng.integers(0, 10000))
            line = json.dumps({"text": " ".join(words) + ".", "id": docs}, ensure_ascii=False) + "\n"
            out.write(line)
            written += len(line.encode())
            docs += 1
    return docs


def run_child(args: list[str], env: dict | None = None) -> dict:
    """Run this script in a child mode and return its JSON report (fresh process: clean peak memory)."""
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


class PeakMemory:
    """Samples the summed RSS of this process and all its descendants (worker processes included).

    ``ru_maxrss`` cannot be used: Linux carries it over fork and exec, so a child reports at least
    the RSS its parent had when it was started.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.peak = 0
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _tree_rss(root: int) -> int:
        parents, rss = {}, {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        fields = handle.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parents[int(entry)] = int(fields[1])
                rss[int(entry)] = int(fields[21]) * resource.getpagesize()
        tree, frontier = {root}, [root]
        while frontier:
            current = frontier.pop()
            children = [pid for pid, parent in parents.items() if parent == current]
            tree.update(children)
            frontier.extend(children)
        return sum(rss.get(pid, 0) for pid in tree)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._tree_rss(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def megabytes(self) -> float:
        return self.peak / 2**20


def child_raw_tokenizers(corpus: Path, tokenizer_json: Path) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    nbytes = os.path.getsize(corpus)
    start = time.perf_counter()
    tokens = 0
    with PeakMemory() as memory:
        for i in range(0, len(texts), 1000):
            tokens += sum(len(e.ids) for e in tok.encode_batch(texts[i : i + 1000], add_special_tokens=False))
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens": tokens,
        "docs": len(texts),
        "bytes": nbytes,
        "peak_rss_mb": memory.megabytes,
    }


def child_mtk(corpus: Path, tokenizer_dir: Path, out_prefix: Path, workers: int) -> dict:
    from mtk.data.prepare import prepare_data
    from mtk.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    start = time.perf_counter()
    with PeakMemory() as memory:
        result = prepare_data([str(corpus)], str(out_prefix), tok, append_eod=True, workers=workers)
    seconds = time.perf_counter() - start
    stats = result.stats
    return {
        "seconds": seconds,
        "tokens": stats.tokens["text"],
        "docs": stats.documents,
        "bytes": stats.input_bytes,
        "backend": tok.backend,
        "peak_rss_mb": memory.megabytes,
    }


def megatron_tokenizer_dir(tokenizer_dir: Path, out: Path) -> Path:
    """Our tokenizer.json plus the tokenizer_config.json that Megatron's HuggingFaceTokenizer needs offline."""
    target = out / "megatron-tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_dir / "tokenizer.json", target / "tokenizer.json")
    config = {
        "tokenizer_class": "GPT2TokenizerFast",
        **dict.fromkeys(("eos_token", "bos_token", "unk_token"), "<|endoftext|>"),
    }
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def child_megatron(
    corpus: Path, tokenizer_dir: Path, out_prefix: Path, workers: int, megatron: Path, python: str
) -> dict:
    """Megatron's preprocess_data.py with its Hugging Face tokenizer path on the same tokenizer.

    (Its GPT2BPETokenizer type asks the Hugging Face hub for "gpt2" even with local vocab/merges.)
    """
    out_prefix.parent.mkdir(parents=True, exist_ok=True)  # Megatron hangs if the folder is missing
    command = [
        python, str(megatron / "tools" / "preprocess_data.py"), "--input", str(corpus), "--output-prefix",
        str(out_prefix), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
        str(megatron_tokenizer_dir(tokenizer_dir, out_prefix.parent)), "--append-eod", "--workers", str(workers),
        "--log-interval", "100000",
    ]  # fmt: skip
    pythonpath = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(megatron)]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    with PeakMemory() as memory:
        subprocess.run(command, check=True, capture_output=True, env=env)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": os.path.getsize(corpus), "peak_rss_mb": memory.megabytes}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (>= 50 for the report)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--megatron-dir", type=Path, help="a Megatron-LM checkout to compare against")
    parser.add_argument(
        "--megatron-python",
        default=sys.executable,
        help="interpreter with Megatron's needs (transformers ...)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--skip-memory", action="store_true", help="skip the 4x-corpus memory run")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "raw":
            report = child_raw_tokenizers(Path(rest[0]), Path(rest[1]))
        elif kind == "mtk":
            report = child_mtk(Path(rest[0]), Path(rest[1]), Path(rest[2]), int(rest[3]))
        else:
            report = child_megatron(
                Path(rest[0]), Path(rest[1]), Path(rest[2]), int(rest[3]), Path(rest[4]), rest[5]
            )
        print(json.dumps(report))
        return

    from mtk.data.tokenizer import train_tokenizer

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / f"corpus-{args.mb:g}mb.jsonl"
    if not corpus.exists():
        print(f"generating {corpus} ...", flush=True)
        generate_corpus(corpus, args.mb)
    tok_dir = out / f"bpe-{args.vocab_size}"
    if not (tok_dir / "vocab.json").exists():
        sample = out / "tokenizer-sample.txt"
        with open(corpus, encoding="utf-8") as src, open(sample, "w", encoding="utf-8") as dst:
            for _, line in zip(range(12000), src, strict=False):
                dst.write(json.loads(line)["text"] + "\n")
        print(f"training a {args.vocab_size} BPE vocabulary ...", flush=True)
        train_tokenizer(
            [sample], kind="bpe", vocab_size=args.vocab_size, out_dir=tok_dir, show_progress=False
        )

    rows = []

    def record(name: str, workers: int, report: dict) -> None:
        mb = report["bytes"] / 1e6
        row = {"run": name, "workers": workers, **report, "mb_per_s": mb / report["seconds"]}
        if "docs" in report:
            row["docs_per_s"] = report["docs"] / report["seconds"]
            row["tokens_per_s"] = report["tokens"] / report["seconds"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    for workers in args.workers:
        threads = {"RAYON_NUM_THREADS": str(workers), "TOKENIZERS_PARALLELISM": "true"}
        record(
            "tokenizers encode_batch (raw)",
            workers,
            run_child(["--child", "raw", str(corpus), str(tok_dir / "tokenizer.json")], threads),
        )
        record(
            "mtk prepare-data",
            workers,
            run_child(
                ["--child", "mtk", str(corpus), str(tok_dir), str(out / f"mtk-w{workers}"), str(workers)]
            ),
        )
        if args.megatron_dir:
            record("Megatron preprocess_data.py", workers, run_child(
                ["--child", "megatron", str(corpus), str(tok_dir), str(out / f"megatron-w{workers}"), str(workers), str(args.megatron_dir), args.megatron_python]
            ))  # fmt: skip
    if not args.skip_memory:
        big = out / f"corpus-{4 * args.mb:g}mb.jsonl"
        if not big.exists():
            with open(big, "wb") as dst:
                for _ in range(4):
                    dst.write(corpus.read_bytes())
        workers = max(args.workers)
        record(
            "mtk prepare-data, 4x corpus",
            workers,
            run_child(["--child", "mtk", str(big), str(tok_dir), str(out / "mtk-4x"), str(workers)]),
        )
    (out / "prepare_data.json").write_text(json.dumps(rows, indent=2))
    print("\n| run | workers | MB/s | docs/s | tokens/s | peak RSS MB |\n|---|---|---|---|---|---|")
    for row in rows:
        docs = f"{row['docs_per_s']:,.0f}" if "docs_per_s" in row else "-"
        tokens = f"{row['tokens_per_s']:,.0f}" if "tokens_per_s" in row else "-"
        print(
            f"| {row['run']} | {row['workers']} | {row['mb_per_s']:.2f} | {docs} | {tokens} | {row['peak_rss_mb']:.0f} |"
        )
    raw = {r["workers"]: r["mb_per_s"] for r in rows if r["run"].startswith("tokenizers")}
    mtk = {r["workers"]: r["mb_per_s"] for r in rows if r["run"] == "mtk prepare-data"}
    meg = {r["workers"]: r["mb_per_s"] for r in rows if r["run"].startswith("Megatron")}
    for workers in sorted(mtk):
        line = f"workers={workers}: mtk / raw tokenizers = {mtk[workers] / raw[workers]:.2f}"
        if workers in meg:
            line += f", mtk / Megatron = {mtk[workers] / meg[workers]:.2f}"
        print(line)


if __name__ == "__main__":
    main()
