"""`mtk train --fp8` on CPU (torchao, emulated): FP8 really applied yet tracking fp32, overflows
named, resume exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtk.checkpoint import latest_iteration
from tests.conftest import invoke, read_metrics, state_differences

BASE = ["--preset", "llama-tiny", "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--log-interval", "1", "--eval-interval", "0", "--num-workers", "0", "--device", "cpu",
        "--split", "90,5,5"]  # fmt: skip


def train(*args: str) -> str:
    return invoke("train", *BASE, *args).output


def records(run: Path) -> list[dict]:
    return read_metrics(run, "train")


@pytest.mark.slow  # 100 steps twice, FP8 emulated
def test_fp8_differs_from_fp32_yet_tracks_its_loss(tmp_path, counting_data):
    common = ["--data", counting_data, "--train-iters", "100", "--lr", "3e-3"]
    train(*common, "--save", str(tmp_path / "fp32"))
    output = train(*common, "--fp8", "hybrid", "--save", str(tmp_path / "fp8"))
    assert "FP8 hybrid, tensorwise scaling, torchao, emulated (no FP8 hardware), 10 linears" in output
    assert "torchao has no delayed scaling: tensorwise current scaling instead" in output  # said, not silent
    fp32, fp8 = records(tmp_path / "fp32"), records(tmp_path / "fp8")
    assert [r["loss"] for r in fp32] != [r["loss"] for r in fp8]  # FP8 is really applied
    # tolerance: the last 10 steps' mean loss within 5% of fp32's, having fallen below half the start
    last32, last8 = (sum(r["loss"] for r in run[-10:]) / 10 for run in (fp32, fp8))
    assert abs(last8 - last32) <= 0.05 * last32 and last8 < 0.5 * fp8[0]["loss"]
    assert all(0 < r["fp8_amax"] < 1e4 and r["fp8_amax_at"].startswith("decoder.layers.") for r in fp8)
    manifest = json.loads((tmp_path / "fp8" / "mtk.json").read_text())
    assert manifest["fp8"]["recipe"] == "tensorwise" and manifest["fp8"]["requested_recipe"] == "delayed"
    assert manifest["fp8"]["emulated"] is True and manifest["fp8"]["linears"] == 10


def test_an_fp8_overflow_stops_naming_the_iteration_and_the_linear(tmp_path):
    result = invoke("train", *BASE, "--mock-data", "--train-iters", "3", "--fp8", "hybrid",
                                 "--set", "init_method_std=1e25", "--save", str(tmp_path / "run"), code=None)  # fmt: skip
    assert result.exit_code != 0
    assert "iteration 1:" in result.output and "the largest FP8 amax:" in result.output
    assert " weight)" in result.output and "decoder.layers." in result.output  # the overflowing weights


def test_fp8_is_refused_with_fp16(tmp_path):
    result = invoke("train", *BASE, "--mock-data", "--train-iters", "1", "--fp8", "hybrid", "--fp16",
                                 "--save", str(tmp_path / "r"), code=None)  # fmt: skip
    assert result.exit_code != 0 and "FP8 runs with bf16 or fp32 weights, not fp16" in result.output


@pytest.mark.slow  # training subprocesses, one killed
def test_fp8_resume_after_sigkill_is_exact(tmp_path, counting_data, kill_during_training):
    args = [*BASE, "--data", counting_data, "--train-iters", "24", "--fp8", "hybrid", "--save-interval", "4"]
    runner_args = args[:]
    result = invoke("train", *runner_args, "--save", str(tmp_path / "straight"), code=None)
    assert result.exit_code == 0, result.output
    assert kill_during_training(args, tmp_path / "killed", 8) < 24
    result = invoke("train", *runner_args, "--save", str(tmp_path / "killed"), code=None)
    assert result.exit_code == 0, result.output
    assert latest_iteration(tmp_path / "killed") == 24

    def losses(run: Path) -> dict[int, float]:
        return {r["iteration"]: r["loss"] for r in records(run)}

    assert losses(tmp_path / "straight") == losses(tmp_path / "killed"), state_differences(
        tmp_path / "straight", tmp_path / "killed"
    )


@pytest.mark.parametrize(
    "flag", ["--fp8", "--compare-fp8"]
)  # the design card's name, and one that never clashes
def test_bench_fp8_compares_with_the_published_table_and_claims_no_emulated_speedup(tmp_path, flag):
    out = tmp_path / "bench.json"
    result = invoke("bench", flag, "--preset", "llama-tiny", "--iters", "2", "--warmup", "1",
                                 "--seq-length", "32", "--json", str(out), code=None)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "FP8 (emulated)" in result.output and "no speed-up is claimed" in result.output
    assert "13,812" in result.output  # llama3-8b's published tokens/s per GPU, beside the figures
    report = json.loads(out.read_text())
    assert report["emulated"] is True and report["speedup"] is None and report["ratio_to_published"] is None
    assert report["baseline"]["fp8"] is None and report["fp8"]["fp8"].startswith("FP8 hybrid")
    assert report["published"]["llama3-8b"]["tokens_per_s_per_gpu"] == 13812
    assert report["fp8"]["tokens_per_s"] > 0 and report["baseline"]["tokens_per_s"] > 0
