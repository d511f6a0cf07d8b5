"""The wheel ships presets and assets and works outside the checkout; the CLI starts light."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mtk.presets import preset_names
from stages.main import COMMANDS
from tests.conftest import invoke

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
        "mtk/assets/gpt2/encoder.json",
        "mtk/assets/gpt2/vocab.bpe",
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
        "print(load_tokenizer(str(asset('tokenizer'))).vocab_size, load_tokenizer('gpt2').vocab_size)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    where, names, vocab = out.stdout.splitlines()
    assert vocab == "4096 50257"  # the bundled tokenizer and GPT-2's (hashes checked) ship too
    cli = subprocess.run(
        [sys.executable, "-m", "mtk.stages.main", "plan", "--preset", "gpt3-175b"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stdout + cli.stderr  # the CLI runs from the installed mtk.stages
    assert where.startswith(str(target))
    assert names.split() == preset_names()


def test_help_lists_every_stage_without_importing_heavy_modules():
    code = (
        "import sys; from tests.conftest import invoke;"
        "r = invoke('--help', terminal_width=300); print(r.output);"
        "print('HEAVY', sorted(m for m in ('torch', 'numpy', 'numba', 'tokenizers', 'pyarrow', 'faiss') if m in sys.modules));"
        "print('STAGES', sorted(m for m in sys.modules if m.startswith('stages.') and m not in ('stages.main', 'stages.common')));"
        "print('RICH_HELP', 'typer.rich_utils' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    for name, (_, _, summary) in COMMANDS.items():
        assert re.search(rf"│ {re.escape(name)} +{re.escape(summary[:60])}", out), name
    assert "--install-completion" in out and "--help, -h" in out
    assert "HEAVY []" in out
    assert "STAGES []" in out and "RICH_HELP False" in out  # each stage's module loads with its command


def test_each_command_loads_its_stage_with_its_summary():
    for name, (_, _, summary) in COMMANDS.items():
        assert invoke(name, "--help", terminal_width=300).output.count(summary[:60]) == 1, name
    assert "No such command 'tra'" in invoke("tra", code=2).output


def test_presets_cli_list_and_show():
    listing = invoke("presets", "list", terminal_width=200)
    for name in preset_names():
        assert name in listing.output
    assert "174.62B" in listing.output and "8.03B" in listing.output
    shown = invoke("presets", "show", "llama3-8b", terminal_width=200)
    assert "8,030,261,248" in shown.output and "13812" in shown.output
    missing = invoke("presets", "show", "gpt5", code=2)
    assert "unknown preset 'gpt5'" in missing.output
