"""The wheel ships presets and assets and works outside the checkout; the CLI starts light."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtk.presets import preset_names
from stages.main import app

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("mtk-*.whl")
    return path


@pytest.mark.slow  # builds and installs the wheel
def test_wheel_contains_packages_presets_and_assets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "mtk").rglob("*.py")}
    sources |= {f"mtk/stages/{p.name}" for p in (ROOT / "stages").glob("*.py")}  # the CLI ships inside mtk
    assert sources <= names, f"missing from the wheel: {sorted(sources - names)}"
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"mtk"}  # no generic top-level name such as `stages` taken in site-packages
    assert {
        "mtk/assets/tokenizer/vocab.json",
        "mtk/assets/tokenizer/merges.txt",
        "mtk/assets/NOTICE.txt",
    } <= names
    for preset in preset_names():
        assert f"mtk/preset_files/{preset}.toml" in names
    assert {"mtk/assets/sample.jsonl", "mtk/stages/main.py", "mtk/data/indexed.py"} <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mtk = mtk.stages.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow  # builds and installs the wheel
def test_installed_wheel_finds_presets_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import mtk.presets as p; print(p.__file__); print(' '.join(p.preset_names()));"
        "from mtk.quickstart import asset; from mtk.data.tokenizer import load_tokenizer;"
        "import mtk.train.loop, mtk.parallel.apply, mtk.models.gpt;"
        "print(load_tokenizer(str(asset('tokenizer'))).vocab_size);"
        "from typer.testing import CliRunner; from mtk.stages.main import app;"
        "print(CliRunner().invoke(app, ['plan', '--preset', 'gpt3-175b']).exit_code)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    where, names, vocab, cli = out.stdout.splitlines()
    assert vocab == "4096"  # the bundled tokenizer ships too
    assert cli == "0"  # the CLI runs from the installed mtk.stages
    assert where.startswith(str(target))
    assert names.split() == preset_names()


def test_help_lists_every_stage_without_importing_heavy_modules():
    code = (
        "import sys; from typer.testing import CliRunner; from stages.main import app;"
        "r = CliRunner().invoke(app, ['--help']); print(r.output);"
        "print('HEAVY', sorted(m for m in ('torch', 'numpy', 'numba', 'tokenizers', 'pyarrow', 'faiss') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    for stage in ("prepare-data", "merge-data", "presets", "tokenizer"):
        assert stage in out
    assert "HEAVY []" in out


def test_presets_cli_list_and_show():
    runner = CliRunner()
    listing = runner.invoke(app, ["presets", "list"], terminal_width=200)
    assert listing.exit_code == 0
    for name in preset_names():
        assert name in listing.output
    assert "174.62B" in listing.output and "8.03B" in listing.output
    shown = runner.invoke(app, ["presets", "show", "llama3-8b"], terminal_width=200)
    assert shown.exit_code == 0
    assert "8,030,261,248" in shown.output and "13812" in shown.output
    missing = runner.invoke(app, ["presets", "show", "gpt5"])
    assert missing.exit_code == 2 and "unknown preset 'gpt5'" in missing.output
