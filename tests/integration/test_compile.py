"""`--compile`: torch.compile per transformer block, in place (mtk/parallel/compile.py).

Tolerance: compiled and eager fp32 losses agree within 1e-4 relative over 50 steps (inductor fuses
and reorders reductions, so the two runs differ by rounding, about 1e-6 per step); FP8 (emulated) within
1e-3, as its casts amplify those roundings. Checkpoints keep the eager model's parameter names, so a run
written compiled resumes eager and back. Resume after SIGKILL, compiled before and after, is bit-exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtk.checkpoint import load_checkpoint
from mtk.config import apply_overrides
from mtk.models import family_names, family_spec
from mtk.parallel.compile import RECOMPILES_TOLERATED, CompilePlan, compile_wanted
from mtk.presets import load_preset
from mtk.train.build import build_model
from tests.conftest import invoke, read_metrics, state_differences

TOLERANCE = 1e-4
FP8_TOLERANCE = 1e-3
COMMON = ["--mock-data", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
          "--log-interval", "1", "--eval-interval", "0", "--num-workers", "0", "--device", "cpu"]  # fmt: skip
PRESET_ARGS = {
    "t5-tiny": ["--set", "decoder_seq_length=16"],  # holds the spans of 32-token samples
    "retro-tiny": ["--set", "retro_chunk_length=8"],
}


def train(preset: str, save: Path, *args: str) -> str:
    torch._dynamo.reset()  # each run in its own state, as in its own process
    command = ["train", "--preset", preset, *COMMON, *PRESET_ARGS.get(preset, []), "--save", str(save), *args]
    return invoke(*command).output


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run, "train")]


def tiny_config(preset: str, **values):
    return apply_overrides(load_preset(preset).sections, {"mock_data": True, "train_iters": 2, **values})


# ---- fast: what is built and said ----------------------------------------------------------------


@pytest.mark.parametrize("recompute", [None, "full", "selective"])
def test_compiled_model_keeps_the_eager_parameter_names_and_says_it_compiled(recompute):
    eager = build_model(tiny_config("llama-tiny", recompute_granularity=recompute, compile=False))
    compiled = build_model(tiny_config("llama-tiny", recompute_granularity=recompute, compile=True))
    assert list(compiled.module.state_dict()) == list(eager.module.state_dict())
    assert [n for n, _ in compiled.module.named_parameters()] == [
        n for n, _ in eager.module.named_parameters()
    ]
    assert not any("_orig_mod" in name for name in compiled.module.state_dict())
    assert "torch.compile per transformer block (2 blocks, inductor; --compile)" in compiled.describe()
    assert "torch.compile off (--no-compile)" in eager.describe()
    assert compiled.model.compiled.blocks == ["decoder.layers.0", "decoder.layers.1"]


def test_compile_defaults_on_for_cuda_and_off_on_cpu_and_forward_builds_stay_eager():
    config = tiny_config("gpt-tiny")
    assert config.train.compile is None
    assert compile_wanted(config, "cuda:0")[0] and not compile_wanted(config, "cpu")[0]
    assert "the default on CPU" in build_model(config).describe()
    forward_only = build_model(tiny_config("gpt-tiny", compile=True), training=False)
    assert (
        not forward_only.model.compiled.enabled
    )  # built for forward use: eager (mtk generate compiles its own decode step)


def test_a_recompile_storm_is_named_once():
    said: list[str] = []
    plan = CompilePlan(True, "--compile", warn=said.append)
    for _ in range(RECOMPILES_TOLERATED + 3):
        before = plan.graphs
        plan.graphs += 2  # as the backend counts: a call that compiled two graphs (a graph break)
        plan.called("decoder.layers.0", before)
        plan.called("decoder.layers.0", plan.graphs)  # a call served from the cache: not counted
    assert plan.compiles["decoder.layers.0"] == RECOMPILES_TOLERATED + 3
    assert len(said) == 1
    assert said[0].startswith(f"warning: block decoder.layers.0 recompiled {RECOMPILES_TOLERATED + 1} times")


def test_compile_flag_and_manifest(tmp_path):
    output = train("gpt-tiny", tmp_path / "run", "--train-iters", "1", "--no-compile")
    assert "torch.compile off (--no-compile)" in output
    manifest = json.loads((tmp_path / "run" / "mtk.json").read_text())
    assert manifest["compile"] == {"enabled": False, "what": None, "reason": "--no-compile", "blocks": 0}


# ---- slow: compiled runs -------------------------------------------------------------------------


def tiny_presets() -> list[str]:
    return [p for p in dict.fromkeys(family_spec(name).tiny_preset for name in family_names()) if p]


@pytest.mark.slow  # compiles every family's blocks
@pytest.mark.parametrize("preset", tiny_presets())
def test_compiled_losses_match_eager_over_50_steps(preset, tmp_path):
    train(preset, tmp_path / "eager", "--train-iters", "50", "--no-compile")
    output = train(preset, tmp_path / "compiled", "--train-iters", "50", "--compile")
    assert "torch.compile per transformer block" in output and "recompiled" not in output
    manifest = json.loads((tmp_path / "compiled" / "mtk.json").read_text())
    assert manifest["compile"]["enabled"] is True and manifest["compile"]["what"] == "per transformer block"
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(compiled) == 50
    assert compiled == pytest.approx(eager, rel=TOLERANCE)


@pytest.mark.slow  # FP8 (torchao, emulated) compiled
def test_llama_fp8_tensorwise_trains_compiled_within_tolerance_of_eager(tmp_path):
    fp8 = ["--train-iters", "20", "--fp8", "hybrid", "--fp8-recipe", "tensorwise"]
    train("llama-tiny", tmp_path / "eager", *fp8, "--no-compile")
    output = train("llama-tiny", tmp_path / "compiled", *fp8, "--compile")
    assert (
        "FP8 hybrid, tensorwise scaling, torchao" in output
        and "torch.compile per transformer block" in output
    )
    assert "recompiled" not in output  # torchao's graph breaks are not recompiles
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=FP8_TOLERANCE)


@pytest.mark.slow  # compiled and eager halves of one run
@pytest.mark.parametrize(("first", "then"), [("--compile", "--no-compile"), ("--no-compile", "--compile")])
def test_a_checkpoint_written_one_way_resumes_the_other(first, then, tmp_path):
    run = tmp_path / "run"
    train("gpt-tiny", tmp_path / "whole", "--train-iters", "6", "--no-compile")
    train("gpt-tiny", run, "--train-iters", "6", "--save-interval", "3", "--exit-after", "3", first)
    names = set(load_checkpoint(run)["model"])  # as the eager model names them, no _orig_mod.
    assert names == set(build_model(tiny_config("gpt-tiny", compile=False)).module.state_dict())
    output = train("gpt-tiny", run, "--train-iters", "6", then)
    assert "resumed from iteration 3" in output
    assert losses(run) == pytest.approx(losses(tmp_path / "whole"), rel=TOLERANCE)


@pytest.mark.slow  # training subprocesses, one killed
def test_compiled_resume_after_sigkill_is_bit_exact(tmp_path, kill_during_training):
    args = ["--preset", "gpt-tiny", *COMMON, "--train-iters", "12", "--save-interval", "4", "--compile"]
    train("gpt-tiny", tmp_path / "whole", "--train-iters", "12", "--compile")
    run = tmp_path / "run"
    stopped_at = kill_during_training(args, run, 4)
    assert 4 <= stopped_at < 12
    output = train("gpt-tiny", run, "--train-iters", "12", "--save-interval", "4", "--compile")
    assert f"resumed from iteration {stopped_at}" in output
    assert losses(run) == losses(tmp_path / "whole"), state_differences(tmp_path / "whole", run)  # bit-exact
