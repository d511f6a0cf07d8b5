"""The workspace's state file: records, paths, the lock under concurrent stages, damage, moved outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtk import workspace as ws
from tests.conftest import run

ROOT = Path(__file__).resolve().parents[2]


def test_records_hold_paths_relative_to_the_root_and_the_newest_wins(workspace, tmp_path):
    (workspace / "data").mkdir()
    workspace.joinpath("data", "a.bin").write_bytes(b"")
    workspace.joinpath("data", "a.idx").write_bytes(b"")
    outside = tmp_path / "elsewhere"
    first = ws.record("dataset", workspace / "data" / "a", "prepare-data", facts={"level": "document"})
    ws.record("dataset", outside, "prepare-data", facts={"level": "sentence"})
    assert first.path == "data/a"
    assert [r.path for r in ws.records("dataset")] == ["data/a", str(outside)]
    assert ws.latest("dataset").path == str(outside)
    assert ws.latest("dataset", lambda r: r.facts["level"] == "document").path == "data/a"
    again = ws.record("dataset", workspace / "data" / "a", "prepare-data", facts={"level": "x"})
    assert [r.path for r in ws.records("dataset")] == [str(outside), "data/a"]  # replaced, newest
    assert ws.location(again) == workspace / "data" / "a"
    assert ws.latest("run") is None
    assert ws.missing(again) is None and ws.missing(ws.records()[0])


def test_concurrent_stages_lose_no_record(workspace):
    code = (
        "import sys; from mtk.workspace import record;"
        "[record('run', f'runs/{sys.argv[1]}-{i}', 'train') for i in range(15)]"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(n)], cwd=workspace, env=os.environ | {"PYTHONPATH": str(ROOT)}
        )
        for n in range(4)
    ]
    assert all(proc.wait(timeout=120) == 0 for proc in procs)
    paths = {r.path for r in ws.records()}
    assert paths == {f"runs/{n}-{i}" for n in range(4) for i in range(15)}


def test_a_damaged_state_file_is_named_with_what_to_do(workspace):
    state = workspace / ".mtk" / "workspace.json"
    state.parent.mkdir()
    for content in ("{not json", '{"records": 3}', '{"records": [{"kind": "run"}]}'):
        state.write_text(content)
        with pytest.raises(ws.WorkspaceError, match="delete it"):
            ws.records()
        output = run("status", code=2)
        assert str(state) in output and "delete it" in output
        output = run("train", "--preset", "gpt-tiny", code=2)
        assert str(state) in output and "delete it" in output


def test_moved_outputs_and_changed_inputs_are_told(workspace):
    source = workspace / "corpus.jsonl"
    source.write_text("{}\n")
    (workspace / "tok").mkdir()
    recorded = ws.record("tokenizer", workspace / "tok", "tokenizer train", inputs=[source])
    assert ws.missing(recorded) is None and ws.stale(recorded) == []
    source.write_text("{}\n{}\n")
    assert ws.stale(recorded) == [ws.shown(source)]
    (workspace / "tok").rename(workspace / "moved")
    assert "no longer there" in ws.missing(recorded)


def test_a_record_never_leads_outside_the_root(workspace, tmp_path):
    (tmp_path / "outside").mkdir()
    (workspace / "link").symlink_to(tmp_path / "outside")
    state = workspace / ".mtk" / "workspace.json"
    state.parent.mkdir()
    crafted = [
        {"kind": "run", "path": path, "stage": "train", "time": 0, "facts": {}, "hashes": {}, "inputs": {}}
        for path in ("../outside", "link")
    ]
    state.write_text(json.dumps({"version": 1, "records": crafted}))
    for found in ws.records():
        assert "outside this folder" in ws.missing(found)
    assert "outside this folder" in run("status")


def test_status_imports_nothing_heavy(workspace):
    code = (
        "import sys; from tests.conftest import invoke; print(invoke('status').output);"
        "print('HEAVY', sorted(m for m in ('torch', 'numpy', 'tokenizers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "nothing recorded yet" in out and "HEAVY []" in out
