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
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def generate_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """Zipf-distributed pseudo-English with punctuation, numbers and some non-ASCII words."""
    rng = np.random.default_rng(seed)
    syllables = "ka ri to na me su lo vi de pa or an el is ter ing ed er ow ch th st pl gr mi".split()
    lexicon = sorted({"".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(60000)})
    lexicon += ["café", "naïve", "東京", "Zürich", "señor", "don't", "it's", "we're", "🙂"]
    ranks = np.arange(1, len(lexicon) + 1)
    weights = 1 / ranks**1.1
    weights /= weights.sum()
    order = rng.permutation(len(lexicon))
    target, written, docs = int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            words = [lexicon[i] for i in order[rng.choice(len(lexicon), rng.integers(100, 1500), p=weights)]]
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


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def child_raw_tokenizers(corpus: Path, tokenizer_json: Path) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    nbytes = os.path.getsize(corpus)
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 1000):
        tokens += sum(len(e.ids) for e in tok.encode_batch(texts[i : i + 1000], add_special_tokens=False))
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens": tokens,
        "docs": len(texts),
        "bytes": nbytes,
        "peak_rss_mb": peak_rss_mb(),
    }


def child_mtk(corpus: Path, tokenizer_dir: Path, out_prefix: Path, workers: int) -> dict:
    from mtk.data.tokenizer import load_tokenizer

    from mtk.data.prepare import prepare_data

    tok = load_tokenizer(str(tokenizer_dir))
    start = time.perf_counter()
    result = prepare_data([str(corpus)], str(out_prefix), tok, append_eod=True, workers=workers)
    seconds = time.perf_counter() - start
    stats = result.stats
    return {
        "seconds": seconds,
        "tokens": stats.tokens["text"],
        "docs": stats.documents,
        "bytes": stats.input_bytes,
        "backend": tok.backend,
        "peak_rss_mb": peak_rss_mb(),
    }


def child_megatron(corpus: Path, tokenizer_dir: Path, out_prefix: Path, workers: int, megatron: Path) -> dict:
    command = [
        sys.executable, str(megatron / "tools" / "preprocess_data.py"), "--input", str(corpus),
        "--output-prefix", str(out_prefix), "--tokenizer-type", "GPT2BPETokenizer",
        "--vocab-file", str(tokenizer_dir / "vocab.json"), "--merge-file", str(tokenizer_dir / "merges.txt"),
        "--append-eod", "--workers", str(workers), "--log-interval", "100000",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(megatron)})
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": os.path.getsize(corpus), "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (>= 50 for the report)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--megatron-dir", type=Path, help="a Megatron-LM checkout to compare against")
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
            report = child_megatron(Path(rest[0]), Path(rest[1]), Path(rest[2]), int(rest[3]), Path(rest[4]))
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
            for _, line in zip(range(3000), src, strict=False):
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
                ["--child", "megatron", str(corpus), str(tok_dir), str(out / f"megatron-w{workers}"), str(workers), str(args.megatron_dir)]
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
