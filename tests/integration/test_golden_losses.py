"""The five tiny presets train to the same losses, bit for bit, as recorded: a refactoring of models,
layers, the run builder or the loop that changes any number fails here."""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, run

# preset -> (loss, grad norm) of iterations 1-3, then the final test-split loss (grad norm None);
# `mtk train --preset P --mock-data --train-iters 3 --lr-warmup-iters 1`, fp32 on CPU
RECORDED = {
    "gpt-tiny": [(8.33627700805664, 0.5968223214149475), (8.338988304138184, 0.6205599904060364),
                 (8.330490112304688, 0.6012760400772095), (8.331398010253906, None)],
    "llama-tiny": [(8.327293395996094, 0.37702515721321106), (8.328438758850098, 0.3752639591693878),
                   (8.32411003112793, 0.37842443585395813), (8.325425148010254, None)],
    "bert-tiny": [(9.033210754394531, 1.7229586839675903), (9.012533187866211, 2.210280418395996),
                  (9.048215866088867, 1.4985847473144531), (9.034341812133789, None)],
    "t5-tiny": [(8.332387924194336, 2.2349352836608887), (8.326652526855469, 2.165386199951172),
                (8.23189926147461, 1.6704503297805786), (8.192920684814453, None)],
    "retro-tiny": [(8.334283828735352, 0.9344921112060547), (8.337059020996094, 0.9093707203865051),
                   (8.335859298706055, 0.7862156629562378), (8.32805061340332, None)],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(RECORDED))
def test_tiny_preset_losses_are_bit_identical_to_the_recorded_ones(tmp_path, preset):
    run("train", "--preset", preset, "--mock-data", "--train-iters", "3", "--lr-warmup-iters", "1",
        "--log-interval", "1", "--eval-interval", "0", "--save", str(tmp_path / "run"))  # fmt: skip
    records = read_metrics(tmp_path / "run")
    assert [(r["loss"], r.get("grad_norm")) for r in records] == RECORDED[preset]
