"""The five tiny presets train to the same losses, bit for bit, as recorded: a refactoring of models,
layers, the run builder or the loop that changes any number fails here."""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, run

# preset -> (loss, grad norm) of iterations 1-3, then the final test-split loss (grad norm None);
# `mtk train --preset P --mock-data --train-iters 3 --lr-warmup-iters 1`, fp32 on CPU
RECORDED = {
    "gpt-tiny": [(8.33807373046875, 0.5937231183052063), (8.33872127532959, 0.6197012662887573),
                 (8.328485488891602, 0.5987074375152588), (8.331334114074707, None)],
    "llama-tiny": [(8.328633308410645, 0.3758935332298279), (8.326947212219238, 0.37569570541381836),
                   (8.324848175048828, 0.3773702383041382), (8.325544357299805, None)],
    "bert-tiny": [(9.029346466064453, 1.6963965892791748), (9.013712882995605, 2.113860607147217),
                  (9.052384376525879, 1.4278796911239624), (9.03611946105957, None)],
    "t5-tiny": [(8.343481063842773, 2.306302070617676), (8.338117599487305, 2.1166346073150635),
                (8.239352226257324, 1.7669332027435303), (8.202876091003418, None)],
    "retro-tiny": [(8.33640193939209, 0.9250599145889282), (8.336645126342773, 0.9310463666915894),
                   (8.331604957580566, 0.7729126811027527), (8.32888412475586, None)],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(RECORDED))
def test_tiny_preset_losses_are_bit_identical_to_the_recorded_ones(tmp_path, preset):
    run("train", "--preset", preset, "--mock-data", "--train-iters", "3", "--lr-warmup-iters", "1",
        "--log-interval", "1", "--eval-interval", "0", "--save", str(tmp_path / "run"))  # fmt: skip
    records = read_metrics(tmp_path / "run")
    assert [(r["loss"], r.get("grad_norm")) for r in records] == RECORDED[preset]
