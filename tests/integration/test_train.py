"""`mtk train` end to end on CPU: learning, exact resume (also after SIGKILL), atomic saves, errors."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mtk.checkpoint as checkpoint
from mtk.checkpoint import latest_iteration, load_checkpoint
from mtk.config import apply_overrides
from mtk.data.mock import MockGPTDataset
from mtk.models.gpt import SPEC, GPTModel
from mtk.presets import load_preset
from mtk.train.loop import Trainer, TrainingError, TrainOptions
from tests.conftest import eval_losses, invoke, read_metrics, state_differences, train_losses

BASE = ["--preset", "gpt-tiny", "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--log-interval", "1", "--eval-interval", "0", "--num-workers", "0", "--device", "cpu", "--split", "90,5,5"]  # fmt: skip


def train(*args: str) -> str:
    return invoke("train", *BASE, *args).output


losses = train_losses  # train loss per iteration from metrics.jsonl (a resumed run's later records win)


def test_loss_decreases_and_run_directory_describes_itself(tmp_path, counting_data):
    run = tmp_path / "run"
    train("--data", counting_data, "--save", str(run), "--train-iters", "60", "--lr", "3e-3",
          "--tensorboard-dir", str(tmp_path / "tb"), "--eval-interval", "30", "--eval-iters", "2")  # fmt: skip
    curve = losses(run)
    assert curve[1] > 3.5  # about ln(65) at the start
    assert sum(curve[i] for i in range(56, 61)) / 5 < 0.5 * curve[1]
    records = read_metrics(run)
    keys = {"iteration", "consumed_samples", "loss", "lr", "grad_norm", "tokens_per_s"}
    assert keys <= set(records[0])
    assert {r["split"] for r in records if "split" in r} == {"valid", "test"}
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["vocab_size"] == 64 + 1  # inherited from the data manifest
    manifest = json.loads((run / "mtk.json").read_text())
    assert manifest["stage"] == "train" and manifest["tokenizer"]["kind"] == "null"
    assert (run / "loss.png").stat().st_size > 1000
    assert latest_iteration(run) == 60
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and b"train/loss" in events[0].read_bytes()


def test_resume_is_exact(tmp_path, counting_data):
    common = [
        "--data",
        counting_data,
        "--train-iters",
        "20",
        "--set",
        "hidden_dropout=0.1",
        "--set",
        "attention_dropout=0.1",
    ]
    train(*common, "--save", str(tmp_path / "straight"))
    train(*common, "--save", str(tmp_path / "resumed"), "--exit-after", "10")
    assert latest_iteration(tmp_path / "resumed") == 10
    output = train(*common, "--save", str(tmp_path / "resumed"))
    assert "resumed from iteration 10" in output
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


@pytest.mark.slow  # a training subprocess, killed
def test_resume_after_sigkill_between_saves_is_exact(tmp_path, counting_data, kill_during_training):
    """Train and validation losses bit for bit: each validation reads the next batch of the valid split
    (Megatron's consumed_valid_samples, commit d98e8a64ddf34856e74b24714e3bedb2f5a39553), from the
    position the checkpoint holds."""
    common = ["--data", counting_data, "--train-iters", "40", "--set", "hidden_dropout=0.1",
              "--eval-interval", "5", "--eval-iters", "1"]  # fmt: skip
    train(*common, "--save", str(tmp_path / "straight"))
    run = tmp_path / "killed"
    stopped_at = kill_during_training([*BASE, *common, "--save-interval", "5"], run, 10)
    assert stopped_at < 40
    train(*common, "--save", str(run), "--save-interval", "5")
    assert losses(tmp_path / "straight") == losses(run), state_differences(tmp_path / "straight", run)
    assert eval_losses(tmp_path / "straight") == eval_losses(run)
    valid = [loss for (split, _), loss in eval_losses(run).items() if split == "valid"]
    assert len(set(valid)) == len(valid) == 8  # every 5 iterations and the final one, each on other samples
    logged = [(r.get("split", "train"), r["iteration"]) for r in read_metrics(run)]
    expected = [("train", i) for i in range(1, 41)]
    for i in range(35, 0, -5):
        expected.insert(i, ("valid", i))
    assert logged == [*expected, ("valid", 40), ("test", 40)]  # replayed iterations logged once
    assert load_checkpoint(run)["consumed_valid_samples"] == 8 * 8  # 8 validations of one global batch


@pytest.mark.slow  # a training subprocess, killed
def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path, counting_data):
    run = tmp_path / "preempted"
    command = [sys.executable, "-m", "stages.main", "train", *BASE, "--data", counting_data, "--train-iters", "100000",
               "--save", str(run)]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=os.getcwd())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, output
    assert "checkpoint saved" in output
    stopped = latest_iteration(run)
    assert stopped is not None and stopped == max(losses(run))


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, counting_data, monkeypatch):
    run = tmp_path / "run"
    train("--data", counting_data, "--save", str(run), "--train-iters", "4", "--save-interval", "2")
    before = load_checkpoint(run)
    real_write = checkpoint.write_trainer_state

    def broken_write(path, state):
        real_write(path, state)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # a torn write ...
        raise OSError(errno.EIO, "Input/output error")  # ... and the crash

    monkeypatch.setattr(checkpoint, "write_trainer_state", broken_write)
    result = invoke(
        "train", *BASE, "--data", counting_data, "--save", str(run), "--train-iters", "6", code=None
    )
    assert result.exit_code == 2
    assert (
        "could not save checkpoint 6" in result.output and "iter_0000004 is still the latest" in result.output
    )
    assert latest_iteration(run) == 4
    after = load_checkpoint(run)
    assert after["iteration"] == before["iteration"] == 4
    assert not [p for p in run.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "num_layer=3"], "unknown key 'num_layer'"),
        (["--set", "hidden_size=big"], "'hidden_size' = 'big' is not of type int"),
        (["--global-batch-size", "6", "--micro-batch-size", "4"], "global batch size 6 is not a multiple"),
        (["--vocab-size", "100"], "explicit value 100 conflicts with 65"),
        (["--set", "max_position_embeddings=16"], "seq_length 32 exceeds max_position_embeddings 16"),
    ],
)
def test_bad_settings_are_clear_errors(tmp_path, counting_data, args, message):
    result = invoke(
        "train",
        *BASE,
        "--data",
        counting_data,
        "--save",
        str(tmp_path / "r"),
        "--train-iters",
        "2",
        *args,
        code=None,
    )
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def _tiny_trainer(tmp_path, valid=None, test=None, **train_overrides) -> Trainer:
    preset = load_preset("gpt-tiny")
    config = apply_overrides(
        preset.sections,
        {"seq_length": 16, "train_iters": 4, "global_batch_size": 4, "lr_warmup_iters": 0, **train_overrides},
    )
    data = MockGPTDataset(64, 16, config.model.vocab_size, 0)
    return Trainer(
        config,
        GPTModel(config.model),
        (data, valid, test),
        TrainOptions(save=tmp_path, num_workers=0, device="cpu"),
    )


def _inject_overflows(trainer: Trainer, iterations: set[int]) -> None:
    """An inf in one gradient during the steps of ``iterations`` (counted from 1), as an fp16 overflow."""
    weight = trainer.model.parts[0].embedding.weight

    def overflow(grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, math.inf) if trainer.state.iteration + 1 in iterations else grad

    weight.register_hook(overflow)


def _train_records(trainer: Trainer, tmp_path: Path) -> list[dict]:
    """Run ``trainer`` to its end (or its stop) and return its train records of this run."""
    from mtk.checkpoint import RunDir
    from mtk.train.metrics import MetricsLogger

    logger = MetricsLogger(RunDir(trainer.options.save), show=lambda line: None)
    logger.forget_after(trainer.state.iteration)
    trainer.run(logger)
    records = [json.loads(line) for line in logger.path.read_text().splitlines()]
    return [r for r in records if "split" not in r]


FP16_SCALER = {"precision": "fp16", "initial_loss_scale": 1024.0, "hysteresis": 2, "loss_scale_window": 3,
               "lr_warmup_iters": 10, "log_interval": 1, "eval_interval": 0, "train_iters": 8}  # fmt: skip


def test_fp16_overflow_skips_the_step_and_scale_backs_off_after_the_hysteresis(tmp_path):
    """Megatron's DynamicGradScaler (commit d98e8a64ddf34856e74b24714e3bedb2f5a39553,
    megatron/core/optimizer/grad_scaler.py): the first overflow is tolerated, the second halves."""
    trainer = _tiny_trainer(tmp_path, **{**FP16_SCALER, "lr_warmup_iters": 0})
    _inject_overflows(trainer, {1, 2})
    batches = iter(torch.utils.data.DataLoader(trainer.train_data, batch_size=4))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for expected_scale in (1024.0, 512.0):
        step = trainer.train_step(batches, 1)
        trainer.state.iteration += 1
        assert step["skipped"] and trainer.scaler.scale == expected_scale
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    for expected_scale in (512.0, 512.0, 1024.0):  # doubled after 3 (the window) good steps
        assert not trainer.train_step(batches, 1)["skipped"]
        trainer.state.iteration += 1
        assert trainer.scaler.scale == expected_scale
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_a_skipped_step_does_not_advance_the_learning_rate_schedule(tmp_path):
    """As Megatron's training.py (commit d98e8a64ddf34856e74b24714e3bedb2f5a39553) steps its
    opt_param_scheduler only when the update was successful: the step after an overflow has the rate
    the overflowing step had, which the uninterrupted schedule gives the next update."""
    torch.manual_seed(0)
    clean = _train_records(_tiny_trainer(tmp_path / "clean", **FP16_SCALER), tmp_path)
    torch.manual_seed(0)
    trainer = _tiny_trainer(tmp_path / "overflow", **FP16_SCALER)
    _inject_overflows(trainer, {3, 4})
    records = _train_records(trainer, tmp_path)
    assert all(not r["skipped_iterations"] for r in clean) and [r["skipped_iterations"] for r in records] == [
        0, 0, 1, 2, 2, 2, 2, 2,
    ]  # fmt: skip
    clean_lr = [r["lr"] for r in clean]
    assert len(set(clean_lr)) == 8  # warmup: every update has its own rate
    assert [r["lr"] for r in records] == clean_lr[:3] + clean_lr[2:3] * 2 + clean_lr[3:6]
    assert [r["loss_scale"] for r in records] == [1024, 1024, 1024, 1024, 512, 512, 512, 1024]
    assert trainer.state.iteration == 8 and trainer.state.consumed_samples == 32
    assert trainer.state.schedule_steps == 6 and trainer.state.schedule_samples == 24


def test_resume_after_overflows_is_exact(tmp_path):
    """The scaler's trackers and the schedule's position are in the checkpoint: with an overflow before
    the save and one after, the resumed run halves the scale and holds the rate as the straight one."""
    overflows = {3, 5}
    settings = {**FP16_SCALER, "loss_scale_window": 4, "train_iters": 10}
    torch.manual_seed(0)
    straight = _tiny_trainer(tmp_path / "straight", **settings)
    _inject_overflows(straight, overflows)
    expected = _train_records(straight, tmp_path)
    torch.manual_seed(0)
    first = _tiny_trainer(tmp_path / "resumed", **settings)
    first.options.stop_after = 4
    _inject_overflows(first, overflows)
    _train_records(first, tmp_path)
    torch.manual_seed(1)  # other initial weights: everything comes from the checkpoint
    second = _tiny_trainer(tmp_path / "resumed", **settings)
    _inject_overflows(second, overflows)
    assert second.resume() and second.state.iteration == 4 and second.state.schedule_steps == 3
    records = _train_records(second, tmp_path)
    keys = ("iteration", "loss", "lr", "grad_norm", "loss_scale", "skipped_iterations")
    assert [[r[k] for k in keys] for r in records] == [[r[k] for k in keys] for r in expected]
    assert [r["loss_scale"] for r in expected] == [1024] * 5 + [512] * 4 + [1024]


class _Recording:
    """A dataset that records the samples read from it."""

    def __init__(self, dataset) -> None:
        self.dataset, self.read = dataset, []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        self.read.append(index)
        return self.dataset[index]


def test_each_validation_reads_the_next_batches_and_wraps_at_the_end_of_the_split(tmp_path):
    """As Megatron's validation iterator (consumed_valid_samples; megatron/training/training.py at commit
    d98e8a64ddf34856e74b24714e3bedb2f5a39553): the next eval_iters global batches each time; a split
    shorter than the run needs is read as if repeated end to end. The test split starts at 0."""
    valid = _Recording(MockGPTDataset(12, 16, 4096, 1))
    test = _Recording(MockGPTDataset(12, 16, 4096, 2))
    trainer = _tiny_trainer(tmp_path, valid, test, eval_iters=2, eval_interval=0)  # 8 samples per evaluation
    reads, results = [], []
    for _ in range(3):
        valid.read = []
        results.append(trainer.evaluate(trainer.valid_data, "valid")["loss"])
        reads.append(valid.read)
    assert reads == [list(range(8)), [8, 9, 10, 11, 0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]]
    assert len(set(results)) == 3 and trainer.state.consumed_valid_samples == 24
    trainer.state.consumed_valid_samples = 0  # the same samples, the same loss
    assert trainer.evaluate(trainer.valid_data, "valid")["loss"] == results[0]
    for _ in range(2):
        test.read = []
        trainer.evaluate(trainer.test_data, "test")
        assert test.read == list(range(8))


def test_validations_of_a_resumed_checkpoint_walk_on_from_its_position(tmp_path):
    """The position is in the checkpoint: one checkpointed model, evaluated twice, gives two losses over
    other samples, the first of them the one the uninterrupted trainer reads next."""
    valid = MockGPTDataset(40, 16, 4096, 1)
    trained = _tiny_trainer(tmp_path, valid, eval_iters=1, eval_interval=1, train_iters=2)
    _train_records(trained, tmp_path)  # evaluations at iteration 1 and (the final one) 2
    assert trained.state.consumed_valid_samples == 8
    assert load_checkpoint(tmp_path)["consumed_valid_samples"] == 8
    resumed = _tiny_trainer(tmp_path, valid, eval_iters=1, eval_interval=1, train_iters=2)
    assert resumed.resume() and resumed.state.consumed_valid_samples == 8
    first, second = (
        resumed.evaluate(resumed.valid_data, "valid"),
        resumed.evaluate(resumed.valid_data, "valid"),
    )
    assert (
        first["loss"] == trained.evaluate(trained.valid_data, "valid")["loss"]
        and first["loss"] != second["loss"]
    )
    assert resumed.state.consumed_valid_samples == 16


def test_trainer_states_of_earlier_checkpoints_load_with_their_positions(tmp_path, monkeypatch):
    """Without the schedule's or the validation's position (mtk before them), a checkpoint is valid, and
    resumes its schedule at its iteration (what it followed then) and validation at the split's start."""
    trainer = _tiny_trainer(tmp_path, precision="fp16", initial_loss_scale=1024.0, train_iters=2)
    _train_records(trainer, tmp_path)
    saved = load_checkpoint(tmp_path)
    for key in ("schedule_steps", "schedule_samples", "consumed_valid_samples"):
        assert checkpoint.trainer_state_problem({**saved, key: -1}) is not None
        del saved[key]
    assert checkpoint.trainer_state_problem(saved) is None
    saved["iteration"], saved["consumed_samples"] = 2, 8
    saved["scaler"] = {"scale": 64.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 1000,
                       "_growth_tracker": 1}  # torch's GradScaler, as earlier mtk saved it  # fmt: skip
    resumed = _tiny_trainer(tmp_path, precision="fp16", initial_loss_scale=1024.0, train_iters=2)
    monkeypatch.setattr(resumed.checkpointer, "load", lambda: saved)
    assert resumed.resume()
    state = resumed.state
    assert (state.schedule_steps, state.schedule_samples, state.consumed_valid_samples) == (2, 8, 0)
    assert resumed.scaler.scale == 64.0 and resumed.scaler.hysteresis_tracker == 2


def test_nan_loss_stops_with_the_iteration_or_is_skipped(tmp_path):
    trainer = _tiny_trainer(tmp_path)
    with torch.no_grad():
        trainer.model.parts[0].embedding.weight[0, 0] = float("nan")
    batch = {"tokens": torch.zeros(4, 16, dtype=torch.long), "labels": torch.zeros(4, 16, dtype=torch.long),
             "loss_mask": torch.ones(4, 16), "position_ids": torch.arange(16).expand(4, 16)}  # fmt: skip
    with pytest.raises(TrainingError, match="iteration 1: loss is nan"):
        trainer.train_step(iter([batch]), 1)
    trainer.options.skip_nan = True
    before = [p.detach().clone() for p in trainer.model.parameters()]
    assert trainer.train_step(iter([batch]), 1)["skipped"]
    for a, b in zip(before, trainer.model.parameters(), strict=True):  # not one value moved (NaN stays NaN)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_checkpoint_inspect(tmp_path, counting_data):
    run = tmp_path / "run"
    train("--data", counting_data, "--save", str(run), "--train-iters", "2")
    result = invoke("checkpoint", "inspect", str(run), code=None, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "iteration" in result.output and "decoder.layers.0.attention.qkv_proj.weight" in result.output
    params = sum(t.numel() for t in load_checkpoint(run)["model"].values())
    assert f"{params:,}" in result.output


def test_generate_continues_the_learned_pattern(tmp_path, counting_data):
    run = tmp_path / "run"
    train("--data", counting_data, "--save", str(run), "--train-iters", "80", "--lr", "3e-3")
    result = invoke("generate", "--load", str(run), "--prompt", "20 21 22 23 24", "--temperature", "0",
                                 "--max-new-tokens", "5", code=None)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.split() == [str(i) for i in range(20, 30)]


def test_quickstart_runs_end_to_end(tmp_path):
    result = invoke("quickstart", "--out", str(tmp_path / "qs"), "--train-iters", "4", code=None)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "qs" / "run" / "loss.png").is_file()
    assert latest_iteration(tmp_path / "qs" / "run") == 4
    assert "The assert statement" in result.output and "mtk generate --load" in result.output


def test_keep_last_and_batch_size_ramp(tmp_path, counting_data):
    run = tmp_path / "run"
    # ramp: 4 samples per step until 32 * 32 tokens are consumed, then 8 (seq_length is 32)
    train("--data", counting_data, "--save", str(run), "--train-iters", "12", "--save-interval", "2",
          "--keep-last", "2", "--set", "batch_size_ramp=[[0, 4], [1024, 8]]")  # fmt: skip
    assert sorted(p.name for p in run.glob("iter_*")) == ["iter_0000010", "iter_0000012"]
    records = read_metrics(run, "train")
    assert [r["global_batch_size"] for r in records] == [4] * 8 + [8] * 4
    assert records[-1]["consumed_samples"] == 8 * 4 + 4 * 8


def test_bench_reports_throughput_as_json(tmp_path):
    out = tmp_path / "bench.json"
    result = invoke("bench", "--preset", "gpt-tiny", "--iters", "2", "--warmup", "1", "--seq-length", "32",
                                 "--global-batch-size", "4", "--micro-batch-size", "2", "--device", "cpu", "--json", str(out), code=None)  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["iters"] == 2 and report["global_batch_size"] == 4 and report["seq_length"] == 32
    expected = SPEC.num_parameters(
        apply_overrides(load_preset("gpt-tiny").sections, {"seq_length": 32}).model
    )
    assert report["mfu"] is None and report["parameters"] == expected


def test_bench_measures_recomputation_and_the_fsdp_wrapper(tmp_path):
    out = tmp_path / "bench.json"
    result = invoke("bench", "--preset", "gpt-tiny", "--iters", "1", "--warmup", "1", "--seq-length", "32",
                                 "--global-batch-size", "4", "--micro-batch-size", "2", "--device", "cpu", "--fsdp",
                                 "--recompute-granularity", "selective", "--json", str(out), code=None)  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["recompute"] == "selective" and report["data_parallel_sharding"] == "optim_grads_params"
    assert report["tokens_per_s"] > 0


def test_llama_tiny_trains_in_bf16_and_load_resumes_into_a_new_directory(tmp_path, counting_data):
    common = ["--preset", "llama-tiny", "--data", counting_data, "--bf16"]
    train(*common, "--save", str(tmp_path / "a"), "--train-iters", "4")
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["train"]["precision"] == "bf16" and saved["model"]["normalization"] == "RMSNorm"
    assert all(math.isfinite(loss) for loss in losses(tmp_path / "a").values())
    output = train(
        *common, "--load", str(tmp_path / "a"), "--save", str(tmp_path / "b"), "--train-iters", "6"
    )
    assert "resumed from iteration 4" in output
    assert sorted(losses(tmp_path / "b")) == [5, 6]
    assert latest_iteration(tmp_path / "b") == 6 and latest_iteration(tmp_path / "a") == 4


def test_rerunning_a_finished_run_changes_nothing(tmp_path, counting_data):
    run = tmp_path / "run"
    train("--data", counting_data, "--save", str(run), "--train-iters", "3")
    before = (run / "metrics.jsonl").read_text()
    output = train("--data", counting_data, "--save", str(run), "--train-iters", "3")
    assert "the run is complete: iteration 3 of 3" in output
    assert (run / "metrics.jsonl").read_text() == before


def test_recomputation_gives_the_same_losses(tmp_path, counting_data):
    common = ["--data", counting_data, "--train-iters", "3", "--set", "hidden_dropout=0.1"]
    train(*common, "--save", str(tmp_path / "plain"))
    train(*common, "--save", str(tmp_path / "full"), "--recompute-granularity", "full")
    assert losses(tmp_path / "full") == pytest.approx(losses(tmp_path / "plain"), rel=1e-6)
    assert (
        json.loads((tmp_path / "full" / "config.json").read_text())["parallel"]["recompute_granularity"]
        == "full"
    )


def test_checkpoint_convert_writes_safetensors_with_the_same_weights(tmp_path, counting_data):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    train("--data", counting_data, "--save", str(run), "--train-iters", "2")
    result = invoke("checkpoint", "convert", str(run), "-o", str(tmp_path / "model.safetensors"), code=None)
    assert result.exit_code == 0, result.output
    exported = load_file(tmp_path / "model.safetensors")
    saved = load_checkpoint(run)["model"]
    assert exported.keys() == saved.keys()
    assert all(torch.equal(exported[name], saved[name]) for name in saved)
    missing = invoke(
        "checkpoint", "convert", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.safetensors"), code=None
    )
    assert missing.exit_code == 2 and "no checkpoint" in missing.output
