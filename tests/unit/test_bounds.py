"""Every value that sizes a resource has an upper bound: huge or absurd numbers on the command line,
in a checkpoint's description or in a Hugging Face config.json end in one message naming the flag
or key, the value and the range (or the size and the memory available), before anything is
allocated or started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtk.checkpoint import RunDir
from mtk.config import ConfigError, RunConfig
from mtk.models import family_spec
from mtk.presets import load_preset
from tests.conftest import run

HUGE = str(10**30)
T = ["train", "--preset", "gpt-tiny", "--mock-data", "--num-workers", "0", "--eval-interval", "0",
     "--seq-length", "16", "--log-interval", "1", "--device", "cpu", "--train-iters", "2"]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-workers", HUGE], f"--num-workers {HUGE} is out of range: it must be >= 0 and <= 64"),
        (["--num-workers", "-1"], "--num-workers -1 is out of range: it must be >= 0 and <= 64"),
        (["--nproc-per-node", HUGE], f"--nproc-per-node {HUGE} is out of range: it must be >= 1 and <= 128"),
        (["--exit-after", "-1"], "--exit-after -1 is out of range: it must be >= 1"),
        (["--exit-after", "0"], "--exit-after 0 is out of range: it must be >= 1"),
        (["--timeout-minutes", "1e30"], "--timeout-minutes 1e+30 is out of range: it must be >= 0.01 and <= 10080"),
        (["--vocab-size", HUGE], f"'vocab_size' = {HUGE} is out of range: it must be >= 1 and <= 16777216 (--vocab-size)"),
        (["--vocab-size", "-1"], "'vocab_size' = -1 is out of range: it must be >= 1 and <= 16777216 (--vocab-size)"),
        (["--vocab-size", "0"], "'vocab_size' = 0 is out of range"),
        (["--seq-length", HUGE], f"'seq_length' = {HUGE} is out of range: it must be >= 1 and <= 1048576 (--seq-length)"),
        (["--micro-batch-size", HUGE], "'micro_batch_size' = 1000000000000000000000000000000 is out of range"),
        (["--global-batch-size", HUGE], f"'global_batch_size' = {HUGE} is out of range: it must be >= 1 and <= 16777216"),
        (["--train-iters", HUGE], f"'train_iters' = {HUGE} is out of range: it must be >= 1 and <= 1000000000 (--train-iters)"),
        (["--train-samples", HUGE], f"'train_samples' = {HUGE} is out of range: it must be >= 1 and <= 1000000000000"),
        (["--eval-iters", HUGE], f"'eval_iters' = {HUGE} is out of range: it must be >= 0 and <= 1000000000 (--eval-iters)"),
        (["--tp", HUGE], f"'tensor_model_parallel_size' = {HUGE} is out of range"),
        (["--set", f"train_samples={HUGE}"], f"'train_samples' = {HUGE} is out of range: it must be >= 1 and <= 1000000000000"),
        (["--set", f"hidden_size={HUGE}"], f"'hidden_size' = {HUGE} is out of range: it must be >= 1 and <= 262144"),
        (["--set", f"num_layers={HUGE}"], f"'num_layers' = {HUGE} is out of range: it must be >= 1 and <= 4096"),
        (["--set", "vocab_size=1e30"], "'vocab_size' = 1e+30 is not of type int"),
        (["--set", f"lr={'9' * 400}"], "'lr' = 999"),
        (["--set", f"batch_size_ramp=[[0, {HUGE}]]"], "global_batch_size from 1 to 16777216"),
        (["--weight-decay", "1e30"], "'weight_decay' = 1e+30 is out of range: it must be >= 0 and <= 1 (--weight-decay)"),
        (["--lr", "1e30"], "'lr' = 1e+30 is out of range: it must be >= 0 and <= 1 (--lr)"),
        (["--set", "adam_eps=1e30"], "'adam_eps' = 1e+30 is out of range: it must be > 0 and <= 1"),
        (["--train-iters", "1000000000", "--eval-interval", "1", "--eval-iters", "1000000000"],
         "the run would read 8,000,000,024,000,000,000 samples"),
    ],
)  # fmt: skip
def test_out_of_range_values_are_refused_naming_flag_value_and_range(tmp_path, args, message):
    output = run(*T, "--save", str(tmp_path / "run"), *args, code=2)
    assert message in output
    assert not (tmp_path / "run").exists()


def test_a_sequence_too_long_for_this_machine_is_refused_before_allocation(tmp_path):
    output = run(*T, "--save", str(tmp_path / "run"), "--seq-length", "1000000", code=2)
    assert (
        "the run does not fit in memory: 64,362,240 parameters, and training needs about 37.2 GiB" in output
    )
    assert "GiB available" in output and "`mtk plan` suggests a layout" in output
    assert not (tmp_path / "run").exists()


def test_a_model_too_large_is_refused_naming_its_size_and_a_meta_build_is_not():
    config = RunConfig.from_dict(
        {"model": {**load_preset("gpt-tiny").sections["model"], "hidden_size": 2**18, "num_layers": 8}}
    ).model
    family = family_spec("gpt")
    parameters = family.num_parameters(config)
    with pytest.raises(ConfigError) as err:
        family.build(config)
    assert f"the model is too large to build on cpu: {parameters:,} parameters take" in str(err.value)
    assert f"{parameters * 4 / 2**30:,.1f} GiB (torch.float32)" in str(err.value)
    with torch.device("meta"):
        model = family.build(config)  # describes it, allocates nothing
    assert sum(p.numel() for p in model.parameters()) == parameters


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    saved = tmp_path_factory.mktemp("trained") / "run"
    run(*T, "--save", str(saved), "--train-iters", "1")
    return saved


def crafted(trained_run: Path, tmp_path: Path, **model) -> Path:
    """A copy of ``trained_run`` whose checkpoint describes another model, with consistent checksums."""
    import shutil

    from mtk.checkpoint import CHECKSUMS, describe_files

    saved = tmp_path / "run"
    shutil.copytree(trained_run, saved)
    folder = RunDir(saved).checkpoint(1)
    description = json.loads((folder / "checkpoint.json").read_text())
    description["config"]["model"].update(model)
    (folder / "checkpoint.json").write_text(json.dumps(description))
    names = sorted(p.name for p in folder.iterdir() if p.name != CHECKSUMS)
    (folder / CHECKSUMS).write_text(json.dumps({"files": describe_files(folder, names)}))
    return saved


def test_a_checkpoint_describing_a_huge_model_is_refused_by_its_range(trained_run, tmp_path):
    saved = crafted(trained_run, tmp_path, hidden_size=10**6)
    output = run("generate", "--load", str(saved), "--prompt", "1 2 3", code=2)
    assert "'hidden_size' = 1000000 is out of range: it must be >= 1 and <= 262144" in output


def test_a_checkpoint_describing_a_model_too_large_for_memory_is_refused_before_allocation(
    trained_run, tmp_path
):
    saved = crafted(trained_run, tmp_path, hidden_size=2**18, num_layers=4096, ffn_hidden_size=2**20)
    output = run("generate", "--load", str(saved), "--prompt", "1 2 3", code=2)
    assert "the model is too large to build on cpu: 2,252," in output and "parameters take" in output
    assert "GiB are available" in output


def hf_llama(folder: Path, **changes) -> Path:
    """A Hugging Face Llama folder: config.json (with ``changes``) and one small weight."""
    from safetensors.torch import save_file

    folder.mkdir()
    config = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config | changes))
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, str(folder / "model.safetensors"))
    return folder


def test_a_hugging_face_config_of_a_huge_model_is_refused_by_its_range(tmp_path):
    folder = hf_llama(tmp_path / "hf", hidden_size=2**20)
    output = run("checkpoint", "import-hf", str(folder), "--preset", "llama-tiny", "--save", str(tmp_path / "run"), code=2)  # fmt: skip
    assert "'hidden_size' = 1048576 is out of range: it must be >= 1 and <= 262144" in output
    assert not (tmp_path / "run").exists()


def test_a_hugging_face_model_too_large_for_memory_is_refused_before_its_weights_are_read(tmp_path):
    folder = hf_llama(tmp_path / "hf", hidden_size=2**18, intermediate_size=2**20, num_hidden_layers=4096)
    output = run("checkpoint", "import-hf", str(folder), "--preset", "llama-tiny", "--save", str(tmp_path / "run"), code=2)  # fmt: skip
    assert "the model is too large to build on cpu" in output and "GiB are available" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["slurm", "--nodes", "1", "--port", "99999999"], "--port 99999999 is out of range: it must be >= 1 and <= 65535"),
        (["torchrun", "--port", "0"], "--port 0 is out of range: it must be >= 1 and <= 65535"),
        (["slurm", "--nodes", HUGE], f"--nodes {HUGE} is out of range: it must be >= 1 and <= 65536"),
        (["torchrun", "--gpus-per-node", HUGE], f"--gpus-per-node {HUGE} is out of range: it must be >= 1 and <= 128"),
        (["slurm", "--nodes", "1", "--container-mounts", "/data:/data"], "--container-mounts needs --container-image"),
    ],
)  # fmt: skip
def test_launch_values_out_of_range_are_refused(tmp_path, args, message):
    script = tmp_path / "job.sbatch"
    extra = ["-o", str(script)] if args[0] == "slurm" else []
    output = run("launch", *args, *extra, "--", "mtk", "train", "--preset", "gpt-tiny", code=2)
    assert message in output
    assert not script.exists()


@pytest.mark.parametrize("stage", ["index", "query-neighbours"])
def test_the_retro_stages_bound_nproc_per_node(stage):
    output = run("retro", stage, "--nproc-per-node", HUGE, code=2)
    assert f"--nproc-per-node {HUGE} is out of range: it must be >= 1 and <= 128" in output
