"""Hugging Face checkpoints in and out of mtk run directories.

Model types: ``bert`` (post-norm, the original), ``megatron-bert`` (Megatron's pre-norm BERT),
``llama`` and ``gpt2`` (mtk's decoder). A Hugging Face folder holds ``config.json`` and
``*.safetensors`` (or ``pytorch_model.bin``, read with ``torch.load(weights_only=True)``, which runs
no code). ``import_hf`` turns it into an mtk run directory whose iteration-0 checkpoint holds the
weights and whose tokenizer is the folder's (tokenizer.json or vocab.txt; none only when asked), so
``mtk train --load`` continues from it and ``mtk generate`` samples from it; ``export_hf`` writes a
run's checkpoint back as a folder ``transformers`` loads (``BertForPreTraining``,
``MegatronBertForPreTraining``, ``LlamaForCausalLM``, ``GPT2LMHeadModel``). Llama's RoPE is plain or
Llama 3.1's scaled one (``rope_type`` "llama3"); other scalings are refused. Norm weights mtk holds
zero-centred (``apply_layernorm_1p``: gamma - 1) are written as Hugging Face's gamma.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Collection
from pathlib import Path
from typing import Any, ClassVar

import torch

from mtk.checkpoint import CheckpointError, checkpoint_description, load_checkpoint
from mtk.config import ModelConfig, RunConfig
from mtk.manifest import atomic_output, atomic_write_text


class HFError(ValueError):
    """A Hugging Face folder mtk cannot read or a checkpoint it cannot write as one."""


def _per_layer(config: ModelConfig, table: dict[str, str], ours: str, theirs: str) -> dict[str, str]:
    """``table`` (mtk suffix -> Hugging Face suffix) for every layer, under both prefixes."""
    return {
        f"{ours}.{i}.{a}": f"{theirs}.{i}.{b}" for i in range(config.num_layers) for a, b in table.items()
    }


def _with_kinds(table: dict[str, str], kinds: tuple[str, ...]) -> dict[str, str]:
    return {f"{a}.{kind}": f"{b}.{kind}" for a, b in table.items() for kind in kinds}


def _shape(config: ModelConfig) -> dict[str, Any]:
    """The sizes BERT and Llama configs name alike."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.init_method_std,
    }


class Architecture(ABC):
    """One Hugging Face model type: its config, its parameter names, what it ties."""

    model_type: ClassVar[str]
    hf_class: ClassVar[str]
    base_prefix: ClassVar[str]  # the base model's prefix in the *ForX class ("bert.", "model." ...)
    default_preset: ClassVar[str]
    heads: ClassVar[tuple[str, ...]] = ()  # mtk parameters a bare base-model checkpoint may lack
    vocab_rows: ClassVar[tuple[str, ...]] = ("embedding.weight",)  # padded to mtk's vocabulary
    tokenizer_files: ClassVar[tuple[tuple[str, str], ...]] = (("tokenizer.json", "hf"),)  # the first found

    @abstractmethod
    def model_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        """mtk's [model] values for ``config.json``; HFError for what mtk's model does not do."""

    @abstractmethod
    def hf_config(self, config: ModelConfig) -> dict[str, Any]:
        """``config.json`` values for an mtk model config; HFError for what the type cannot hold."""

    @abstractmethod
    def names(self, config: ModelConfig) -> dict[str, str]:
        """mtk parameter -> Hugging Face name (base-model names without ``base_prefix``)."""

    def to_mtk(self, weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        names = self.names(config)
        return {ours: weights[theirs] for ours, theirs in names.items() if theirs in weights}

    def to_hf(self, state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        names = self.names(config)
        return {names[ours]: tensor for ours, tensor in state.items()}

    def tied_outputs(self, config: ModelConfig) -> dict[str, str]:
        """Hugging Face output weights that are copies of the embedding in a tied model (exported too)."""
        return {}

    def used_names(self, config: ModelConfig) -> set[str]:
        return set(self.names(config).values()) | set(self.tied_outputs(config))


# ---- BERT ---------------------------------------------------------------------------------------


class Bert(Architecture):
    model_type, hf_class, base_prefix, default_preset = "bert", "BertForPreTraining", "bert.", "bert-340m"
    heads = ("lm_head.", "binary_head.", "pooler.")
    vocab_rows = ("embedding.weight", "lm_head.bias")
    tokenizer_files = (("vocab.txt", "wordpiece"),)  # the WordPiece vocabulary BERT data is prepared with
    # where the norms sit: after each residual add and on the embeddings
    norms = ({"embedding_norm": "embeddings.LayerNorm"}, {"attention_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"})  # fmt: skip

    def model_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        problems = []
        if hf.get("hidden_act", "gelu") != "gelu":
            problems.append(f"hidden_act {hf['hidden_act']!r} (mtk's BERT uses the exact 'gelu')")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            problems.append(f"position_embedding_type {hf['position_embedding_type']!r}")
        if hf.get("type_vocab_size", 2) != 2:
            problems.append(f"type_vocab_size {hf['type_vocab_size']} (mtk's BERT has 2 token types)")
        if problems:
            raise HFError("this BERT differs from mtk's: " + "; ".join(problems))
        return {
            "family": "bert",
            "num_layers": hf["num_hidden_layers"],
            "hidden_size": hf["hidden_size"],
            "num_attention_heads": hf["num_attention_heads"],
            "ffn_hidden_size": hf["intermediate_size"],
            "max_position_embeddings": hf["max_position_embeddings"],
            "vocab_size": hf["vocab_size"],
            "norm_epsilon": hf.get("layer_norm_eps", 1e-12),
            "hidden_dropout": hf.get("hidden_dropout_prob", 0.1),
            "attention_dropout": hf.get("attention_probs_dropout_prob", 0.1),
            "init_method_std": hf.get("initializer_range", 0.02),
            "normalization": "LayerNorm",
            "add_bias_linear": True,
            "bert_binary_head": True,
            "post_norm": self.model_type == "bert",
        }

    def hf_config(self, config: ModelConfig) -> dict[str, Any]:
        if not config.bert_binary_head:
            raise HFError(
                "a BERT without token types and pooler (bert_binary_head false); Hugging Face's has both"
            )
        if config.num_attention_heads * config.kv_channels != config.hidden_size:
            raise HFError("Hugging Face BERT needs heads x head width == hidden_size")
        return {
            **_shape(config),
            "hidden_act": "gelu",
            "hidden_dropout_prob": config.hidden_dropout,
            "attention_probs_dropout_prob": config.attention_dropout,
            "type_vocab_size": 2,
            "layer_norm_eps": config.norm_epsilon,
            "position_embedding_type": "absolute",
        }

    def names(self, config: ModelConfig) -> dict[str, str]:
        model_norms, layer_norms = self.norms
        kinds = ("weight", "bias")
        layer = {
            "attention.q_proj": "attention.self.query",
            "attention.k_proj": "attention.self.key",
            "attention.v_proj": "attention.self.value",
            "attention.out_proj": "attention.output.dense",
            "mlp.fc1": "intermediate.dense",
            "mlp.fc2": "output.dense",
            **layer_norms,
        }
        return {
            "embedding.weight": "embeddings.word_embeddings.weight",
            "position_embedding.weight": "embeddings.position_embeddings.weight",
            "token_type_embedding.weight": "embeddings.token_type_embeddings.weight",
            **_with_kinds(model_norms, kinds),
            **_with_kinds(_per_layer(config, layer, "encoder.layers", "encoder.layer"), kinds),
            **_with_kinds({"pooler.dense": "pooler.dense", "binary_head": "cls.seq_relationship"}, kinds),
            **_with_kinds({"lm_head.dense": "cls.predictions.transform.dense"}, kinds),
            **_with_kinds({"lm_head.norm": "cls.predictions.transform.LayerNorm"}, kinds),
            "lm_head.bias": "cls.predictions.bias",
        }

    def tied_outputs(self, config: ModelConfig) -> dict[str, str]:
        return {"cls.predictions.decoder.weight": "embedding.weight"}


class MegatronBert(Bert):
    model_type, hf_class = "megatron-bert", "MegatronBertForPreTraining"
    # before each block and at the end of the encoder, none on the embeddings
    norms = ({"encoder.final_norm": "encoder.ln"}, {"attention_norm": "attention.ln", "mlp_norm": "ln"})


# ---- decoders -----------------------------------------------------------------------------------


# Llama 3.1's RoPE scaling ("rope_type": "llama3"): Hugging Face key -> mtk's [model] key
LLAMA3_ROPE_SCALING = {
    "factor": "rope_scaling_factor",
    "low_freq_factor": "rope_scaling_low_freq_factor",
    "high_freq_factor": "rope_scaling_high_freq_factor",
    "original_max_position_embeddings": "rope_scaling_original_max_position_embeddings",
}


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """mtk's RoPE settings for a config.json: the base, and Llama 3.1's scaling when it has it (in
    ``rope_scaling``, as Llama 3.1's own config.json, or ``rope_parameters``, as transformers 5 saves)."""
    parameters = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = parameters.get("rope_type", parameters.get("type")) or "default"
    theta = float(hf.get("rope_theta") or parameters.get("rope_theta") or 10000.0)
    if theta != int(theta):
        raise HFError(f"rope_theta {theta}: mtk takes a whole number")
    rope = {"rotary_base": int(theta)}
    if kind == "default":
        return rope
    if kind != "llama3":
        raise HFError(
            f"RoPE scaling {kind!r}: mtk's Llama takes plain RoPE or Llama 3.1's scaling (rope_type 'llama3')"
        )
    missing = [key for key in LLAMA3_ROPE_SCALING if parameters.get(key) is None]
    if missing:
        raise HFError(f"RoPE scaling 'llama3' without {', '.join(missing)}")
    scaling = {ours: parameters[key] for key, ours in LLAMA3_ROPE_SCALING.items()}
    return rope | {"use_rope_scaling": True} | scaling


def _llama3_rope_scaling(config: ModelConfig) -> dict[str, Any]:
    """The ``rope_scaling`` entry of config.json for mtk's RoPE scaling, as Llama 3.1's own."""
    return {"rope_type": "llama3"} | {key: getattr(config, ours) for key, ours in LLAMA3_ROPE_SCALING.items()}


class Llama(Architecture):
    model_type, hf_class, base_prefix, default_preset = "llama", "LlamaForCausalLM", "model.", "llama3-8b"
    vocab_rows = ("embedding.weight", "output.weight")  # the output layer when untied

    def model_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias") or hf.get("attention_bias"):
            raise HFError("this Llama differs from mtk's (SiLU gated MLP, no biases)")
        heads = hf["num_attention_heads"]
        return {
            "family": "gpt",
            "num_layers": hf["num_hidden_layers"],
            "hidden_size": hf["hidden_size"],
            "num_attention_heads": heads,
            "num_query_groups": hf.get("num_key_value_heads") or heads,
            "kv_channels": hf.get("head_dim") or hf["hidden_size"] // heads,
            "ffn_hidden_size": hf["intermediate_size"],
            "max_position_embeddings": hf["max_position_embeddings"],
            "vocab_size": hf["vocab_size"],
            "normalization": "RMSNorm",
            "norm_epsilon": hf.get("rms_norm_eps", 1e-6),
            "position_embedding_type": "rope",
            **_rope(hf),
            "swiglu": True,
            "add_bias_linear": False,
            "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", False),
            "init_method_std": hf.get("initializer_range", 0.02),
            "hidden_dropout": 0.0,
            "attention_dropout": hf.get("attention_dropout", 0.0),
        }

    def hf_config(self, config: ModelConfig) -> dict[str, Any]:
        if not (
            config.swiglu and config.normalization == "RMSNorm" and config.position_embedding_type == "rope"
        ):
            raise HFError("only a Llama-shaped model (SwiGLU, RMSNorm, RoPE) exports as 'llama'")
        return {
            **_shape(config),
            "num_key_value_heads": config.num_query_groups,
            "head_dim": config.kv_channels,
            "hidden_act": "silu",
            "rms_norm_eps": config.norm_epsilon,
            "rope_theta": float(config.rotary_base),
            **({"rope_scaling": _llama3_rope_scaling(config)} if config.use_rope_scaling else {}),
            "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
            "attention_bias": config.add_bias_linear,
            "mlp_bias": config.add_bias_linear,
        }

    def names(self, config: ModelConfig) -> dict[str, str]:
        layer = {
            "attention_norm.weight": "input_layernorm.weight",
            "attention.q_proj.weight": "self_attn.q_proj.weight",
            "attention.k_proj.weight": "self_attn.k_proj.weight",
            "attention.v_proj.weight": "self_attn.v_proj.weight",
            "attention.out_proj.weight": "self_attn.o_proj.weight",
            "mlp_norm.weight": "post_attention_layernorm.weight",
            "mlp.gate.weight": "mlp.gate_proj.weight",
            "mlp.fc1.weight": "mlp.up_proj.weight",
            "mlp.fc2.weight": "mlp.down_proj.weight",
        }
        names = {
            "embedding.weight": "embed_tokens.weight",
            **_per_layer(config, layer, "decoder.layers", "layers"),
            "decoder.final_norm.weight": "norm.weight",
        }
        if config.untie_embeddings_and_output_weights:
            names["output.weight"] = "lm_head.weight"
        return names

    def tied_outputs(self, config: ModelConfig) -> dict[str, str]:
        return {} if config.untie_embeddings_and_output_weights else {"lm_head.weight": "embedding.weight"}


class GPT2(Architecture):
    """GPT-2: its Conv1D layers store weights transposed, and q, k, v as one ``c_attn``."""

    model_type, hf_class, base_prefix, default_preset = "gpt2", "GPT2LMHeadModel", "transformer.", "gpt3-345m"
    activations = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}  # -> openai_gelu

    def model_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        activation = hf.get("activation_function", "gelu_new")
        if activation not in self.activations:
            raise HFError(
                f"activation_function {activation!r}: mtk's GPT takes {', '.join(self.activations)}"
            )
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise HFError("GPT-2 attention variants (scaled by layer index, reordered) are not mtk's")
        return {
            "family": "gpt",
            "num_layers": hf["n_layer"],
            "hidden_size": hf["n_embd"],
            "num_attention_heads": hf["n_head"],
            "ffn_hidden_size": hf.get("n_inner") or 4 * hf["n_embd"],
            "max_position_embeddings": hf["n_positions"],
            "vocab_size": hf["vocab_size"],
            "normalization": "LayerNorm",
            "norm_epsilon": hf.get("layer_norm_epsilon", 1e-5),
            "position_embedding_type": "learned_absolute",
            "openai_gelu": self.activations[activation],
            "add_bias_linear": True,
            "untie_embeddings_and_output_weights": False,
            "init_method_std": hf.get("initializer_range", 0.02),
            "hidden_dropout": hf.get("resid_pdrop", 0.1),
            "attention_dropout": hf.get("attn_pdrop", 0.1),
        }

    def hf_config(self, config: ModelConfig) -> dict[str, Any]:
        if (
            config.swiglu
            or config.normalization != "LayerNorm"
            or config.position_embedding_type != "learned_absolute"
            or config.untie_embeddings_and_output_weights
            or not config.add_bias_linear
            or config.num_query_groups != config.num_attention_heads
        ):
            raise HFError(
                "only a GPT-2-shaped model (LayerNorm, learned positions, tied, biases, no GQA) exports as 'gpt2'"
            )
        return {
            "vocab_size": config.vocab_size,
            "n_embd": config.hidden_size,
            "n_layer": config.num_layers,
            "n_head": config.num_attention_heads,
            "n_inner": config.ffn_hidden_size,
            "n_positions": config.max_position_embeddings,
            "layer_norm_epsilon": config.norm_epsilon,
            "activation_function": "gelu_new" if config.openai_gelu else "gelu",
            "resid_pdrop": config.hidden_dropout,
            "embd_pdrop": config.hidden_dropout,
            "attn_pdrop": config.attention_dropout,
            "initializer_range": config.init_method_std,
            "tie_word_embeddings": True,
        }

    def names(self, config: ModelConfig) -> dict[str, str]:
        layer = _with_kinds({"attention_norm": "ln_1", "mlp_norm": "ln_2", "attention.out_proj": "attn.c_proj",
                             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}, ("weight", "bias"))  # fmt: skip
        return {
            "embedding.weight": "wte.weight",
            "position_embedding.weight": "wpe.weight",
            **_per_layer(config, layer, "decoder.layers", "h"),
            "decoder.final_norm.weight": "ln_f.weight",
            "decoder.final_norm.bias": "ln_f.bias",
        }

    def _conv1d(self, name: str) -> bool:
        return name.endswith(("c_proj.weight", "c_fc.weight", "c_attn.weight"))

    def to_mtk(self, weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        out = {ours: (weights[t].t() if self._conv1d(t) else weights[t]) for ours, t in self.names(config).items() if t in weights}  # fmt: skip
        for i in range(config.num_layers):
            for kind in ("weight", "bias"):
                fused = weights.get(f"h.{i}.attn.c_attn.{kind}")
                if fused is None:
                    continue
                fused = fused.t() if kind == "weight" else fused
                for part, piece in zip("qkv", fused.chunk(3, dim=0), strict=True):
                    out[f"decoder.layers.{i}.attention.{part}_proj.{kind}"] = piece
        return out

    def to_hf(self, state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        names = self.names(config)
        out = {names[o]: (t.t() if self._conv1d(names[o]) else t) for o, t in state.items() if o in names}
        for i in range(config.num_layers):
            for kind in ("weight", "bias"):
                parts = [state[f"decoder.layers.{i}.attention.{p}_proj.{kind}"] for p in "qkv"]
                fused = torch.cat(parts, dim=0)
                out[f"h.{i}.attn.c_attn.{kind}"] = fused.t() if kind == "weight" else fused
        return out

    def used_names(self, config: ModelConfig) -> set[str]:
        fused = {f"h.{i}.attn.c_attn.{kind}" for i in range(config.num_layers) for kind in ("weight", "bias")}
        return super().used_names(config) | fused

    def tied_outputs(self, config: ModelConfig) -> dict[str, str]:
        return {"lm_head.weight": "embedding.weight"}


ARCHITECTURES = {arch.model_type: arch for arch in (Bert(), MegatronBert(), Llama(), GPT2())}
IGNORED = ("position_ids", ".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # buffers, not weights


def architecture(model_type: Any) -> Architecture:
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise HFError(
            f"model_type {model_type!r}: mtk imports {', '.join(repr(t) for t in ARCHITECTURES)} checkpoints"
        )
    return ARCHITECTURES[model_type]


def for_config(config: ModelConfig) -> Architecture:
    """The Hugging Face model type an mtk model exports as."""
    if config.family == "bert":
        return ARCHITECTURES["bert" if config.post_norm else "megatron-bert"]
    if config.family == "gpt":
        return ARCHITECTURES["llama" if config.swiglu else "gpt2"]
    raise HFError(f"a {config.family} model has no Hugging Face export in mtk")


# ---- reading and writing ------------------------------------------------------------------------


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face model folder: a JSON object, else HFError naming the file."""
    file = Path(folder) / "config.json"
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFError(f"{folder}: no config.json (is this a Hugging Face model folder?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HFError(f"{file}: unreadable ({err})") from None
    if not isinstance(hf, dict):
        raise HFError(f"{file}: expected a JSON object of the model's settings, found a {type(hf).__name__}")
    return hf


def _weight_files(folder: Path) -> list[tuple[Path, dict[str, torch.Tensor]]]:
    """Each weights file of a Hugging Face folder with its tensors, under the names it gives them."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        loaded = []
        for file in files:
            try:
                loaded.append((file, load_file(file)))
            except Exception as err:  # safetensors' own error type
                raise HFError(f"{file}: not a readable safetensors file ({err})") from None
        return loaded
    file = folder / "pytorch_model.bin"
    if not file.is_file():
        raise HFError(f"{folder}: no *.safetensors or pytorch_model.bin")
    try:
        return [(file, torch.load(file, map_location="cpu", weights_only=True))]
    except Exception as err:  # the weights-only unpickler refuses anything but tensors
        raise HFError(f"{file}: not a plain weights file ({err})") from None


def _check_weight(file: Path, name: str, tensor: torch.Tensor) -> None:
    """HFError unless ``tensor`` holds finite floating-point values: copying an integer tensor into a
    parameter would cast it, and a NaN would train to NaN."""
    if not tensor.is_floating_point():
        raise HFError(
            f"{file}: {name} is {str(tensor.dtype).removeprefix('torch.')}, not floating point; mtk imports "
            "float32, float16 or bfloat16 weights (dequantize a quantized checkpoint first)"
        )
    bad = tensor.numel() - int(torch.isfinite(tensor).sum())
    if bad:
        raise HFError(
            f"{file}: {name} holds {bad} NaN or infinite value{'s' if bad > 1 else ''} of "
            f"{tensor.numel():,}; the checkpoint is damaged (download it again)"
        )


def read_hf_weights(
    folder: str | os.PathLike, base_prefix: str, expected: Collection[str] = ()
) -> dict[str, torch.Tensor]:
    """Every weight of a Hugging Face folder (all ``*.safetensors`` shards, or ``pytorch_model.bin``
    read without running pickled code), base-model names without ``base_prefix``. The tensors named in
    ``expected`` (the same names) must hold finite floating-point values: HFError naming the tensor and
    its file otherwise."""
    weights = {}
    for file, tensors in _weight_files(Path(folder)):
        for name, tensor in tensors.items():
            ours = name.removeprefix(base_prefix)  # TF-era BERT names LayerNorm parameters gamma/beta
            ours = ours.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
                "LayerNorm.beta", "LayerNorm.bias"
            )
            if ours in expected:
                _check_weight(file, name, tensor)
            weights[ours] = tensor
    return weights


def hf_run_config(
    hf: dict[str, Any], preset_sections: dict[str, dict[str, Any]], where: str = "config.json"
) -> RunConfig:
    """A preset's training settings with the model of a Hugging Face ``config.json`` (``where``: the
    file, which every error names: a missing key, a value of the wrong type, a model mtk does not do)."""
    try:
        model = architecture(hf.get("model_type")).model_config(hf)
        model["seq_length"] = min(
            preset_sections.get("model", {}).get("seq_length", model["max_position_embeddings"]),
            model["max_position_embeddings"],
        )
    except KeyError as err:
        raise HFError(f"{where} has no {err.args[0]!r}, which a {hf['model_type']} model needs") from None
    except HFError as err:
        raise HFError(f"{where}: {err}") from None
    except (TypeError, ValueError, AttributeError, ArithmeticError) as err:
        raise HFError(
            f"{where}: a value of the wrong type ({err}); compare it with the model's original config.json"
        ) from None
    sections = {name: dict(values) for name, values in preset_sections.items()}
    sections["model"] = model
    return RunConfig.from_dict(sections, where=where)


def load_into(model: torch.nn.Module, arch: Architecture, weights: dict[str, torch.Tensor]) -> list[str]:
    """Copy Hugging Face ``weights`` (see ``read_hf_weights``) into an mtk ``model``; returns the heads
    that were not there (kept at their initial values). HFError for a missing weight or a shape. A
    norm weight Hugging Face stores as gamma goes into a zero-centred norm (``apply_layernorm_1p``)
    as gamma - 1."""
    from mtk.layers.norms import zero_centered_weights

    ours = arch.to_mtk(weights, model.config)
    centred = set(zero_centered_weights(model))
    missing = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            tensor = ours.get(name)
            if tensor is None:
                if not name.startswith(arch.heads):
                    raise HFError(
                        f"the checkpoint has no {arch.names(model.config).get(name, name)} (mtk's {name})"
                    )
                missing.append(name)
                continue
            target = param[: tensor.shape[0]] if name in arch.vocab_rows else param
            if target.shape != tensor.shape:
                theirs = arch.names(model.config).get(name, name)
                raise HFError(
                    f"the checkpoint's {theirs} has shape {tuple(tensor.shape)}, the model its config.json "
                    f"describes needs {tuple(target.shape)} (mtk's {name})"
                )
            target.copy_(tensor - 1 if name in centred else tensor)
            if name in arch.vocab_rows:
                param[tensor.shape[0] :].zero_()  # padding rows: never a real token
    return missing


def _folder_tokenizer(folder: Path, arch: Architecture) -> dict[str, Any]:
    """The folder's tokenizer as a manifest entry; HFError if it has none, or one mtk cannot read."""
    from mtk.data.tokenizer import TokenizerError, load_tokenizer

    for name, kind in arch.tokenizer_files:
        if (folder / name).is_file():
            try:
                return load_tokenizer(folder / name, kind).describe()
            except TokenizerError as err:
                problem = str(err)
            except UnicodeDecodeError as err:  # a binary vocab.txt
                problem = f"{folder / name}: not UTF-8 text ({err})"
            raise HFError(
                f"{problem}; replace it with the model's, or pass --no-tokenizer to import the weights alone"
            )
    looked_for = " or ".join(name for name, _ in arch.tokenizer_files)
    raise HFError(
        f"{folder}: no tokenizer (looked for {looked_for}); add the model's, or pass --no-tokenizer to "
        "import the weights alone (then prepare data with the model's tokenizer yourself)"
    )


def import_hf(
    folder: str | os.PathLike, preset: str | None, save: str | os.PathLike, with_tokenizer: bool = True
) -> dict[str, Any]:
    """Write an mtk run directory ``save`` whose iteration-0 checkpoint holds the model of ``folder``,
    and whose tokenizer is the folder's (``with_tokenizer`` False: none, the weights alone).

    Everything is checked before the model is allocated: config.json, the tokenizer, every weight
    (finite floating point, the names and shapes the config describes). Returns what was done: config,
    parameters, heads not in the checkpoint, unused checkpoint tensors, the tokenizer entry (or None).
    """
    from mtk.checkpoint import RunDir
    from mtk.data.prepared import DataFacts
    from mtk.models import family_spec
    from mtk.models.spec import check_model_fits
    from mtk.presets import load_preset
    from mtk.train.loop import Trainer, TrainOptions
    from mtk.train.run import write_run_description

    folder = Path(folder)
    hf, where = read_hf_config(folder), str(folder / "config.json")
    try:
        arch = architecture(hf.get("model_type"))
    except HFError as err:
        raise HFError(f"{where}: {err}") from None
    config = hf_run_config(hf, load_preset(preset or arch.default_preset).sections, where)
    spec = family_spec(config.model.family)
    check_model_fits(spec, config.model, torch.device("cpu"))  # before a weight is read
    if RunDir(save).checkpoints():
        raise CheckpointError(f"{save} already holds checkpoints; import into a new directory")
    tokenizer = _folder_tokenizer(folder, arch) if with_tokenizer else None
    used = arch.used_names(config.model)
    weights = read_hf_weights(folder, arch.base_prefix, expected=used)
    try:
        with torch.device("meta"):  # names and shapes against config.json, before a byte is allocated
            load_into(spec.build(config.model), arch, weights)
    except HFError as err:
        raise HFError(f"{folder}: {err}") from None
    model = spec.build(config.model)
    model.init_weights(config.train.seed)
    missing = load_into(model, arch, weights)
    unused = sorted(name for name in weights if name not in used and not name.endswith(IGNORED))
    # the checkpoint is a starting point: a preset without a run length (a batch-size ramp) still imports
    length = (
        {}
        if config.train.train_iters or config.train.train_samples and not config.train.batch_size_ramp
        else {"train_iters": 1}
    )
    trainer_config = dataclasses.replace(config, train=dataclasses.replace(config.train, **length))
    trainer = Trainer(
        trainer_config,
        model,
        (None, None, None),
        TrainOptions(save=str(save), device="cpu"),
        tokenizer=tokenizer,
    )
    facts = DataFacts(config.model.vocab_size, tokenizer.get("eod") if tokenizer else None, tokenizer, [])
    write_run_description(config, RunDir(save), facts, sum(p.numel() for p in model.parameters()))
    trainer.save()
    trainer.finish_save()
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "config": config,
        "missing": missing,
        "unused": unused,
        "parameters": parameters,
        "tokenizer": tokenizer,
    }


def _zero_centered_weights(config: ModelConfig) -> list[str]:
    """The parameters of a model of ``config`` that hold gamma - 1 (``apply_layernorm_1p``)."""
    if not config.apply_layernorm_1p:
        return []
    from mtk.layers.norms import zero_centered_weights
    from mtk.models import family_spec

    with torch.device("meta"):  # names only
        return zero_centered_weights(family_spec(config.family).build(config))


def export_hf(run_dir: str | os.PathLike, out: str | os.PathLike, iteration: int | None = None) -> Path:
    """A run's checkpoint as a Hugging Face folder: config.json, model.safetensors, and the tokenizer
    files the run records (tokenizer.json, or vocab.txt)."""
    from safetensors.torch import save_file

    description = checkpoint_description(run_dir, iteration)
    config = RunConfig.from_dict(description["config"]).model
    arch = for_config(config)
    hf_config = {"architectures": [arch.hf_class], "model_type": arch.model_type, **arch.hf_config(config)}
    state = load_checkpoint(run_dir, iteration)["model"]
    state = {name: t[: config.vocab_size] if name in arch.vocab_rows else t for name, t in state.items()}
    for name in _zero_centered_weights(config):  # gamma - 1 in mtk, gamma in Hugging Face
        state[name] = state[name] + 1
    converted = arch.to_hf(state, config)
    heads = tuple(name for name in arch.tied_outputs(config)) + ("cls.", "lm_head.")
    weights = {
        (name if name.startswith(heads) else f"{arch.base_prefix}{name}"): tensor.contiguous().clone()
        for name, tensor in converted.items()
    }
    for name, source in arch.tied_outputs(config).items():
        weights[name] = state[source].contiguous().clone()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / "model.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out / "config.json", json.dumps(hf_config, indent=2) + "\n")
    tokenizer = description.get("tokenizer") or {}
    source = Path(tokenizer["files"][0]["path"]) if tokenizer.get("files") else None
    if source is not None and source.is_file():
        if tokenizer["kind"] == "hf":
            shutil.copyfile(source, out / "tokenizer.json")
            config_file = source.with_name("tokenizer_config.json")
            if config_file.is_file():
                shutil.copyfile(config_file, out / "tokenizer_config.json")
        elif tokenizer["kind"] == "wordpiece":
            shutil.copyfile(source, out / "vocab.txt")
            settings = {"tokenizer_class": "BertTokenizer", "do_lower_case": tokenizer.get("lower_case")}
            atomic_write_text(out / "tokenizer_config.json", json.dumps(settings) + "\n")
    return out
