"""BERT's Hugging Face model types: ``bert`` (post-norm, the original) and ``megatron-bert``
(Megatron's pre-norm BERT), as ``BertForPreTraining`` and ``MegatronBertForPreTraining``; the family
spec (``mtk.models.bert.SPEC``) declares them, ``mtk.hf`` reads and writes the folders."""

from __future__ import annotations

from typing import Any

from mtk.config import ModelConfig
from mtk.models.hf_adapter import HFAdapter, HFError, per_layer, qkv_per_layer, shape, with_kinds


class Bert(HFAdapter):
    model_type, hf_class, base_prefix, default_preset = "bert", "BertForPreTraining", "bert.", "bert-340m"
    heads = ("lm_head.", "binary_head.", "pooler.")
    vocab_rows = ("embedding.weight", "lm_head.bias")
    tokenizer_files = (("vocab.txt", "wordpiece"),)  # the WordPiece vocabulary BERT data is prepared with
    # where the norms sit: after each residual add and on the embeddings
    norms = ({"embedding_norm": "embeddings.LayerNorm"}, {"attention_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"})  # fmt: skip

    def matches(self, config: ModelConfig) -> bool:
        return config.post_norm == (self.model_type == "bert")

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
            **shape(config),
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
            "attention.out_proj": "attention.output.dense",
            "mlp.fc1": "intermediate.dense",
            "mlp.fc2": "output.dense",
            **layer_norms,
        }
        return {
            "embedding.weight": "embeddings.word_embeddings.weight",
            "position_embedding.weight": "embeddings.position_embeddings.weight",
            "token_type_embedding.weight": "embeddings.token_type_embeddings.weight",
            **with_kinds(model_norms, kinds),
            **with_kinds(per_layer(config, layer, "encoder.layers", "encoder.layer"), kinds),
            **with_kinds({"pooler.dense": "pooler.dense", "binary_head": "cls.seq_relationship"}, kinds),
            **with_kinds({"lm_head.dense": "cls.predictions.transform.dense"}, kinds),
            **with_kinds({"lm_head.norm": "cls.predictions.transform.LayerNorm"}, kinds),
            "lm_head.bias": "cls.predictions.bias",
        }

    def qkv_parts(self, config: ModelConfig) -> dict[str, tuple[str, str, str]]:
        parts = ("attention.self.query", "attention.self.key", "attention.self.value")
        return qkv_per_layer(config, "encoder.layers", "encoder.layer", parts, ("weight", "bias"))

    def tied_outputs(self, config: ModelConfig) -> dict[str, str]:
        return {"cls.predictions.decoder.weight": "embedding.weight"}


class MegatronBert(Bert):
    model_type, hf_class = "megatron-bert", "MegatronBertForPreTraining"
    # before each block and at the end of the encoder, none on the embeddings
    norms = ({"encoder.final_norm": "encoder.ln"}, {"attention_norm": "attention.ln", "mlp_norm": "ln"})
