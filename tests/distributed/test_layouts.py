"""Every parallel layout computes what one process computes, resumes exactly, and reshards checkpoints.

CPU, gloo, 2 or 4 processes under torchrun, tiny models without dropout. Reference: one process on
the same global batch. Tolerance: 1e-5 relative (reduction order differs between layouts; measured
differences are about 1e-7).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtk.checkpoint import latest_iteration, load_checkpoint
from mtk.config import apply_overrides
from mtk.models import family_names, family_spec
from mtk.presets import load_preset
from tests.conftest import invoke, read_metrics

pytestmark = pytest.mark.slow  # several processes under torchrun

ITERS = 4
COMMON = ["--mock-data", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
          "--train-iters", str(ITERS), "--log-interval", "1", "--eval-interval", "0", "--set", "eval_iters=1",
          "--set", "num_layers=4", "--num-workers", "0", "--device", "cpu"]  # fmt: skip
TOLERANCE = 1e-5


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run, "train")]


PRESET_ARGS = {
    "t5-tiny": ["--set", "decoder_seq_length=16"],  # holds the spans of 32-token samples
    "retro-tiny": ["--set", "num_layers=6", "--set", "retro_chunk_length=8"],  # one CCA layer, 4 chunks
}


def train(preset: str, save: Path, *args: str, ranks: int = 1) -> None:
    command = ["train", "--preset", preset, *COMMON, *PRESET_ARGS.get(preset, []), "--save", str(save), *args]
    if ranks == 1:
        result = invoke(*command, code=None)
        assert result.exit_code == 0, result.output
        return
    proc = subprocess.run(
        [sys.executable, "-m", "stages.main", *command, "--nproc-per-node", str(ranks)],
        capture_output=True,
        text=True,
        cwd=os.getcwd(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, list[float]]:
    """Single-process losses of gpt-tiny (tied, biases, learned positions), llama-tiny (untied, RoPE,
    GQA), bert-tiny (padding mask, token types, MLM + SOP heads), t5-tiny (cross-attention) and retro-tiny
    (chunked cross-attention, the retrieval encoder)."""
    runs = {}
    for preset in dict.fromkeys(preset for _, preset in CASES):
        run = tmp_path_factory.mktemp(preset)
        train(preset, run)
        runs[preset] = losses(run)
        assert len(runs[preset]) == ITERS
    return runs


LAYOUTS = {
    "TP2": (["--tp", "2"], 2),
    "PP2 1F1B": (["--pp", "2"], 2),
    "PP2 interleaved (VP2)": (["--pp", "2", "--vp", "2"], 2),
    "CP2": (["--cp", "2"], 2),
    "DP2 FSDP": (["--data-parallel-sharding-strategy", "optim_grads_params"], 2),
    "DP2 distributed optimizer": (["--use-distributed-optimizer"], 2),
    "TP2xPP2": (["--tp", "2", "--pp", "2"], 4),
    "DP2xTP2": (["--tp", "2", "--data-parallel-sharding-strategy", "optim_grads_params"], 4),
    "CP2xTP2": (["--cp", "2", "--tp", "2"], 4),
}


# gpt-tiny everywhere; llama-tiny where GQA, RoPE and the untied output meet the layout
# (DP2 FSDP alone is in DP2xTP2, which shards with FSDP2 too)
CASES = [(layout, "gpt-tiny") for layout in LAYOUTS if layout != "DP2 FSDP"] + [
    (layout, "llama-tiny") for layout in ("TP2", "PP2 1F1B", "CP2")
]
# every other registered family, on its tiny preset (``tiny_preset``): the layouts its own structure
# meets (tensor-parallel plans, pipeline cuts, context shards, FSDP units) and it can run (those its
# ``layout_problems`` refuse are left out); data parallelism alone is family-independent
FAMILY_LAYOUTS = {
    "TP2": {"tensor_model_parallel_size": 2},
    "PP2 1F1B": {"pipeline_model_parallel_size": 2},
    "CP2": {"context_parallel_size": 2},
    "DP2 FSDP": {"data_parallel_sharding_strategy": "optim_grads_params"},
}


def family_cases() -> list[tuple[str, str]]:
    cases = []
    for spec in map(family_spec, family_names()):
        if spec.tiny_preset is None or spec.tiny_preset == "gpt-tiny":
            continue
        sections = load_preset(spec.tiny_preset).sections
        for layout, overrides in FAMILY_LAYOUTS.items():
            if not spec.layout_problems(apply_overrides(sections, overrides)):
                cases.append((layout, spec.tiny_preset))
    return cases


CASES += family_cases()


@pytest.mark.parametrize(("layout", "preset"), CASES)
def test_layout_losses_match_one_process(layout, preset, reference, tmp_path):
    args, ranks = LAYOUTS[layout]
    train(preset, tmp_path / "run", *args, ranks=ranks)
    assert losses(tmp_path / "run") == pytest.approx(reference[preset], rel=TOLERANCE)


# Google's T5 on t5-tiny: relative positions (a bias table per stack, split over heads by TP), RMSNorm,
# no biases; v1.0's ReLU MLP and tied head, v1.1's gated GELU and untied output layer
T5_SHAPES = {
    "v1.0": ["relu=true"],
    "v1.1": ["geglu=true", "openai_gelu=true", "untie_embeddings_and_output_weights=true"],
}


@pytest.mark.parametrize("shape", T5_SHAPES)
def test_t5_relative_positions_under_tp2_match_one_process(shape, tmp_path):
    google = ["position_embedding_type=relative", "normalization=RMSNorm", "add_bias_linear=false"]
    args = [arg for setting in google + T5_SHAPES[shape] for arg in ("--set", setting)]
    train("t5-tiny", tmp_path / "one", *args)
    train("t5-tiny", tmp_path / "tp2", *args, "--tp", "2", ranks=2)
    assert losses(tmp_path / "tp2") == pytest.approx(losses(tmp_path / "one"), rel=TOLERANCE)


def test_gradients_reduced_in_bf16_change_the_updates_slightly(reference, tmp_path):
    train("gpt-tiny", tmp_path / "run", "--use-distributed-optimizer", "--grad-reduce-in-bf16", ranks=2)
    result = losses(tmp_path / "run")
    assert result[0] == pytest.approx(reference["gpt-tiny"][0], rel=TOLERANCE)  # before any update
    assert result != reference["gpt-tiny"]  # rounded gradients: other updates ...
    assert result == pytest.approx(reference["gpt-tiny"], rel=1e-3)  # ... close to the fp32 ones


def test_same_layout_resume_is_exact_with_async_save(reference, tmp_path):
    """CP2xTP2 and PP2: stop at iteration 2 (checkpoint written in the background), resume, same losses."""
    run = tmp_path / "run"
    args = ["--cp", "2", "--pp", "2", "--async-save", "--set", "save_interval=1"]
    train("gpt-tiny", run, *args, "--exit-after", "2", ranks=4)
    assert latest_iteration(run) == 2
    train("gpt-tiny", run, *args, ranks=4)
    assert losses(run) == pytest.approx(reference["gpt-tiny"], rel=TOLERANCE)


def test_checkpoint_reshards_tp2_pp2_to_one_process(reference, tmp_path):
    run = tmp_path / "run"
    train("gpt-tiny", run, "--tp", "2", "--pp", "2", "--exit-after", "2", ranks=4)
    shards = sorted(p.name for p in (run / "iter_0000002").glob("*.distcp"))
    assert len(shards) == 4  # every rank wrote its own
    train("gpt-tiny", run)  # TP1 x PP1 continues
    assert losses(run) == pytest.approx(reference["gpt-tiny"], rel=TOLERANCE)
    # the tools see whole tensors, named as in a single-process model
    weights = load_checkpoint(run)["model"]
    assert weights["embedding.weight"].shape == (4096, 64) and "decoder.layers.3.mlp.fc1.weight" in weights
    result = invoke("checkpoint", "convert", str(run), "-o", str(tmp_path / "w.safetensors"), code=None)
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "w.safetensors")
    assert set(exported) == set(weights) and torch.equal(
        exported["embedding.weight"], weights["embedding.weight"]
    )


def test_checkpoint_reshards_dp4_to_dp2_and_one_process_to_tp2(reference, tmp_path):
    fsdp = ["--data-parallel-sharding-strategy", "optim_grads_params"]
    dp = tmp_path / "dp"
    train("llama-tiny", dp, *fsdp, "--exit-after", "2", ranks=4)
    train("llama-tiny", dp, *fsdp, ranks=2)
    assert losses(dp) == pytest.approx(reference["llama-tiny"], rel=TOLERANCE)
    tp = tmp_path / "tp"
    train("llama-tiny", tp, "--exit-after", "2")
    train("llama-tiny", tp, "--tp", "2", ranks=2)
    assert losses(tp) == pytest.approx(reference["llama-tiny"], rel=TOLERANCE)


def test_fp16_loss_scaling_agrees_across_tp2_pp2(tmp_path):
    """The loss scaler sees every rank's gradients (sharded scaler): same losses and loss scales as one process."""

    def records(run: Path) -> list[tuple[float, float]]:
        return [(r["loss"], r["loss_scale"]) for r in read_metrics(run, "train")]

    fp16 = ["--fp16", "--initial-loss-scale", "65536"]  # Megatron's 2^32 overflows every step of this run
    train("gpt-tiny", tmp_path / "one", *fp16)
    train("gpt-tiny", tmp_path / "tp_pp", *fp16, "--tp", "2", "--pp", "2", ranks=4)
    one, parallel = records(tmp_path / "one"), records(tmp_path / "tp_pp")
    assert [scale for _, scale in parallel] == [scale for _, scale in one]
    assert [loss for loss, _ in parallel] == pytest.approx([loss for loss, _ in one], rel=1e-4)


def test_a_ramp_phase_with_fewer_micro_batches_than_stages_matches_one_process(tmp_path):
    """The GPT-3 ramp's first phases give a pipeline fewer micro-batches than stages: GPipe runs them
    (1 micro-batch on 2 stages here), 1F1B the later phases (4), with the same losses as one process."""
    ramp = [
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "8",
        "--set",
        "batch_size_ramp=[[0, 2], [128, 8]]",
    ]
    train("gpt-tiny", tmp_path / "one", *ramp)
    train("gpt-tiny", tmp_path / "pp", *ramp, "--pp", "2", ranks=2)
    records = read_metrics(tmp_path / "pp")
    assert [r["global_batch_size"] for r in records if "split" not in r] == [2, 2, 8, 8]
    assert losses(tmp_path / "pp") == pytest.approx(losses(tmp_path / "one"), rel=TOLERANCE)


def test_fp8_layouts_match_one_process_with_fp8(tmp_path):
    """torchao's FP8 linears (emulated) under DTensor TP, FSDP2 gathering the weights in FP8, PP and
    CP: per-tensor amaxes are taken over the whole tensors, so the losses are one process's, up to
    reduction order in FP8 rounding."""
    fp8 = ["--fp8", "hybrid", "--fp8-recipe", "tensorwise"]
    train("llama-tiny", tmp_path / "one", *fp8)
    one = losses(tmp_path / "one")
    layouts = {
        "tp": ["--tp", "2"],
        "fsdp": ["--data-parallel-sharding-strategy", "optim_grads_params"],
        "pp": ["--pp", "2"],
        "cp": ["--cp", "2"],
    }
    for name, args in layouts.items():
        train("llama-tiny", tmp_path / name, *fp8, *args, ranks=2)
        assert losses(tmp_path / name) == pytest.approx(one, rel=1e-4), name
    manifest = json.loads((tmp_path / "fsdp" / "mtk.json").read_text())
    assert manifest["fp8"]["fsdp_all_gather"] is True
