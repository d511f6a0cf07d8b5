"""The compiled subset of the layout tests: `--compile` (torch.compile per transformer block) under TP2,
PP2 (1F1B), CP2, DP2 FSDP2 and FP8 with DP2 FSDP2, on 2 CPU processes (gloo), each against one eager
process on the same global batch. Tolerance: 1e-4 relative (compiled kernels round differently from
eager ones; measured differences are about 1e-6), 1e-3 with FP8 (emulated), whose casts amplify them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.test_layouts import LAYOUTS, losses, train

pytestmark = pytest.mark.slow  # several processes under torchrun, compiling

TOLERANCE = 1e-4
FP8_TOLERANCE = 1e-3
FP8 = ["--fp8", "hybrid", "--fp8-recipe", "tensorwise"]
COMPILED = {  # name -> (layout of test_layouts.LAYOUTS, extra arguments)
    "TP2": ("TP2", []),
    "PP2 1F1B": ("PP2 1F1B", []),
    "CP2": ("CP2", []),
    "DP2 FSDP": ("DP2 FSDP", []),
    "DP2 FSDP + FP8": ("DP2 FSDP", FP8),
}


@pytest.fixture(scope="module")
def eager(tmp_path_factory) -> dict[bool, list[float]]:
    """One eager process of gpt-tiny, without and with FP8."""
    runs = {}
    for fp8 in (False, True):
        run: Path = tmp_path_factory.mktemp("eager")
        train("gpt-tiny", run, "--no-compile", *(FP8 if fp8 else []))
        runs[fp8] = losses(run)
    return runs


@pytest.mark.parametrize("case", COMPILED)
def test_compiled_layout_matches_one_eager_process(case, eager, tmp_path):
    layout, extra = COMPILED[case]
    args, ranks = LAYOUTS[layout]
    train("gpt-tiny", tmp_path / "run", *args, *extra, "--compile", ranks=ranks)
    fp8 = bool(extra)
    assert losses(tmp_path / "run") == pytest.approx(eager[fp8], rel=FP8_TOLERANCE if fp8 else TOLERANCE)
