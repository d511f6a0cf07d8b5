"""FP8 (torchao, emulated on CPU): what a run gets, what is converted, and the amax monitor."""

from __future__ import annotations

import importlib.machinery

import pytest
import torch

from mtk.config import ConfigError, apply_overrides
from mtk.models.gpt import SPEC
from mtk.parallel.apply import parallelize
from mtk.parallel.dims import ParallelDims
from mtk.parallel.fp8 import AmaxMonitor, plan_fp8
from mtk.presets import load_preset


def config(**overrides):
    return apply_overrides(
        load_preset("llama-tiny").sections, {"mock_data": True, "fp8": "hybrid", **overrides}
    )


def fp8_model(cfg):
    with torch.device("meta"):
        model = SPEC.build(cfg.model)
    return parallelize(model, SPEC, cfg, ParallelDims(1), None, "cpu")


def test_the_presets_carry_the_seed_recipe_and_megatron_defaults_stay():
    train = load_preset("llama3-8b").config.train
    assert (train.fp8, train.fp8_recipe, train.fp8_amax_history_len, train.fp8_amax_compute_algo) == (
        "hybrid", "delayed", 1024, "max",
    )  # fmt: skip
    default = apply_overrides({}, {}).train
    assert (default.fp8, default.fp8_recipe, default.fp8_amax_history_len, default.fp8_amax_compute_algo) == (
        None, "delayed", 1, "most_recent",
    )  # fmt: skip


def test_a_recipe_torchao_lacks_falls_back_out_loud_or_fails_when_strict():
    plan = plan_fp8(config(), "cpu")
    assert (plan.recipe, plan.requested_recipe, plan.backend, plan.emulated) == (
        "tensorwise",
        "delayed",
        "torchao",
        True,
    )
    assert "torchao has no delayed scaling: tensorwise current scaling instead" in plan.note
    assert "fallback" not in plan_fp8(config(fp8_recipe="rowwise"), "cpu").summary()
    assert plan_fp8(config(fp8_recipe="rowwise"), "cpu").note is None
    with pytest.raises(
        ConfigError, match="--fp8-recipe blockwise with --fp8-strict: torchao has no blockwise"
    ):
        plan_fp8(config(fp8_recipe="blockwise", fp8_strict=True), "cpu")
    with pytest.raises(ConfigError, match="--fp8-backend te: Transformer Engine is not installed"):
        plan_fp8(config(fp8_backend="te"), "cpu")
    assert plan_fp8(config(fp8=None), "cpu") is None


@pytest.mark.parametrize(("fmt", "gradient"), [("hybrid", torch.float8_e5m2), ("e4m3", torch.float8_e4m3fn)])
def test_the_layers_linears_are_converted_and_nothing_else(fmt, gradient):
    model = fp8_model(config(fp8=fmt, fp8_recipe="tensorwise"))
    part = model.parts[0]
    converted = {name for name, m in part.named_modules() if type(m).__name__ == "Float8Linear"}
    assert converted == set(model.fp8.linears) and len(converted) == 2 * 5  # qkv out, fc1 gate fc2
    assert "output" not in converted  # the output layer stays in high precision
    layer = part.decoder.layers["0"].mlp.fc1
    assert layer.config.cast_config_input.target_dtype == torch.float8_e4m3fn
    assert layer.config.cast_config_grad_output.target_dtype == gradient


def test_first_and_last_layers_can_stay_out_of_fp8():
    model = fp8_model(config(num_layers=4, first_last_layers_bf16=True))
    layers = {name.split(".")[2] for name in model.fp8.linears}
    assert layers == {"1", "2"}


def test_fp8_is_really_applied_yet_close():
    """The same weights in fp32 and through FP8 casts: different outputs, within FP8's precision."""
    torch.manual_seed(0)
    plain = SPEC.build(config(fp8=None).model)
    fp8 = fp8_model(config(fp8_recipe="tensorwise")).parts[0]
    fp8.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 4096, (2, 32))
    with torch.no_grad():
        a, b = plain(tokens), fp8(tokens)
    assert not torch.equal(a, b)
    assert ((a - b).norm() / a.norm()).item() < 0.1


def test_the_amax_monitor_names_the_linear_that_overflowed():
    model = fp8_model(config(fp8_recipe="tensorwise"))
    monitor = AmaxMonitor(model.parts, model.fp8.linears)
    part = model.parts[0]
    with torch.no_grad():
        part(torch.randint(0, 4096, (1, 16)))
        finite = monitor.take()
        assert 0 < finite["fp8_amax"] < 100 and finite["fp8_amax_at"].startswith("decoder.layers.")
        part.decoder.layers["1"].mlp.fc2.weight[3, 5] = float("inf")
        part(torch.randint(0, 4096, (1, 16)))
    assert monitor.take() == {"fp8_amax": float("inf"), "fp8_amax_at": "decoder.layers.1.mlp.fc2 weight"}
    assert monitor.take()["fp8_amax"] == 0.0  # each take starts a new interval


def test_fp8_hardware_needs_widths_in_multiples_of_16(monkeypatch):
    import mtk.parallel.fp8 as fp8

    monkeypatch.setattr(fp8, "_emulated", lambda device: False)  # as on an H100
    assert plan_fp8(config(), "cuda").emulated is False
    with pytest.raises(ConfigError, match="multiple of 16: ffn_hidden_size / TP = 88"):
        plan_fp8(config(tensor_model_parallel_size=2), "cuda")


@pytest.fixture
def fake_te(monkeypatch):
    """A CPU stand-in for Transformer Engine (which needs CUDA): its recipe classes, a ``Linear`` that
    is an ``nn.Linear``, and an ``fp8_autocast`` that records the recipes it was entered with."""
    import contextlib
    import sys
    import types
    from dataclasses import dataclass
    from enum import Enum

    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.Format = Enum("Format", "E4M3 HYBRID")

    @dataclass
    class DelayedScaling:
        margin: int = 0
        fp8_format: object = None
        amax_history_len: int = 1
        amax_compute_algo: str = "most_recent"

    @dataclass
    class Float8CurrentScaling:
        fp8_format: object = None

    @dataclass
    class Float8BlockScaling:
        fp8_format: object = None

    recipe.DelayedScaling, recipe.Float8CurrentScaling, recipe.Float8BlockScaling = (
        DelayedScaling, Float8CurrentScaling, Float8BlockScaling,
    )  # fmt: skip
    pytorch = types.ModuleType("transformer_engine.pytorch")
    pytorch.entered = []

    class Linear(torch.nn.Linear):
        def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
            super().__init__(in_features, out_features, bias=bias, dtype=params_dtype, device=device)

    @contextlib.contextmanager
    def fp8_autocast(enabled, fp8_recipe):
        pytorch.entered.append(fp8_recipe)
        yield

    pytorch.Linear, pytorch.fp8_autocast = Linear, fp8_autocast
    root, common = types.ModuleType("transformer_engine"), types.ModuleType("transformer_engine.common")
    root.__spec__ = importlib.machinery.ModuleSpec("transformer_engine", None)
    root.common, root.pytorch, common.recipe = common, pytorch, recipe
    for name, module in [("transformer_engine", root), ("transformer_engine.common", common),
                         ("transformer_engine.common.recipe", recipe), ("transformer_engine.pytorch", pytorch)]:  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    return pytorch


def test_transformer_engine_gets_megatrons_recipe_mapping(fake_te):
    from mtk.parallel.fp8 import te_recipe

    delayed = plan_fp8(config(fp8_backend="te", fp8_amax_history_len=1024, fp8_amax_compute_algo="max",
                              fp8_margin=1), "cuda")  # fmt: skip
    assert delayed.backend == "te" and delayed.recipe == "delayed" and delayed.note is None
    recipe = delayed.te_recipe
    assert (type(recipe).__name__, recipe.fp8_format.name, recipe.amax_history_len, recipe.amax_compute_algo,
            recipe.margin) == ("DelayedScaling", "HYBRID", 1024, "max", 1)  # fmt: skip
    assert type(te_recipe(config(fp8="e4m3"), "tensorwise")).__name__ == "Float8CurrentScaling"
    assert te_recipe(config(fp8="e4m3"), "tensorwise").fp8_format.name == "E4M3"
    assert type(te_recipe(config(), "blockwise")).__name__ == "Float8BlockScaling"
    rowwise = plan_fp8(config(fp8_backend="te", fp8_recipe="rowwise"), "cuda")
    assert rowwise.recipe == "tensorwise" and "Transformer Engine has no rowwise scaling" in rowwise.note
    for overrides, message in [
        ({"fp8_recipe": "rowwise", "fp8_strict": True}, "Transformer Engine has no rowwise"),
        ({"tensor_model_parallel_size": 2}, "Transformer Engine's linears do their own tensor parallelism"),
    ]:
        with pytest.raises(ConfigError, match=message):
            plan_fp8(config(fp8_backend="te", **overrides), "cuda")
    with pytest.raises(ConfigError, match="runs on CUDA devices only"):
        plan_fp8(config(fp8_backend="te"), "cpu")


def test_transformer_engine_linears_replace_the_layers_and_the_step_runs_in_its_autocast(fake_te, tmp_path):
    from mtk.parallel.apply import ParallelModel
    from mtk.parallel.fp8 import convert_to_fp8
    from mtk.train.loop import Trainer, TrainOptions

    cfg = config(fp8_backend="te", fp8_recipe="tensorwise", global_batch_size=4, micro_batch_size=2)
    torch.manual_seed(0)
    model = SPEC.build(cfg.model)
    model.init_weights(0)
    tokens = torch.randint(0, 100, (2, 16))
    before = model(tokens)
    plan = plan_fp8(cfg, "cuda")
    convert_to_fp8(model, SPEC.blocks(model), cfg, plan)
    swapped = {name for name, m in model.named_modules() if isinstance(m, fake_te.Linear)}
    assert swapped == set(plan.linears) and len(swapped) == 2 * 5 and "output" not in swapped
    assert torch.equal(model(tokens), before)  # the same weights, under the same names
    data = SPEC.datasets(cfg, (8, 0, 0), None)[0]
    trainer = Trainer(cfg, ParallelModel([model], device="cpu", fp8=plan), (data, None, None),
                      TrainOptions(save=tmp_path, device="cpu"))  # fmt: skip
    from mtk.data.loader import build_loader

    trainer.train_step(iter(build_loader(data, 2, num_workers=0)), 2)
    assert fake_te.entered == [plan.te_recipe] * 2  # one fp8_autocast per micro-batch forward


SHRUNK = {"num_layers": 40, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 8,
          "num_query_groups": 4, "kv_channels": 8, "vocab_size": 256, "seq_length": 32}  # fmt: skip


def seed_preset(name: str, **overrides):
    return apply_overrides(load_preset(name).sections, {"mock_data": True, **SHRUNK, **overrides})


def test_auto_takes_transformer_engine_only_where_it_runs_the_layout(fake_te):
    """With Transformer Engine importable, auto picks it for a layout and recipe it runs, torchao for
    the rest (the seed's TP 4 and TP 8 presets), and says which and why in the console and manifest."""
    chosen = plan_fp8(config(), "cuda")
    assert chosen.backend == "te" and chosen.backend_reason.startswith("auto chose Transformer Engine")
    for name, tp in [("llama3-70b", 4), ("llama3-405b", 8)]:
        plan = plan_fp8(load_preset(name).config, "cuda")
        assert plan.backend == "torchao" and plan.recipe == "tensorwise"  # the preset's delayed, said
        reason = (
            "auto chose torchao: Transformer Engine's linears do their own tensor parallelism, which "
            f"mtk's DTensor plans (--tp {tp}) do not drive"
        )
        assert plan.backend_reason == reason
        assert reason in plan.summary() and plan.describe()["backend_reason"] == reason
    with pytest.raises(ConfigError, match=r"--fp8-backend te: .*\(--tp 4\) do not drive; use --fp8-backend"):
        plan_fp8(seed_preset("llama3-70b", fp8_backend="te"), "cuda")
    rowwise = plan_fp8(config(fp8_recipe="rowwise"), "cuda")  # a recipe TE lacks and torchao has
    assert (rowwise.backend, rowwise.recipe, rowwise.note) == ("torchao", "rowwise", None)
    assert "Transformer Engine has no rowwise scaling" in rowwise.backend_reason
    on_cpu = plan_fp8(config(), "cpu")
    assert (
        on_cpu.backend_reason == "auto chose torchao: Transformer Engine runs on CUDA devices only, not cpu"
    )
    assert plan_fp8(config(fp8_backend="torchao"), "cuda").backend_reason == "--fp8-backend torchao"


def test_auto_without_transformer_engine_says_so():
    plan = plan_fp8(config(), "cpu")
    assert plan.backend == "torchao"
    assert plan.backend_reason == "auto chose torchao: Transformer Engine is not installed"


@pytest.fixture
def fake_world():
    """A process group of 32 ranks in this process (torch's fake backend: collectives do nothing),
    this process rank 0: enough to build one rank's part of a parallel model."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=32, store=FakeStore())
    try:
        yield 32
    finally:
        dist.destroy_process_group()


def test_llama3_70b_with_fp8_plans_and_builds_at_tp4_beside_transformer_engine(fake_te, fake_world):
    """The seed's 70B layout (TP 4, PP 8, VP 5) shrunk in width: check_run passes, auto picks torchao,
    and rank 0 builds its five stages with FP8 linears sharded over TP."""
    from torch.distributed.tensor import Shard

    from mtk.config import check_run

    cfg = seed_preset("llama3-70b", train_iters=1)
    check_run(cfg, fake_world, SPEC)
    dims = ParallelDims.from_config(cfg, fake_world)
    assert (dims.tp, dims.pp, dims.vp) == (4, 8, 5)
    with torch.device("meta"):
        model = SPEC.build(cfg.model)
    built = parallelize(model, SPEC, cfg, dims, dims.build_mesh("cpu"), "cpu")
    assert built.fp8.backend == "torchao" and "(--tp 4)" in built.fp8.backend_reason
    assert [list(part.decoder.layers) for part in built.parts] == [["0"], ["8"], ["16"], ["24"], ["32"]]
    qkv_proj = built.parts[0].decoder.layers["0"].attention.qkv_proj
    assert type(qkv_proj).__name__ == "Float8Linear" and qkv_proj.weight.placements == (Shard(0),)
    heads, groups, d = cfg.model.num_attention_heads, cfg.model.num_query_groups, cfg.model.kv_channels
    assert qkv_proj.weight.to_local().shape == ((heads + 2 * groups) * d // 4, cfg.model.hidden_size)
