"""T5's Hugging Face model type ``t5`` (``T5ForConditionalGeneration``): v1.0 (ReLU MLP, output tied
to the embedding) and v1.1 / Flan-T5 (gated-GELU MLP, untied output); the family spec
(``mtk.models.t5.SPEC``) declares it, ``mtk.hf`` reads and writes the folders.

Two factors of Hugging Face's T5 are folded into weights rather than made switches, exact both ways:

- its attention does not divide the scores by sqrt(head width) (its initialisation absorbs it), mtk's
  does: the query projections are multiplied by sqrt(d_kv) at import, divided at export;
- a tied T5 (v1.0) scales the decoder's output by d_model**-0.5 before the tied output layer: the
  scale goes into the decoder's final RMSNorm weight. So in mtk a tied T5 is a scaled one, and a
  checkpoint that neither scales nor has its own ``lm_head`` imports untied, the embedding copied.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mtk.config import ModelConfig
from mtk.models.hf_adapter import HFAdapter, HFError

MLPS = {"relu": ("fc1", "fc2"), "gated-gelu": ("gate", "fc1", "fc2")}  # feed_forward_proj -> mtk's
MLP_NAMES = {"relu": ("wi", "wo"), "gated-gelu": ("wi_0", "wi_1", "wo")}  # -> Hugging Face's
QUERIES = ("SelfAttention.q.weight", "EncDecAttention.q.weight")
FINAL_NORM = "decoder.final_norm.weight"


def fuse_kv(k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Separate key and value projections as one ``kv_proj`` (per group: its key, then its value)."""
    return torch.cat([t.reshape(groups, -1, *t.shape[1:]) for t in (k, v)], dim=1).flatten(0, 1)


def split_kv(kv: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``fuse_kv``'s inverse."""
    k, v = kv.reshape(groups, 2, -1, *kv.shape[1:]).unbind(1)
    return k.flatten(0, 1), v.flatten(0, 1)


def _output_scale(config: ModelConfig) -> float:
    return config.hidden_size**-0.5


class T5(HFAdapter):
    model_type, hf_class, base_prefix, default_preset = "t5", "T5ForConditionalGeneration", "", "t5-220m"
    vocab_rows = ("embedding.weight", "output.weight")

    def matches(self, config: ModelConfig) -> bool:
        return True

    def model_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        mlp = hf.get("feed_forward_proj", "relu")
        if mlp not in MLPS:
            raise HFError(f"feed_forward_proj {mlp!r}: mtk's T5 takes {' or '.join(map(repr, MLPS))}")
        # transformers 5 writes scale_decoder_outputs; older configs: a tied T5 scales, an untied one not
        scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
        gated = mlp == "gated-gelu"
        return {
            "family": "t5",
            "num_layers": hf["num_layers"],
            "decoder_num_layers": hf.get("num_decoder_layers") or hf["num_layers"],
            "hidden_size": hf["d_model"],
            "num_attention_heads": hf["num_heads"],
            "kv_channels": hf["d_kv"],
            "ffn_hidden_size": hf["d_ff"],
            "max_position_embeddings": hf.get("n_positions") or 512,  # relative positions: any length
            "vocab_size": hf["vocab_size"],
            "normalization": "RMSNorm",
            "norm_epsilon": hf.get("layer_norm_epsilon", 1e-6),
            "position_embedding_type": "relative",
            "relative_attention_num_buckets": hf.get("relative_attention_num_buckets", 32),
            "relative_attention_max_distance": hf.get("relative_attention_max_distance", 128),
            "relu": not gated,
            "geglu": gated,
            "openai_gelu": gated,  # gelu_new
            "add_bias_linear": False,
            "untie_embeddings_and_output_weights": not scaled,
            "hidden_dropout": hf.get("dropout_rate", 0.1),
            "attention_dropout": hf.get("dropout_rate", 0.1),
        }

    def hf_config(self, config: ModelConfig) -> dict[str, Any]:
        if not (
            config.position_embedding_type == "relative"
            and config.normalization == "RMSNorm"
            and not config.add_bias_linear
            and not config.post_norm
            and (config.relu or config.geglu and config.openai_gelu)
            and config.num_query_groups == config.num_attention_heads
        ):
            raise HFError(
                "only a Google-T5-shaped model (relative positions, RMSNorm, no biases, a ReLU or "
                "gated-GELU (openai_gelu) MLP, no GQA) exports as 't5'"
            )
        return {
            "vocab_size": config.vocab_size,
            "d_model": config.hidden_size,
            "d_kv": config.kv_channels,
            "d_ff": config.ffn_hidden_size,
            "num_layers": config.num_layers,
            "num_decoder_layers": config.decoder_num_layers,
            "num_heads": config.num_attention_heads,
            "n_positions": config.max_position_embeddings,
            "relative_attention_num_buckets": config.relative_attention_num_buckets,
            "relative_attention_max_distance": config.relative_attention_max_distance,
            "dropout_rate": config.hidden_dropout,
            "layer_norm_epsilon": config.norm_epsilon,
            "feed_forward_proj": "gated-gelu" if config.geglu else "relu",
            "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
            "is_encoder_decoder": True,
            # T5's SentencePiece ids: <pad> 0 starts the decoder, </s> 1 ends an answer
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
        }

    @staticmethod
    def _stacks(config: ModelConfig) -> list[tuple[str, int, list[str]]]:
        """(stack, layers, the Hugging Face sub-layers of each: attention, [cross-attention,] MLP)."""
        decoder_layers = config.decoder_num_layers or config.num_layers
        return [
            ("encoder", config.num_layers, ["SelfAttention", "DenseReluDense"]),
            ("decoder", decoder_layers, ["SelfAttention", "EncDecAttention", "DenseReluDense"]),
        ]

    def names(self, config: ModelConfig) -> dict[str, str]:
        mlp = "gated-gelu" if config.geglu else "relu"
        names = {"embedding.weight": "shared.weight"}
        for stack, layers, parts in self._stacks(config):
            norms = ["attention_norm", "cross_norm", "mlp_norm"] if len(parts) == 3 else ["attention_norm", "mlp_norm"]  # fmt: skip
            for i in range(layers):
                ours, theirs = f"{stack}.layers.{i}", f"{stack}.block.{i}.layer"
                names.update(
                    {f"{ours}.{n}.weight": f"{theirs}.{j}.layer_norm.weight" for j, n in enumerate(norms)}
                )
                names[f"{ours}.attention.out_proj.weight"] = f"{theirs}.0.SelfAttention.o.weight"
                if len(parts) == 3:
                    names[f"{ours}.cross_attention.q_proj.weight"] = f"{theirs}.1.EncDecAttention.q.weight"
                    names[f"{ours}.cross_attention.out_proj.weight"] = f"{theirs}.1.EncDecAttention.o.weight"
                for a, b in zip(MLPS[mlp], MLP_NAMES[mlp], strict=True):
                    names[f"{ours}.mlp.{a}.weight"] = f"{theirs}.{len(parts) - 1}.DenseReluDense.{b}.weight"
            bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
            names[f"{stack}_relative_bias.table.weight"] = bias
            names[f"{stack}.final_norm.weight"] = f"{stack}.final_layer_norm.weight"
        if config.untie_embeddings_and_output_weights:
            names["output.weight"] = "lm_head.weight"
        return names

    def qkv_parts(self, config: ModelConfig) -> dict[str, tuple[str, str, str]]:
        return {
            f"{stack}.layers.{i}.attention.qkv_proj.weight": tuple(
                f"{stack}.block.{i}.layer.0.SelfAttention.{p}.weight" for p in "qkv"
            )
            for stack, layers, _ in self._stacks(config)
            for i in range(layers)
        }

    def kv_parts(self, config: ModelConfig) -> dict[str, tuple[str, str]]:
        """mtk's cross-attention ``kv_proj`` -> Hugging Face's separate k and v."""
        layers = config.decoder_num_layers or config.num_layers
        return {
            f"decoder.layers.{i}.cross_attention.kv_proj.weight": tuple(
                f"decoder.block.{i}.layer.1.EncDecAttention.{p}.weight" for p in "kv"
            )
            for i in range(layers)
        }

    def to_mtk(self, weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        scale = math.sqrt(config.kv_channels)  # mtk divides the scores by it, Hugging Face's T5 does not
        weights = {name: t * scale if name.endswith(QUERIES) else t for name, t in weights.items()}
        out = super().to_mtk(weights, config)
        for ours, (k, v) in self.kv_parts(config).items():
            if k in weights and v in weights:
                out[ours] = fuse_kv(weights[k], weights[v], config.num_query_groups)
        if config.untie_embeddings_and_output_weights:
            if "output.weight" not in out and "embedding.weight" in out:  # tied, not scaled: a copy
                out["output.weight"] = out["embedding.weight"].clone()
        elif FINAL_NORM in out:
            out[FINAL_NORM] = out[FINAL_NORM] * _output_scale(config)
        return out

    def to_hf(self, state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        state = dict(state)
        kv = {ours: state.pop(ours) for ours in self.kv_parts(config)}
        if not config.untie_embeddings_and_output_weights:
            state[FINAL_NORM] = state[FINAL_NORM] / _output_scale(config)
        out = super().to_hf(state, config)
        for ours, parts in self.kv_parts(config).items():
            out.update(zip(parts, split_kv(kv[ours], config.num_query_groups), strict=True))
        scale = math.sqrt(config.kv_channels)
        return {name: t / scale if name.endswith(QUERIES) else t for name, t in out.items()}

    def used_names(self, config: ModelConfig) -> set[str]:
        return super().used_names(config) | {
            part for parts in self.kv_parts(config).values() for part in parts
        }
