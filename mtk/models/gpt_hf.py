"""The decoder's Hugging Face model types: ``llama`` (``LlamaForCausalLM``; plain RoPE or Llama 3.1's
scaled one, ``rope_type`` "llama3"; other scalings are refused) and ``gpt2`` (``GPT2LMHeadModel``); the
family spec (``mtk.models.gpt.SPEC``) declares them, ``mtk.hf`` reads and writes the folders."""

from __future__ import annotations

from typing import Any

import torch

from mtk.config import ModelConfig
from mtk.layers.attention import fuse_qkv, split_qkv
from mtk.models.hf_adapter import HFAdapter, HFError, per_layer, qkv_per_layer, shape, with_kinds

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


class Llama(HFAdapter):
    model_type, hf_class, base_prefix, default_preset = "llama", "LlamaForCausalLM", "model.", "llama3-8b"
    vocab_rows = ("embedding.weight", "output.weight")  # the output layer when untied

    def matches(self, config: ModelConfig) -> bool:
        return config.swiglu

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
            **shape(config),
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
            "attention.out_proj.weight": "self_attn.o_proj.weight",
            "mlp_norm.weight": "post_attention_layernorm.weight",
            "mlp.gate.weight": "mlp.gate_proj.weight",
            "mlp.fc1.weight": "mlp.up_proj.weight",
            "mlp.fc2.weight": "mlp.down_proj.weight",
        }
        names = {
            "embedding.weight": "embed_tokens.weight",
            **per_layer(config, layer, "decoder.layers", "layers"),
            "decoder.final_norm.weight": "norm.weight",
        }
        if config.untie_embeddings_and_output_weights:
            names["output.weight"] = "lm_head.weight"
        return names

    def qkv_parts(self, config: ModelConfig) -> dict[str, tuple[str, str, str]]:
        parts = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        return qkv_per_layer(config, "decoder.layers", "layers", parts, ("weight",))

    def tied_outputs(self, config: ModelConfig) -> dict[str, str]:
        return {} if config.untie_embeddings_and_output_weights else {"lm_head.weight": "embedding.weight"}


class GPT2(HFAdapter):
    """GPT-2: its Conv1D layers store weights transposed, and q, k, v as one ``c_attn``."""

    model_type, hf_class, base_prefix, default_preset = "gpt2", "GPT2LMHeadModel", "transformer.", "gpt3-345m"
    activations = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}  # -> openai_gelu

    def matches(self, config: ModelConfig) -> bool:
        return not config.swiglu

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
        layer = with_kinds({"attention_norm": "ln_1", "mlp_norm": "ln_2", "attention.out_proj": "attn.c_proj",
                             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}, ("weight", "bias"))  # fmt: skip
        return {
            "embedding.weight": "wte.weight",
            "position_embedding.weight": "wpe.weight",
            **per_layer(config, layer, "decoder.layers", "h"),
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
                fused = fused.t() if kind == "weight" else fused  # q, k, v one after the other
                out[f"decoder.layers.{i}.attention.qkv_proj.{kind}"] = fuse_qkv(
                    *fused.chunk(3, dim=0), config.num_query_groups
                )
        return out

    def to_hf(self, state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        names = self.names(config)
        out = {names[o]: (t.t() if self._conv1d(names[o]) else t) for o, t in state.items() if o in names}
        for i in range(config.num_layers):
            for kind in ("weight", "bias"):
                ours = state[f"decoder.layers.{i}.attention.qkv_proj.{kind}"]
                fused = torch.cat(split_qkv(ours, config.num_attention_heads, config.num_query_groups))
                out[f"h.{i}.attn.c_attn.{kind}"] = fused.t() if kind == "weight" else fused
        return out

    def used_names(self, config: ModelConfig) -> set[str]:
        fused = {f"h.{i}.attn.c_attn.{kind}" for i in range(config.num_layers) for kind in ("weight", "bias")}
        return super().used_names(config) | fused

    def tied_outputs(self, config: ModelConfig) -> dict[str, str]:
        return {"lm_head.weight": "embedding.weight"}
