"""Fixtures shared by several test folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mtk.data.indexed import IndexWriter
from mtk.data.prepare import prepare_data
from mtk.data.tokenizer import load_tokenizer

COUNTING_VOCAB = 64


@pytest.fixture
def write_corpus(tmp_path):
    """Factory: write ``documents`` (token lists, one sequence each) as ``tmp_path/NAME.bin/.idx``.

    Returns the prefix as a string.
    """

    def write(name: str, documents: list[list[int]], dtype: type = np.uint16) -> str:
        writer = IndexWriter(np.dtype(dtype))
        writer.add_documents([len(document) for document in documents], [1] * len(documents))
        prefix = tmp_path / name
        tokens = np.array([token for document in documents for token in document], dtype=dtype)
        (tmp_path / f"{name}.bin").write_bytes(tokens.tobytes())
        (tmp_path / f"{name}.idx").write_bytes(writer.to_bytes())
        return str(prefix)

    return write


@pytest.fixture(scope="session")
def counting_data(tmp_path_factory) -> str:
    """A learnable corpus: each document counts upwards modulo the vocabulary from a random start."""
    root = tmp_path_factory.mktemp("data")
    lines = []
    for doc in range(300):
        start = (doc * 7) % COUNTING_VOCAB
        lines.append(
            json.dumps({"text": " ".join(str((start + i) % COUNTING_VOCAB) for i in range(40 + doc % 30))})
        )
    (root / "count.jsonl").write_text("\n".join(lines) + "\n")
    result = prepare_data(
        [str(root / "count.jsonl")], str(root / "count"), load_tokenizer("null", vocab_size=COUNTING_VOCAB)
    )
    return result.outputs["text"]


@pytest.fixture
def kill_during_training():
    """Factory: see ``_kill_during_training``."""
    return _kill_during_training


def _kill_during_training(train_args: list[str], run: Path, after_iteration: int) -> int:
    """Run ``mtk train TRAIN_ARGS --save RUN`` in a subprocess, SIGKILL it once a checkpoint of
    ``after_iteration`` or later is published, and return the iteration it left."""
    from mtk.checkpoint import TRACKER, latest_iteration

    command = [sys.executable, "-m", "stages.main", "train", *train_args, "--save", str(run)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=os.getcwd())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        tracker = run / TRACKER
        if tracker.is_file() and int(tracker.read_text()) >= after_iteration:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = latest_iteration(run)
    assert stopped_at is not None
    return stopped_at


BUNDLED_CORPUS = Path(__file__).resolve().parents[1] / "mtk" / "assets" / "sample.jsonl"


@pytest.fixture(scope="session")
def wordpiece_sentences(tmp_path_factory) -> str:
    """The bundled corpus, one sequence per sentence, with a 2,000-token WordPiece vocabulary trained
    on it (by the CLI, as a user does) and T5's 100 sentinels after it; its prefix."""
    from typer.testing import CliRunner

    from stages.main import app

    root = tmp_path_factory.mktemp("wordpiece")
    for command in (
        ["tokenizer", "train", str(BUNDLED_CORPUS), "--kind", "wordpiece", "--vocab-size", "2000", "-o", str(root / "tok")],
        ["prepare-data", str(BUNDLED_CORPUS), "-o", str(root / "sample"), "-t", str(root / "tok"),
         "--split-sentences", "--vocab-extra-ids", "100", "--workers", "1"],
    ):  # fmt: skip
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 0, result.output
    return str(root / "sample_text_sentence")
