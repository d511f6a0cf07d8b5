"""Data and files as a hostile or unlucky user meets them: odd input lines, foreign tokenizer files,
token ids beyond the vocabulary, caches on shared or read-only disks, outputs that cannot be written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mtk.data import tokenizer as tokenizers
from mtk.data.gpt_dataset import GPTDataset
from mtk.data.helpers import CacheError
from mtk.data.indexed import IndexedDataset
from mtk.data.prepare import PrepareError, prepare_data
from mtk.data.tokenizer import TokenizerError, load_tokenizer
from mtk.generate import generate
from mtk.manifest import data_manifest_path
from mtk.models.gpt import SPEC
from mtk.presets import load_preset
from tests.conftest import run

TRAIN = ["train", "--preset", "gpt-tiny", "--num-workers", "0", "--eval-interval", "0", "--seq-length", "8",
         "--train-iters", "1", "--device", "cpu", "--split", "1"]  # fmt: skip


def jsonl(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def null(vocab_size: int = 100):
    return load_tokenizer("null", vocab_size=vocab_size)


def test_a_line_nested_too_deeply_is_a_bad_line_like_any_other(tmp_path):
    src = jsonl(tmp_path / "in.jsonl", '{"text": "1 2"}', "[" * 100_000, '{"text": "3"}')
    with pytest.raises(PrepareError, match=r"in.jsonl:2: JSON nested too deeply"):
        prepare_data([str(src)], str(tmp_path / "out"), null())
    result = prepare_data([str(src)], str(tmp_path / "out"), null(), on_error="skip")
    assert result.stats.skipped_lines == 1 and result.stats.documents == 2


def test_a_null_value_is_named_as_null(tmp_path):
    src = jsonl(tmp_path / "in.jsonl", '{"text": null}')
    with pytest.raises(PrepareError, match="in.jsonl:1: key 'text' is null, expected a string"):
        prepare_data([str(src)], str(tmp_path / "out"), null())


def test_a_rust_panic_in_the_tokenizer_becomes_an_error_naming_the_files(tmp_path, monkeypatch):
    class PanicException(BaseException):  # what pyo3 raises for a panic inside `tokenizers`
        pass

    def panics(*args, **kwargs):
        raise PanicException("called `Option::unwrap()` on a `None` value")

    monkeypatch.setattr(tokenizers, "gpt2_core", panics)
    folder = Path(tokenizers.__file__).parent.parent / "assets" / "tokenizer"
    with pytest.raises(TokenizerError, match="vocab.json and merges.txt do not fit together .*unwrap"):
        load_tokenizer(str(folder))


def test_token_ids_beyond_the_vocabulary_are_refused_naming_file_id_and_vocabulary(tmp_path, write_corpus):
    prefix = write_corpus("megatron", [[1, 2, 3, 57, 4, 5, 6, 7, 8, 9]] * 20)  # no manifest
    output = run(*TRAIN, "--data", prefix, "--save", str(tmp_path / "run"), "--vocab-size", "40", code=2)
    assert f"{prefix}.bin holds token id 57, outside this run's vocabulary of 40 tokens" in output
    src = jsonl(tmp_path / "in.jsonl", *['{"text": "1 2 3 4 5 6 7 8 9 99"}'] * 20)
    prepared = prepare_data([str(src)], str(tmp_path / "p"), null(100)).outputs["text"]
    manifest = json.loads(data_manifest_path(prepared).read_text())
    data_manifest_path(prepared).write_text(json.dumps({**manifest, "vocab_size": 50}))  # understated
    assert "holds token id 99, outside this run's vocabulary of 50" in run(
        *TRAIN, "--data", prepared, "--save", str(tmp_path / "run2"), code=2
    )
    model = SPEC.build(load_preset("gpt-tiny").config.model)
    with pytest.raises(ValueError, match="token id 5000 is outside the model's vocabulary of 4096"):
        generate(model, [1, 5000], 3)


def test_caches_are_shared_with_the_umask_and_a_read_only_folder_points_to_the_cache_option(
    tmp_path, write_corpus
):
    prefix = write_corpus("corpus", [[1, 2, 3, 4, 5]] * 30)
    previous = os.umask(0o022)
    try:
        GPTDataset(IndexedDataset(prefix), "1", 0, 10, 4, seed=1)
    finally:
        os.umask(previous)
    modes = {oct(p.stat().st_mode & 0o777) for p in (tmp_path / ".mtk-cache").iterdir()}
    assert modes == {"0o644"}  # not 0o600: another user training on this data can read them
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(
        CacheError, match=r"cannot write the sample-index cache in .*a-file/cache .* give --data-cache-path"
    ):
        GPTDataset(IndexedDataset(prefix), "1", 0, 11, 4, seed=1, cache_dir=blocked / "cache")


def test_a_damaged_cache_entry_is_built_again(tmp_path, write_corpus):
    prefix = write_corpus("corpus", [[1, 2, 3, 4, 5]] * 30)
    first = GPTDataset(IndexedDataset(prefix), "1", 0, 10, 4, seed=1)
    for path in (tmp_path / ".mtk-cache").glob("*-shuffle_index.npy"):
        path.write_bytes(path.read_bytes()[:20])
    again = GPTDataset(IndexedDataset(prefix), "1", 0, 10, 4, seed=1)
    assert again.built_indices and np.array_equal(again.shuffle_index, first.shuffle_index)


def test_outputs_that_cannot_be_written_are_one_line_naming_path_and_cause(tmp_path, write_corpus):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    src = jsonl(tmp_path / "in.jsonl", '{"text": "1 2"}')
    prefix = write_corpus("corpus", [[1, 2, 3]] * 4)
    assert f"{blocked}: a file is in the way, where a folder is needed" in run(
        "prepare-data", str(src), "-o", str(blocked / "out"), "-t", "null", "--vocab-size", "10", code=2
    )
    other = write_corpus("other", [[4, 5]] * 4)
    assert f"{blocked}/m" in run("merge-data", prefix, other, "-o", str(blocked / "m"), code=2)
    assert f"{blocked}/run: Not a directory" in run(
        *TRAIN, "--mock-data", "--save", str(blocked / "run"), code=2
    )
    assert f"{blocked}/tb: Not a directory" in run(
        *TRAIN, "--mock-data", "--save", str(tmp_path / "r"), "--tensorboard-dir", str(blocked / "tb"), code=2
    )
    assert "--json /dev/full: No space left on device" in run(
        "bench",
        "--preset",
        "gpt-tiny",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--seq-length",
        "8",
        "--json",
        "/dev/full",
        code=2,
    )


def test_unclear_inputs_get_clear_messages(tmp_path, write_corpus):
    prefix = write_corpus("corpus", [[1, 2, 3]] * 4)
    Path(prefix + ".idx").write_bytes(b"")
    assert f"{prefix}.idx: empty file, not an MMIDIDX index" in run(
        *TRAIN, "--data", prefix, "--save", str(tmp_path / "r"), "--vocab-size", "10", code=2
    )
    good = write_corpus("good", [[1, 2, 3]] * 4)
    data_manifest_path(good).write_text("[1, 2]")
    assert "good.mtk.json: expected a JSON object, found a list" in run(
        *TRAIN, "--data", good, "--save", str(tmp_path / "r2"), code=2
    )
    again = write_corpus("again", [[1, 2, 3]] * 4)
    before = Path(again + ".bin").read_bytes()
    assert "is one of the inputs" in run("merge-data", again, again, "-o", again, code=2)
    assert Path(again + ".bin").read_bytes() == before
    src = jsonl(tmp_path / "in.jsonl", '{"text": "1 2"}')
    folder = str(tmp_path / "out") + os.sep
    assert "names a folder; give DIR/NAME" in run(
        "prepare-data", str(src), "-o", folder, "-t", "null", "--vocab-size", "10", code=2
    )
    assert "names no key" in run(
        "prepare-data",
        str(src),
        "-o",
        str(tmp_path / "o"),
        "-t",
        "null",
        "--vocab-size",
        "10",
        "--json-keys",
        ",",
        code=2,
    )
    assert not list(tmp_path.glob("o_*")) and not (tmp_path / "out").exists()


def test_a_binary_tracker_is_named_not_a_codec_error(tmp_path):
    run_dir = tmp_path / "run"
    run(*TRAIN, "--mock-data", "--save", str(run_dir), code=0)
    (run_dir / "latest_checkpointed_iteration.txt").write_bytes(b"\xff\xfe\x00garbage")
    output = run(*TRAIN, "--mock-data", "--save", str(run_dir), "--train-iters", "2", code=2)
    assert "latest_checkpointed_iteration.txt: unreadable" in output
