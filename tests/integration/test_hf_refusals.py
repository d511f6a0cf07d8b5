"""`mtk checkpoint import-hf` refuses a Hugging Face folder it cannot import faithfully: integer or
non-finite weights, a broken or missing tokenizer, a config.json that is not a model's settings or
describes a model far larger than its weights. One message naming the file, exit code 2, no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mtk.checkpoint import load_checkpoint
from mtk.generate import load_run
from tests.conftest import run


def import_hf(folder: Path, *options: str, code: int) -> str:
    save = folder.parent / "run"
    return run(
        "checkpoint", "import-hf", folder, "--preset", "llama-tiny", "--save", save, *options, code=code
    )


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A random 1-layer Llama (hidden 32, vocabulary 64) saved by transformers, with a tokenizer.json."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    vocab = {f"w{i}": i for i in range(64)}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture
def folder(tiny_llama, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "hf"))


def replace_weight(folder: Path, name: str, tensor: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights[name] = tensor
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_weights_are_refused_naming_the_tensor_and_dtype(folder, dtype):
    replace_weight(folder, "model.layers.0.mlp.up_proj.weight", torch.ones(64, 32, dtype=dtype))
    output = import_hf(folder, code=2)
    dtype_name = str(dtype).removeprefix("torch.")
    assert f"model.layers.0.mlp.up_proj.weight is {dtype_name}, not floating point" in output
    assert str(folder / "model.safetensors") in output


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor_and_file(folder, bad):
    weight = torch.randn(32, 32)
    weight[3, 5] = bad
    replace_weight(folder, "model.layers.0.self_attn.q_proj.weight", weight)
    output = import_hf(folder, code=2)
    file, name = folder / "model.safetensors", "model.layers.0.self_attn.q_proj.weight"
    assert f"{file}: {name} holds 1 NaN or infinite value of 1,024; the checkpoint is damaged" in output


def test_a_garbage_tokenizer_json_is_refused_naming_the_file(folder):
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    output = import_hf(folder, code=2)
    assert f"{folder / 'tokenizer.json'}: not a Hugging Face tokenizer.json" in output
    assert "--no-tokenizer" in output


def test_a_folder_without_a_tokenizer_is_refused_unless_no_tokenizer_is_given(folder):
    from safetensors.torch import load_file

    (folder / "tokenizer.json").unlink()
    output = import_hf(folder, code=2)
    assert f"{folder}: no tokenizer (looked for tokenizer.json)" in output
    assert "--no-tokenizer to import the weights alone" in output
    assert not (folder.parent / "run").exists()

    output = import_hf(folder, "--no-tokenizer", code=0)
    assert "without a tokenizer (--no-tokenizer)" in output
    model, tokenizer = load_run(folder.parent / "run")
    assert tokenizer is None
    theirs = load_file(folder / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(
        load_checkpoint(folder.parent / "run")["model"]["decoder.layers.0.mlp.fc1.weight"], theirs
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('{"model_type": "llama", "hidden_size": ', "unreadable (Expecting value"),
        ("[1, 2]", "expected a JSON object of the model's settings, found a list"),
        ({"hidden_size": "32"}, "[model]: 'hidden_size' = '32' is not of type int"),
        ({"num_attention_heads": "4", "head_dim": None}, "a value of the wrong type"),
        ({"rope_parameters": [10000.0]}, "a value of the wrong type"),
        ({"model_type": ["llama"]}, "model_type ['llama']: mtk imports 'llama', 'gpt2'"),
    ],
)
def test_a_config_json_that_is_not_a_models_settings_is_refused_naming_the_file(folder, change, message):
    config = folder / "config.json"
    if isinstance(change, dict):
        config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    else:
        config.write_text(change)
    output = import_hf(folder, code=2)
    assert str(config) in output and message in output


def test_an_absurd_config_is_refused_before_the_model_is_allocated(folder):
    """hidden_size 2**20 would ask for terabytes; the 32-wide weights show it is not this model."""
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=2**20, head_dim=None)
    (folder / "config.json").write_text(json.dumps(config))
    output = import_hf(folder, code=2)
    assert "config.json" in output and "1048576" in output
