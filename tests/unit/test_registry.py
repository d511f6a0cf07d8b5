"""The family registry: a family defined outside mtk, registered with ``mtk.models.register_family``,
is trained, planned, shown and layout-checked like a built-in one, with no edit inside mtk/ or stages/."""

from __future__ import annotations

import pytest
import torch

from mtk.config import ConfigError, RunConfig, apply_overrides, check_run
from mtk.models import family_names, family_spec, register_family, unregister_family
from mtk.models.gpt import GPTFamily, GPTModel
from mtk.models.spec import PipelinedFamily, TrainableFamily
from mtk.presets import load_preset, preset_names
from tests.conftest import read_metrics, run
from tests.unit.test_parallel import check_pipeline_stages_compose, check_tp_plan


class ToyModel(GPTModel):
    """A decoder whose logits are scaled down: another model than GPT's, made of the same layers."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs) * 0.5


class ToyFamily(GPTFamily):
    """A family that lives in this test file: GPT's data and plan, its own model."""

    name = "toy"
    megatron_script = None  # Megatron-LM has no script for it
    model_takes_targets = False  # its loss is taken from its (scaled) logits, not GPT's fused head

    def new_model(self, config):
        return ToyModel(config)

    def pipeline_stage(self, model, layers, first, last):
        stage = model.pipeline_stage(layers, first, last)
        return stage if last else _unscaled(stage)


def _unscaled(stage):
    """A stage before the last returns hidden states: the toy's scale applies to logits only."""
    stage.__class__ = GPTModel
    return stage


TOY = ToyFamily()

PRESET = """\
description = "A toy family registered from outside mtk"
tiny = true

[model]
family = "toy"
num_layers = 2
hidden_size = 64
num_attention_heads = 4
seq_length = 32
vocab_size = 512
hidden_dropout = 0.0
attention_dropout = 0.0

[train]
micro_batch_size = 2
global_batch_size = 4
train_iters = 2
lr = 1.0e-3
"""


@pytest.fixture
def toy(tmp_path):
    """The toy family registered for one test (and removed after it), and its preset file."""
    register_family("toy", TOY)
    preset = tmp_path / "toy.toml"
    preset.write_text(PRESET, encoding="utf-8")
    yield preset
    unregister_family("toy")
    assert "toy" not in family_names()


def test_the_registry_lists_every_built_in_family_with_a_tiny_preset():
    assert family_names()[:4] == ["gpt", "bert", "t5", "retro"]
    for name in family_names():
        spec = family_spec(name)
        assert spec.name == name and isinstance(spec, TrainableFamily)
        tiny = load_preset(spec.tiny_preset)
        assert tiny.tiny and tiny.config.model.family == name


def test_an_unknown_family_names_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model family 'nope' \(known: gpt, bert, t5, retro\)"):
        family_spec("nope")
    output = run("train", "--preset", "gpt-tiny", "--set", "family=nope", "--mock-data", "--save",
                 str(tmp_path / "run"), code=2)  # fmt: skip
    assert "unknown model family 'nope'" in output and "gpt, bert, t5, retro" in output


def test_registration_refuses_another_spec_under_a_known_name(toy):
    register_family("toy", TOY)  # the same spec again: nothing changes
    assert family_names().count("toy") == 1 and family_spec("toy") is TOY
    with pytest.raises(ConfigError, match="already registered"):
        register_family("toy", ToyFamily())
    with pytest.raises(ConfigError, match="already registered"):
        register_family("gpt", ToyFamily.__new__(type("Gpt", (ToyFamily,), {"name": "gpt"})))
    with pytest.raises(ConfigError, match="named 'toy'"):
        register_family("other", ToyFamily())
    with pytest.raises(TypeError):
        register_family("toy", object())
    with pytest.raises(ConfigError, match="built in"):
        unregister_family("gpt")
    stray = type("Stray", (ToyFamily,), {"name": "stray", "config_fields": ("retro_chunk_size",)})()
    with pytest.raises(
        ConfigError, match=r"config_fields \['retro_chunk_size'\] are not fields of ModelConfig"
    ):
        register_family("stray", stray)
    assert "stray" not in family_names()


def test_a_family_registered_outside_mtk_trains_plans_and_shows(toy, tmp_path):
    assert family_names()[-1] == "toy"
    output = run("presets", "show", str(toy))
    parameters = TOY.num_parameters(load_preset(str(toy)).config.model)
    assert f"parameters: {parameters:,}" in output and "'toy'" in output
    assert "decoder layers" in output and "retro_chunk_length" not in output  # GPT's breakdown, no RETRO rows
    output = run("plan", "--preset", str(toy), "--gpus", "2")
    assert "TP" in output
    run("train", "--preset", str(toy), "--mock-data", "--train-iters", "2", "--log-interval", "1",
        "--eval-interval", "0", "--num-workers", "0", "--device", "cpu", "--save", str(tmp_path / "run"))  # fmt: skip
    records = read_metrics(tmp_path / "run", "train")
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    saved = RunConfig.from_json_file(tmp_path / "run" / "config.json")
    assert saved.model.family == "toy"


def test_a_registered_family_goes_through_the_layout_checks_of_the_built_in_ones(toy):
    config = apply_overrides(load_preset(str(toy)).sections, {"num_layers": 4, "seq_length": 16})
    assert isinstance(family_spec("toy"), PipelinedFamily)
    check_pipeline_stages_compose(config)
    check_tp_plan(config.model)


def _presets_of(name: str, toy) -> list[str]:
    """The tiny preset and a recipe of family ``name`` (the toy's preset file for the toy)."""
    if name == "toy":
        return [str(toy)]
    recipe = next(
        p for p in preset_names() if not load_preset(p).tiny and load_preset(p).config.model.family == name
    )
    return [family_spec(name).tiny_preset, recipe]


def test_every_family_breaks_its_parameter_count_down_by_part(toy):
    """The parts `mtk presets show` lists sum to the count, for every family, tiny and recipe sized."""
    for name in family_names():
        spec = family_spec(name)
        for preset in _presets_of(name, toy):
            config = load_preset(preset).config
            spec.complete(config.model)
            tp = config.parallel.tensor_model_parallel_size
            parts = spec.parameter_breakdown(config.model, tp)
            assert parts and all(count > 0 for count in parts.values()), (preset, parts)
            assert sum(parts.values()) == spec.num_parameters(config.model, tp), (preset, parts)
    assert list(family_spec("t5").parameter_breakdown(load_preset("t5-tiny").config.model)) == [
        "embeddings", "encoder layers", "encoder final norm", "decoder layers", "decoder final norm", "LM head"
    ]  # fmt: skip
    assert "retrieval encoder" in family_spec("retro").parameter_breakdown(
        load_preset("retro-tiny").config.model
    )


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny", "bert-tiny", "t5-tiny", "retro-tiny"])
def test_each_part_of_the_breakdown_is_the_size_of_its_modules(preset):
    """The parts, against the model built on meta: each part's modules (by parameter name) hold as many
    parameters as the part says."""
    config = load_preset(preset).config
    spec = family_spec(config.model.family)
    spec.complete(config.model)
    with torch.device("meta"):
        model = spec.new_model(config.model)
    modules = {
        "embeddings": ("embedding.", "position_embedding.", "token_type_embedding."),
        "embedding norm": ("embedding_norm.",),
        "decoder layers": ("decoder.layers.",),
        "encoder layers": ("encoder.layers.",),
        "final norm": ("decoder.final_norm.", "encoder.final_norm."),
        "encoder final norm": ("encoder.final_norm.",),
        "decoder final norm": ("decoder.final_norm.",),
        "output layer": ("output.",),
        "LM head": ("lm_head.",),
        "pooler and sentence-order head": ("pooler.", "binary_head."),
    }
    counted = {part: 0 for part in spec.parameter_breakdown(config.model)}
    for path, parameter in model.named_parameters():
        encoder = ".cross_attention.encoder." in path  # RETRO's, inside its first retrieval layer
        part = (
            "retrieval encoder"
            if encoder
            else next(p for p, names in modules.items() if path.startswith(names) and p in counted)
        )
        counted[part] += parameter.numel()
    assert counted == spec.parameter_breakdown(config.model)


def test_a_registered_family_refuses_the_settings_of_the_others(toy):
    config = apply_overrides(load_preset(str(toy)).sections, {"mock_data": True, "retro_chunk_length": 32})
    with pytest.raises(
        ConfigError, match="retro_chunk_length = 32 is a setting of family 'retro'; this run is family 'toy'"
    ):
        check_run(config, 1, family_spec("toy"))
    check_run(apply_overrides(load_preset(str(toy)).sections, {"mock_data": True}), 1, family_spec("toy"))
