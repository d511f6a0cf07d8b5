"""Fixtures and helpers shared by every test folder: ``mtk`` run in-process as a user runs it
(``invoke``, ``run``) and a run directory's metrics read back (``read_metrics``, ``train_losses``,
``eval_losses``). Test files import the helpers: ``from tests.conftest import run, read_metrics``.

Importing this module stays light (no numpy, torch or tokenizer backends; the fixtures import them when
used): tests that check the CLI's start-up imports run ``invoke`` in a fresh interpreter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

COUNTING_VOCAB = 64


@pytest.fixture(autouse=True)
def workspace(tmp_path_factory, monkeypatch) -> Path:
    """Every test's own empty workspace (``MTK_WORKSPACE``; subprocesses inherit it): no test writes
    into the checkout's, and none inherits what another test's stages produced."""
    root = tmp_path_factory.mktemp("workspace")
    monkeypatch.setenv("MTK_WORKSPACE", str(root))
    return root


def invoke(*args: str | os.PathLike, code: int | None = 0, **kwargs):
    """``mtk ARGS`` run in-process (typer's CliRunner; ``kwargs`` go to its ``invoke``); its result,
    after checking the exit code (``code=None``: not checked)."""
    from typer.testing import CliRunner

    from stages.main import app

    result = CliRunner().invoke(app, [str(arg) for arg in args], **kwargs)
    if code is not None:
        assert result.exit_code == code, result.output or repr(result.exception)
    return result


def run(*args: str | os.PathLike, code: int = 0) -> str:
    """The output of ``mtk ARGS`` on one line (wrapping undone), after checking its exit code; no
    traceback shown."""
    result = invoke(*args, code=None)
    output = " ".join(result.output.split())
    assert result.exit_code == code, output
    assert "Traceback" not in result.output
    return output


def read_metrics(run_dir: str | os.PathLike, split: str | None = None) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl`` in order: all of them (``split=None``), the training
    records (``"train"``: those without a split) or one evaluation split's (``"valid"``, ``"test"``)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    if split is None:
        return records
    return [r for r in records if r.get("split", "train") == split]


def train_losses(run_dir: str | os.PathLike) -> dict[int, float]:
    """Training loss per iteration (a resumed run's later records win)."""
    return {r["iteration"]: r["loss"] for r in read_metrics(run_dir, "train")}


def eval_losses(run_dir: str | os.PathLike) -> dict[tuple[str, int], float]:
    """Evaluation loss per (split, iteration)."""
    return {(r["split"], r["iteration"]): r["loss"] for r in read_metrics(run_dir) if "split" in r}


def state_differences(run_a: Path, run_b: Path) -> str:
    """Where two runs' checkpoints differ, iteration by iteration: the tensors (model and optimizer:
    how many elements, by how much) and the trainer state's fields. Said beside a failed comparison of
    two runs' losses, it tells a difference in what was trained from one in what was reported."""
    import torch

    from mtk.checkpoint import RunDir, load_checkpoint

    def flat(nested: dict) -> dict:
        pending, out = [("", nested)], {}
        while pending:
            name, value = pending.pop()
            if isinstance(value, dict | list | tuple):
                items = value.items() if isinstance(value, dict) else enumerate(value)
                pending += [(f"{name}.{key}" if name else str(key), item) for key, item in items]
            else:
                out[name] = value
        return out

    def same(a, b) -> bool:
        tensors = isinstance(a, torch.Tensor) + isinstance(b, torch.Tensor)
        return torch.equal(a, b) if tensors == 2 else tensors == 0 and a == b

    def what(name: str, a, b) -> str:
        if (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.is_floating_point()
            and a.shape == b.shape
        ):
            return f"{name} ({int((a != b).sum())} elements, up to {(a - b).abs().max().item():.3g})"
        return name if isinstance(a, torch.Tensor) else f"{name} ({a!r:.40} vs {b!r:.40})"

    lines = []
    for iteration in sorted(set(RunDir(run_a).checkpoints()) & set(RunDir(run_b).checkpoints())):
        a, b = (flat(load_checkpoint(run, iteration, parts=("model", "optimizer"))) for run in (run_a, run_b))
        differ = [
            what(name, a.get(name), b.get(name))
            for name in sorted(a.keys() | b.keys())
            if not same(a.get(name), b.get(name))
        ]
        lines.append(
            f"iteration {iteration}: "
            + ("the same" if not differ else f"{len(differ)} entries differ: " + ", ".join(differ[:8]))
        )
    return "; ".join(lines)


@pytest.fixture
def write_corpus(tmp_path):
    """Factory: write ``documents`` (token lists, one sequence each) as ``tmp_path/NAME.bin/.idx``.

    Returns the prefix as a string.
    """

    import numpy as np

    from mtk.data.indexed import IndexWriter

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
    from mtk.data.prepare import prepare_data
    from mtk.data.tokenizer import load_tokenizer

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
    root = tmp_path_factory.mktemp("wordpiece")
    for command in (
        ["tokenizer", "train", str(BUNDLED_CORPUS), "--kind", "wordpiece", "--vocab-size", "2000", "-o", str(root / "tok")],
        ["prepare-data", str(BUNDLED_CORPUS), "-o", str(root / "sample"), "-t", str(root / "tok"),
         "--split-sentences", "--vocab-extra-ids", "100", "--workers", "1"],
    ):  # fmt: skip
        invoke(*command)
    return str(root / "sample_text_sentence")
