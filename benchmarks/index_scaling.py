"""Start-up as the corpus grows: GPT sample, document and shuffle indices for 1M, 100M and 1B tokens.

    python benchmarks/index_scaling.py [--dir DIR] [--sizes 1M 100M 1B] [--rounds 3]
        [--seq-length 2048] [--train-samples 1000000] [--megatron-dir PATH] [--json FILE]

Writes real-format Megatron ``.bin/.idx`` corpora into ``--dir`` (default: a temporary folder, removed
at the end) with mtk's own ``IndexWriter``: documents of lognormal lengths around 500 tokens, uint16
tokens (a 50,257-token vocabulary), the ``.bin`` written in chunks so memory stays bounded. Then, for
each corpus, each measurement in a fresh process (``--child``), the train/valid/test datasets that
``mtk train`` builds at start-up (``build_split_datasets`` with ``GPTDataset``, split ``969,30,1``,
``--train-samples`` samples of ``--seq-length`` tokens and 1% and 0.1% of that for valid and test):

* cold: no cached indices: open the ``.idx``, build and cache the indices;
* warm: the cached indices loaded (what every later start and every other rank does);
* scan: the largest token id read from the ``.bin`` (``mtk train``'s vocabulary check, on the first
  run over a corpus only; cached afterwards).

Time is the work itself (imports excluded, measured in the child); memory is the child's peak
resident set (``VmHWM``) and its growth over the resident set before the work (interpreter and
imports). With ``--megatron-dir`` (a Megatron-LM checkout whose ``megatron/core/datasets/helpers.cpp``
has been compiled to ``helpers_cpp*.so`` there), Megatron's ``BlendedMegatronDatasetBuilder`` builds
its ``GPTDataset`` on the same corpus and settings, cold and warm. Rounds alternate the order of mtk
and Megatron; medians are reported. The page cache is not dropped: "cold" means no cached indices.
Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {"1M": 10**6, "10M": 10**7, "100M": 10**8, "1B": 10**9}
VOCAB = 50257
MEAN_DOC = 500  # tokens
CHUNK = 1 << 24  # tokens per write of the .bin


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------------------- corpus


def document_lengths(tokens: int, seed: int) -> np.ndarray:
    """Lognormal lengths (median about 300, mean about ``MEAN_DOC``, sigma 1) adding up to ``tokens``."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    mu = np.log(MEAN_DOC) - sigma**2 / 2
    parts, total = [], 0
    while total < tokens:
        draw = np.maximum(rng.lognormal(mu, sigma, max(1024, (tokens - total) // MEAN_DOC + 1024)), 1)
        lengths = draw.astype(np.int64)
        ends = np.cumsum(lengths) + total
        keep = int(np.searchsorted(ends, tokens)) + 1  # the document that reaches the target, cut below
        parts.append(lengths[:keep])
        total = int(ends[min(keep, len(ends)) - 1])
    lengths = np.concatenate(parts)
    lengths[-1] -= int(lengths.sum()) - tokens
    return lengths.astype(np.int32)


def write_corpus(prefix: Path, tokens: int, seed: int = 0) -> dict:
    """``prefix.bin/.idx`` of ``tokens`` tokens with mtk's IndexWriter, published together."""
    from mtk.data.indexed import IndexWriter, atomic_pair, token_dtype

    dtype = token_dtype(VOCAB)
    lengths = document_lengths(tokens, seed)
    writer = IndexWriter(dtype)
    writer.add_documents(lengths, np.ones(len(lengths), np.int64))
    # random tokens: a pool written at shifting offsets (index building never reads them)
    pool = np.random.default_rng(seed + 1).integers(0, VOCAB, CHUNK + 4096, dtype=np.int64).astype(dtype)
    with atomic_pair(prefix) as (tmp_bin, tmp_idx):
        with open(tmp_bin, "wb") as sink:
            for i, start in enumerate(range(0, tokens, CHUNK)):
                shift = (i * 7919) % 4096
                pool[shift : shift + min(CHUNK, tokens - start)].tofile(sink)
        tmp_idx.write_bytes(writer.to_bytes())
    return {"documents": len(lengths), "tokens": tokens, "dtype": str(dtype)}


def ensure_corpus(folder: Path, name: str, tokens: int) -> Path:
    prefix = folder / f"corpus-{name}"
    bin_file = Path(f"{prefix}.bin")
    if not (bin_file.exists() and Path(f"{prefix}.idx").exists()) or bin_file.stat().st_size != 2 * tokens:
        start = time.perf_counter()
        info = write_corpus(prefix, tokens)
        print(
            f"wrote {prefix}: {info['documents']:,} documents, {tokens:,} {info['dtype']} tokens "
            f"in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    return prefix


# ---------------------------------------------------------------------------------- measurements


def counts(train_samples: int) -> tuple[int, int, int]:
    return train_samples, max(1, train_samples // 100), max(1, train_samples // 1000)


def child_mtk(prefix: str, cache: str, seq_length: int, train_samples: int, split: str, seed: int) -> dict:
    from functools import partial

    from mtk.data.blended import build_split_datasets
    from mtk.data.gpt_dataset import GPTDataset
    from mtk.data.helpers import _fill_sample_index  # noqa: F401  (numba's cache loaded with the imports)

    before = status_kib("VmRSS")
    start = time.perf_counter()
    make = partial(GPTDataset, seq_length=seq_length, seed=seed)
    datasets = build_split_datasets(prefix, split, counts(train_samples), make, cache)
    seconds = time.perf_counter() - start
    arrays = [getattr(d, name) for d in datasets if d is not None for name in GPT_INDEX_NAMES]
    return {
        "seconds": seconds,
        "built": any(d.built_indices for d in datasets if d is not None),
        "samples": [len(d) if d is not None else 0 for d in datasets],
        "index_bytes": sum(a.nbytes for a in arrays),
        "mmap": all(isinstance(a, np.memmap) for a in arrays),
        "rss_before_kib": before,
    }


def child_scan(prefix: str, cache: str) -> dict:
    from mtk.data.helpers import max_token_id
    from mtk.data.indexed import IndexedDataset

    before = status_kib("VmRSS")
    start = time.perf_counter()
    largest = max_token_id(IndexedDataset(prefix), cache)
    return {"seconds": time.perf_counter() - start, "max_token_id": largest, "rss_before_kib": before}


def import_megatron(megatron_dir: str):
    """Megatron's dataset classes without running ``megatron/core/__init__.py``, which imports its
    models (and triton, which a CPU machine lacks); parallel_state first, as that file orders it."""
    import types
    import warnings

    warnings.filterwarnings("ignore")
    sys.path.insert(0, megatron_dir)
    for name, path in (("megatron", "megatron"), ("megatron.core", "megatron/core")):
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(megatron_dir, path)]
        sys.modules[name] = module
    import megatron.core.parallel_state  # noqa: F401
    from megatron.core.datasets import helpers  # noqa: F401  (the compiled helpers_cpp)
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    return BlendedMegatronDatasetBuilder, GPTDataset, GPTDatasetConfig


def child_megatron(
    prefix: str, cache: str, seq_length: int, train_samples: int, split: str, seed: int, megatron_dir: str
) -> dict:
    import logging
    import types

    logging.disable(logging.WARNING)
    builder, dataset_class, config_class = import_megatron(megatron_dir)
    tokenizer = types.SimpleNamespace(vocab_size=VOCAB, eod=VOCAB - 1, pad=-1, eos=VOCAB - 1)
    tokenizer.unique_identifiers = {"class": "BenchmarkTokenizer", "vocab_size": VOCAB}
    config = config_class(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split=split,
        path_to_cache=cache,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    before = status_kib("VmRSS")
    start = time.perf_counter()
    datasets = builder(dataset_class, list(counts(train_samples)), lambda: True, config).build()
    seconds = time.perf_counter() - start
    arrays = [getattr(d, name) for d in datasets if d is not None for name in GPT_INDEX_NAMES]
    return {
        "seconds": seconds,
        "samples": [len(d) if d is not None else 0 for d in datasets],
        "index_bytes": sum(a.nbytes for a in arrays),
        "rss_before_kib": before,
    }


GPT_INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")


def run_child(args: argparse.Namespace, mode: str, prefix: Path, cache: Path) -> dict:
    command = [sys.executable, __file__, "--child", mode, str(prefix), str(cache)]
    command += ["--seq-length", str(args.seq_length), "--train-samples", str(args.train_samples)]
    command += ["--split", args.split, "--seed", str(args.seed)]
    if args.megatron_dir:
        command += ["--megatron-dir", args.megatron_dir]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    return result


def child_main(args: argparse.Namespace) -> None:
    mode, prefix, cache = args.child
    if mode == "mtk":
        result = child_mtk(prefix, cache, args.seq_length, args.train_samples, args.split, args.seed)
    elif mode == "scan":
        result = child_scan(prefix, cache)
    else:
        result = child_megatron(
            prefix, cache, args.seq_length, args.train_samples, args.split, args.seed, args.megatron_dir
        )
    result["peak_kib"] = status_kib("VmHWM")
    print(json.dumps(result))


# ------------------------------------------------------------------------------------------- main


def fmt_mib(kib: float) -> str:
    return f"{kib / 1024:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, help="where the corpora go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the corpora of a temporary --dir")
    parser.add_argument("--sizes", nargs="+", default=["1M", "100M", "1B"], choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--train-samples", type=int, default=1_000_000)
    parser.add_argument("--split", default="969,30,1")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--megatron-dir", help="Megatron-LM checkout with helpers_cpp compiled")
    parser.add_argument("--no-scan", action="store_true", help="skip the token-id scan of the .bin")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PREFIX", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    temporary = args.dir is None
    folder = Path(tempfile.mkdtemp(prefix="mtk-index-scaling-")) if temporary else args.dir
    folder.mkdir(parents=True, exist_ok=True)
    impls = ["mtk"] + (["megatron"] if args.megatron_dir else [])
    results: dict[str, dict[str, dict[str, list[dict]]]] = {}
    try:
        prefixes = {name: ensure_corpus(folder, name, SIZES[name]) for name in args.sizes}
        # one untimed build first: numba compiles into its on-disk cache, as on any machine's first run
        for impl in impls:
            run_child(args, impl, prefixes[args.sizes[0]], folder / "cache-warmup")
        shutil.rmtree(folder / "cache-warmup", ignore_errors=True)
        for round_ in range(args.rounds):
            for name in args.sizes:
                order = impls if round_ % 2 == 0 else impls[::-1]
                for impl in order:
                    cache = folder / f"cache-{impl}-{name}"
                    shutil.rmtree(cache, ignore_errors=True)
                    slot = results.setdefault(name, {}).setdefault(impl, {"cold": [], "warm": []})
                    slot["cold"].append(run_child(args, impl, prefixes[name], cache))
                    slot["warm"].append(run_child(args, impl, prefixes[name], cache))
                    assert not slot["warm"][-1].get("built", False), "warm start rebuilt the indices"
                    shutil.rmtree(cache, ignore_errors=True)
                if not args.no_scan:
                    cache = folder / f"cache-scan-{name}"
                    shutil.rmtree(cache, ignore_errors=True)
                    results[name].setdefault("scan", {"cold": []})["cold"].append(
                        run_child(args, "scan", prefixes[name], cache)
                    )
                    shutil.rmtree(cache, ignore_errors=True)
                print(f"round {round_ + 1}/{args.rounds}: {name} done", flush=True)
    finally:
        if temporary and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    def median(rows: list[dict], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    print(
        f"\nseq_length {args.seq_length}, samples (train, valid, test) {counts(args.train_samples)}, "
        f"split {args.split}; medians of {args.rounds} rounds, each a fresh process"
    )
    header = (
        f"{'corpus':>6} {'impl':>9} {'cold s':>8} {'cold peak MiB':>14} {'cold +MiB':>10} "
        f"{'warm s':>8} {'warm peak MiB':>14} {'warm +MiB':>10} {'index MiB':>10}"
    )
    print(header)
    for name in args.sizes:
        for impl in impls:
            cold, warm = results[name][impl]["cold"], results[name][impl]["warm"]
            grow_cold = [r["peak_kib"] - r["rss_before_kib"] for r in cold]
            grow_warm = [r["peak_kib"] - r["rss_before_kib"] for r in warm]
            print(
                f"{name:>6} {impl:>9} {median(cold, 'seconds'):>8.3f} {fmt_mib(median(cold, 'peak_kib')):>14} "
                f"{fmt_mib(statistics.median(grow_cold)):>10} {median(warm, 'seconds'):>8.3f} "
                f"{fmt_mib(median(warm, 'peak_kib')):>14} {fmt_mib(statistics.median(grow_warm)):>10} "
                f"{cold[0]['index_bytes'] / 2**20:>10.1f}"
            )
        if "scan" in results[name]:
            scan = results[name]["scan"]["cold"]
            grow = [r["peak_kib"] - r["rss_before_kib"] for r in scan]
            print(
                f"{name:>6} {'mtk scan':>9} {median(scan, 'seconds'):>8.3f} {fmt_mib(median(scan, 'peak_kib')):>14} "
                f"{fmt_mib(statistics.median(grow)):>10}   (largest token id, first run only)"
            )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("child", "json", "dir")}
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
