"""`mtk prepare-data` end to end: exact output bytes, every input kind, bad input, interruption."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from mtk.data.indexed import IndexedDataset
from mtk.data.prepare import PrepareError, prepare_data
from mtk.data.prepared import check_token_ids, data_facts
from mtk.data.tokenizer import GPT2_SHA256, load_tokenizer
from mtk.data.tokenizer_training import train_tokenizer
from mtk.manifest import read_manifest, sha256_file
from mtk.presets import load_preset
from mtk.train.run import resolve_vocab
from stages.options import build_config
from tests.conftest import invoke, run


def spec_index_bytes(dtype_code: int, itemsize: int, documents: list[list[list[int]]]) -> bytes:
    """An .idx written straight from the MMIDIDX specification (independent of mtk's writer)."""
    lengths = [len(s) for doc in documents for s in doc]
    pointers, position = [], 0
    for length in lengths:
        pointers.append(position)
        position += length * itemsize
    doc_index = [0]
    for doc in documents:
        doc_index.append(doc_index[-1] + len(doc))
    out = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, dtype_code, len(lengths), len(doc_index))
    out += struct.pack(f"<{len(lengths)}i", *lengths) + struct.pack(f"<{len(pointers)}q", *pointers)
    return out + struct.pack(f"<{len(doc_index)}q", *doc_index)


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path


def null_tokenizer(vocab_size=10):
    return load_tokenizer("null", vocab_size=vocab_size)


RECORDS = [{"text": "1 2 3", "title": "7"}, {"text": "", "title": "8 8"}, {"text": "4 5", "title": "9"}]


def test_exact_bytes_with_eod_and_empty_document(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    result = prepare_data([str(src)], str(tmp_path / "out"), null_tokenizer(), append_eod=True)
    prefix = tmp_path / "out_text_document"
    assert result.outputs["text"] == str(prefix)
    # null tokenizer with vocab 10: eod id is 10, vocabulary 11 -> uint16 (dtype code 8)
    assert (tmp_path / "out_text_document.bin").read_bytes() == np.array(
        [1, 2, 3, 10, 4, 5, 10], np.uint16
    ).tobytes()
    expected = spec_index_bytes(8, 2, [[[1, 2, 3, 10]], [], [[4, 5, 10]]])
    assert (tmp_path / "out_text_document.idx").read_bytes() == expected
    assert result.stats.documents == 3 and result.stats.empty_documents["text"] == 1
    assert IndexedDataset(prefix).document(1) == []  # document i is input line i


def test_manifest_records_tokenizer_counts_and_hashes(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    prepare_data([str(src)], str(tmp_path / "out"), null_tokenizer(), append_eod=True)
    manifest = read_manifest(tmp_path / "out_text_document.mtk.json")
    assert manifest["stage"] == "prepare-data"
    assert manifest["tokenizer"]["kind"] == "null"
    assert (manifest["vocab_size"], manifest["eod"], manifest["dtype"]) == (11, 10, "uint16")
    assert manifest["counts"] == {
        "documents": 3, "empty_documents": 1, "sequences": 2, "tokens": 7, "skipped_lines": 0
    }  # fmt: skip
    assert manifest["inputs"][0]["bytes"] == src.stat().st_size
    outputs = {os.path.basename(o["path"]): o for o in manifest["outputs"]}
    assert outputs["out_text_document.bin"]["sha256"] == sha256_file(tmp_path / "out_text_document.bin")
    assert outputs["out_text_document.idx"]["sha256"] == sha256_file(tmp_path / "out_text_document.idx")
    assert manifest["mtk_version"] and manifest["command_line"]


def test_one_output_pair_per_json_key(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    result = prepare_data([str(src)], str(tmp_path / "o"), null_tokenizer(), json_keys=["text", "title"])
    assert set(result.outputs) == {"text", "title"}
    title = IndexedDataset(tmp_path / "o_title_document")
    assert [s.tolist() for d in range(3) for s in title.document(d)] == [[7], [8, 8], [9]]


@pytest.mark.parametrize("kind", ["gz", "zst", "parquet"])
def test_compressed_and_parquet_inputs_give_identical_bytes(tmp_path, kind):
    plain = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    prepare_data([str(plain)], str(tmp_path / "plain"), null_tokenizer(), append_eod=True)
    if kind == "gz":
        src = write_jsonl(tmp_path / "in2.jsonl.gz", RECORDS, opener=gzip.open)
    elif kind == "zst":
        zstandard = pytest.importorskip("zstandard")
        src = tmp_path / "in2.jsonl.zst"
        src.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        src = tmp_path / "in2.parquet"
        pq.write_table(pa.table({"text": [r["text"] for r in RECORDS]}), src)
    prepare_data([str(src)], str(tmp_path / "other"), null_tokenizer(), append_eod=True)
    for suffix in ("bin", "idx"):
        assert (tmp_path / f"other_text_document.{suffix}").read_bytes() == (
            tmp_path / f"plain_text_document.{suffix}"
        ).read_bytes()


def test_text_inputs_per_line_and_per_file(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("1 2\n3\n")
    (docs / "b.txt").write_text("4 5 6\n")
    per_file = prepare_data([str(docs)], str(tmp_path / "f"), null_tokenizer(), text_mode="file")
    assert per_file.stats.documents == 2
    assert [IndexedDataset(tmp_path / "f_text_document")[i].tolist() for i in range(2)] == [
        [1, 2, 3],
        [4, 5, 6],
    ]
    prepare_data([str(docs / "*.txt")], str(tmp_path / "l"), null_tokenizer(), text_mode="line")
    ds = IndexedDataset(tmp_path / "l_text_document")
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3], [4, 5, 6]]
    with pytest.raises(ValueError, match="--text-mode"):
        prepare_data([str(docs / "a.txt")], str(tmp_path / "x"), null_tokenizer())


def test_workers_and_chunks_do_not_change_the_output(tmp_path):
    rng = np.random.default_rng(0)
    records = [{"text": " ".join(map(str, rng.integers(0, 500, rng.integers(0, 40))))} for _ in range(400)]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    tok = null_tokenizer(500)
    prepare_data([str(src)], str(tmp_path / "one"), tok, append_eod=True, workers=1)
    prepare_data([str(src)], str(tmp_path / "two"), tok, append_eod=True, workers=2, chunk_bytes=2000)
    for suffix in ("bin", "idx"):
        assert (tmp_path / f"one_text_document.{suffix}").read_bytes() == (
            tmp_path / f"two_text_document.{suffix}"
        ).read_bytes()
    ds = IndexedDataset(tmp_path / "one_text_document")
    assert ds.num_documents == 400
    for i in (0, 123, 399):
        expected = [int(t) for t in records[i]["text"].split()]
        got = [t for s in ds.document(i) for t in s.tolist()]
        assert got == (expected + [500] if expected else [])


BAD_LINES = [
    (b'{"text": "1 2"\n', "malformed JSON"),
    (b'{"body": "1 2"}\n', "missing key 'text'"),
    (b'{"text": 12}\n', "key 'text' holds int, expected a string"),
    (b'{"text": "1 \xff 2"}\n', "not valid UTF-8"),
    (b'["text"]\n', "expected a JSON object, got list"),
    (b"\n", "empty line"),
    (b'{"text": "1 \\ud800 2"}\n', r"key 'text' holds a lone surrogate \\ud800"),
    (b'{"text": "1 x 2"}\n', "null tokenizer: 'x' is not an integer token id"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_line_fails_with_file_and_line_and_writes_nothing(tmp_path, line, message):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "1"}\n{"text": "2"}\n' + line + b'{"text": "3"}\n')
    with pytest.raises(PrepareError, match=f"{src.resolve()}:3: {message}"):
        prepare_data([str(src)], str(tmp_path / "out"), null_tokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_skip_mode_drops_and_counts_bad_lines(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "1"}\n' + b"".join(line for line, _ in BAD_LINES) + b'{"text": "2"}\n')
    result = prepare_data([str(src)], str(tmp_path / "out"), null_tokenizer(), on_error="skip")
    assert result.stats.skipped_lines == len(BAD_LINES)
    assert result.stats.documents == 2
    assert f"{src.resolve()}:2: malformed JSON" in result.stats.skipped_examples[0]
    ds = IndexedDataset(tmp_path / "out_text_document")
    assert [ds[i].tolist() for i in range(len(ds))] == [[1], [2]]


def test_interrupt_leaves_no_partial_output(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2 3"}] * 200)

    def interrupt(stats, total):
        if stats.documents >= 50:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_data([str(src)], str(tmp_path / "out"), null_tokenizer(), chunk_bytes=100, progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_failed_rerun_keeps_no_stale_pair_mixed_with_new(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    prepare_data([str(src)], str(tmp_path / "out"), null_tokenizer())
    before = (tmp_path / "out_text_document.bin").read_bytes()
    src.write_bytes(src.read_bytes() + b"{broken\n")
    with pytest.raises(PrepareError):
        prepare_data([str(src)], str(tmp_path / "out"), null_tokenizer())
    # the previous complete output is untouched and no temporary file remains
    assert (tmp_path / "out_text_document.bin").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    corpus = root / "corpus.txt"
    words = "the quick brown fox jumps over lazy dog naïve café 東京 emoji 🙂 don't it's we're".split()
    rng = np.random.default_rng(1)
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(2000)), encoding="utf-8")
    return train_tokenizer([corpus], kind="bpe", vocab_size=400, out_dir=root / "tok", show_progress=False)


def test_gpt2_bpe_documents_decode_back(tmp_path, bpe_dir):
    texts = ["The quick brown fox.", "naïve café 東京 🙂  spaced\ttabs\n", "don't<|endoftext|>stop"]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    tok = load_tokenizer(str(bpe_dir))
    prepare_data([str(src)], str(tmp_path / "out"), tok, append_eod=True, workers=2, chunk_bytes=10)
    ds = IndexedDataset(tmp_path / "out_text_document")
    for i, text in enumerate(texts):
        ids = ds[i].tolist()
        assert ids == tok.encode(text) + [tok.eod]
        assert tok.decode(ids[:-1]) == text


def test_split_sentences_writes_sentence_level_index(tmp_path, bpe_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "The fox jumps. The dog sleeps! Why?"}, {"text": ""}])
    tok = load_tokenizer(str(bpe_dir))
    result = prepare_data([str(src)], str(tmp_path / "s"), tok, split_sentences=True, append_eod=True)
    assert result.outputs["text"].endswith("s_text_sentence")
    ds = IndexedDataset(tmp_path / "s_text_sentence")
    sentences = ds.document(0)
    assert [tok.decode(s.tolist()) for s in sentences[:-1]] == ["The fox jumps.", "The dog sleeps!"]
    assert sentences[-1].tolist() == tok.encode("Why?") + [tok.eod]  # eod closes the document
    assert ds.document(1) == [] and ds.num_documents == 2


def test_cli_summary_and_errors(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out = str(tmp_path / "cli")
    result = invoke(
        "prepare-data", src, "-o", out, "-t", "null", "--vocab-size", "10", "-k", "text,title", "-w", "1"
    )
    assert "prepare-data summary" in result.output and "empty documents" in result.output
    assert (tmp_path / "cli_title_document.idx").exists()
    bad = invoke(
        "prepare-data", tmp_path / "nope.jsonl", "-o", out, "-t", "null", "--vocab-size", "10", code=2
    )
    assert "nope.jsonl: no such file or directory" in bad.output


@pytest.mark.slow  # a prepare-data subprocess, interrupted
def test_cli_gpt2_works_offline_and_gpt3_presets_inherit_it(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise AssertionError(f"prepare-data used the network: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", offline)  # every download resolves its host first
    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))  # nor is tiktoken's cache read
    texts = ["Hello world", "", " The quick brown fox<|endoftext|>"]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": text} for text in texts])
    output = run("prepare-data", src, "-o", tmp_path / "out", "-t", "gpt2", "--append-eod", "-w", "2")
    assert "gpt2bpe (tiktoken), vocab 50,257, eod 50256" in output
    prefix = str(tmp_path / "out_text_document")
    documents = [[list(map(int, s)) for s in IndexedDataset(prefix).document(i)] for i in range(3)]
    assert documents == [[[15496, 995, 50256]], [], [[383, 2068, 7586, 21831, 50256, 50256]]]  # GPT-2's ids
    manifest = read_manifest(prefix + ".mtk.json")
    assert (manifest["vocab_size"], manifest["eod"], manifest["dtype"]) == (50257, 50256, "uint16")
    assert {os.path.basename(f["path"]): f["sha256"] for f in manifest["tokenizer"]["files"]} == GPT2_SHA256
    # `mtk train --preset gpt3-345m --data PREFIX`: the preset names gpt2, the run inherits the data's
    config = build_config("gpt3-345m", [], {"data_path": prefix})
    facts = data_facts(config.data.data_path)
    assert load_preset("gpt3-345m").tokenizer.split()[0] == "gpt2"
    assert facts.tokenizer == manifest["tokenizer"] and facts.eod == 50256
    assert resolve_vocab(config, facts, None).model.vocab_size == 50257
    check_token_ids(prefix, config.model.vocab_size, tmp_path / "cache")


def test_sigint_during_cli_run_leaves_nothing(tmp_path):
    rng = np.random.default_rng(0)
    line = json.dumps({"text": " ".join(map(str, rng.integers(0, 1000, 2000)))}) + "\n"
    src = tmp_path / "big.jsonl"
    src.write_text(line * 6000)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.main", "prepare-data", str(src), "-o", str(out), "-t", "null",
         "--vocab-size", "1000", "-w", "1", "--chunk-mb", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=os.getcwd(),
        # a shell may start background jobs with SIGINT ignored; a user's terminal would not
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not [p for p in tmp_path.iterdir() if ".tmp-" in p.name] and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130, output
    assert "interrupted" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]


def test_worker_that_cannot_start_fails_cleanly_instead_of_hanging(tmp_path, bpe_dir):
    tokenizer_copy = tmp_path / "tok"
    tokenizer_copy.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (tokenizer_copy / name).write_bytes((bpe_dir / name).read_bytes())
    tok = load_tokenizer(str(tokenizer_copy), kind="gpt2bpe")
    (tokenizer_copy / "merges.txt").write_text("#version: 0.2\n")  # changed after loading: workers refuse it
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "The fox."}] * 20)
    with pytest.raises(PrepareError, match="worker process could not start"):
        prepare_data([str(src)], str(tmp_path / "out"), tok, workers=2, chunk_bytes=16)  # chunk 2 on a worker
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "tok"]


def test_several_keys_are_published_together_or_not_at_all(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    prepare_data([str(src)], str(tmp_path / "out"), null_tokenizer(), json_keys=["text", "title"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("out_")}
    assert len(before) == 6  # two pairs and their manifests
    write_jsonl(src, [{"text": "9 9", "title": "1"}])
    real_replace, calls = os.replace, []

    def failing_replace(source, target):
        calls.append(target)
        if len(calls) == 9:  # six moved aside, three renamed into place: then the disk goes away
            raise OSError(5, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output error"):
        prepare_data([str(src)], str(tmp_path / "out"), null_tokenizer(), json_keys=["text", "title"])
    monkeypatch.setattr(os, "replace", real_replace)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "in.jsonl"}
    assert after == before  # every old output back, nothing new, no temporary left


def test_temporaries_of_dead_runs_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [
        tmp_path / f".out_text_document.bin.tmp-{dead.pid}.bin",
        tmp_path / f".out_text_document.idx.old-{dead.pid}.idx",
    ]
    for path in stale:
        path.write_bytes(b"left by a killed run")
    mine = tmp_path / f".out_text_document.bin.tmp-{os.getppid()}.bin"  # a live process's: kept
    mine.write_bytes(b"in use")
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    prepare_data([str(src)], str(tmp_path / "out"), null_tokenizer())
    assert not any(path.exists() for path in stale) and mine.exists()


@pytest.mark.slow  # a prepare-data subprocess, killed
def test_workers_die_with_a_killed_parent(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": " ".join(["1 2 3 4 5 6 7"] * 50)}] * 40000)
    command = [sys.executable, "-m", "stages.main", "prepare-data", str(src), "-o", str(tmp_path / "out"),
               "--tokenizer", "null", "--vocab-size", "10", "--workers", "2"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=os.getcwd())

    def children() -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if entry.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == proc.pid:
                found.append(int(entry))
        return found

    deadline = time.monotonic() + 60
    while len(children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = children()
    assert len(workers) >= 2, "the workers did not start"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15
    while (
        any(
            os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]
            for pid in workers
        )
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    alive = [
        pid
        for pid in workers
        if os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    ]
    assert not alive, f"workers {alive} outlived their killed parent"
