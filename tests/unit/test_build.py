"""One model builder (mtk/train/build.py): `mtk bench` measures exactly the model `mtk train` builds on one
process (FP8, recomputation, initial weights); TrainOptions' defaults are `mtk train`'s."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import mtk.train.bench as bench
import mtk.train.run as run
from mtk.config import apply_overrides
from mtk.presets import load_preset
from mtk.train.loop import TrainOptions
from tests.conftest import invoke


class _Captured(Exception):
    """Raised by the stand-in Trainer once it has seen the model it was given."""


def _capture(monkeypatch, module) -> dict:
    """The model ``module`` hands its Trainer (the run stops there)."""
    seen: dict = {}

    def trainer(config, model, *args, **kwargs):
        seen["model"] = model
        raise _Captured

    monkeypatch.setattr(module, "Trainer", trainer)
    return seen


def _described(model) -> tuple[list, list, dict]:
    """Module tree, parameter names and values of every part of a ParallelModel."""
    modules = [[(name, type(m).__name__) for name, m in part.named_modules()] for part in model.parts]
    names = [[name for name, _ in part.named_parameters()] for part in model.parts]
    values = {
        f"{index}.{name}": param.detach().clone()
        for index, part in enumerate(model.parts)
        for name, param in part.named_parameters()
    }
    return modules, names, values


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_bench_builds_the_model_train_builds(monkeypatch, tmp_path, granularity):
    config = apply_overrides(
        load_preset("llama-tiny").sections,
        {"mock_data": True, "fp8": "hybrid", "recompute_granularity": granularity, "train_iters": 2},
    )
    trained = _capture(monkeypatch, run)
    with pytest.raises(_Captured):
        run.run_training(
            dataclasses.replace(config), TrainOptions(save=tmp_path / "run", num_workers=0, device="cpu")
        )
    benched = _capture(monkeypatch, bench)
    with pytest.raises(_Captured):
        bench.benchmark(dataclasses.replace(config), "llama-tiny", 1, 0, "cpu", None)

    train_modules, train_names, train_values = _described(trained["model"])
    bench_modules, bench_names, bench_values = _described(benched["model"])
    types = {kind for part in train_modules for _, kind in part}
    assert "Float8Linear" in types and "CheckpointWrapper" in types  # FP8 and recomputation applied
    assert bench_modules == train_modules
    assert bench_names == train_names
    assert train_values.keys() == bench_values.keys()
    different = [name for name in train_values if not torch.equal(train_values[name], bench_values[name])]
    assert not different, f"initial weights differ: {different[:3]}"
    assert benched["model"].fp8.linears == trained["model"].fp8.linears


def test_bench_says_how_the_model_was_built(tmp_path):
    result = invoke("bench", "--preset", "gpt-tiny", "--iters", "1", "--warmup", "0", "--seq-length", "32",
                    "--global-batch-size", "2", "--micro-batch-size", "2", "--device", "cpu",
                    "--recompute-granularity", "full", "--json", str(tmp_path / "bench.json"))  # fmt: skip
    line = (
        "model built as `mtk train` builds it: FP8 off, recompute full, torch.compile off (the default on "
        "CPU, where it does not pay for small models; --compile turns it on), no data-parallel wrapping"
    )
    assert line in " ".join(result.output.split())


def test_train_options_defaults_are_the_cli_defaults():
    from stages.train import train

    cli = inspect.signature(train).parameters
    fields = {field.name: field.default for field in dataclasses.fields(TrainOptions)}
    names = {"stop_after": "exit_after"}  # TrainOptions field -> the CLI's parameter
    for field in ("load", "keep_last", "tensorboard_dir", "skip_nan", "num_workers", "device",
                  "stop_after", "timeout_minutes", "async_save", "max_consecutive_skips"):  # fmt: skip
        assert cli[names.get(field, field)].default == fields[field], field


def test_squad_options_defaults_are_the_cli_defaults():
    from mtk.squad import SquadOptions
    from stages.eval_squad import eval_squad

    cli = inspect.signature(eval_squad).parameters
    for field in dataclasses.fields(SquadOptions):
        if field.name != "out" and field.name in cli:  # out: derived from --load when not given
            assert cli[field.name].default.default == field.default, field.name
