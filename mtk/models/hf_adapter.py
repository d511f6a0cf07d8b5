"""What a Hugging Face model type is to mtk: the base of the adapters each family declares.

A family's spec lists its adapters (``TrainableFamily.hf_adapters``; GPT: Llama and GPT-2 in
``mtk/models/gpt_hf.py``, BERT: BERT and Megatron-BERT in ``mtk/models/bert_hf.py``). An adapter maps
``config.json`` to mtk's [model] values and back, and mtk's parameter names to Hugging Face's and back.
Reading and writing the folders (safetensors, config.json, the tokenizer, the run directory) is
``mtk.hf``'s, which finds an adapter by ``model_type`` among the registered families' adapters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from mtk.config import ModelConfig


class HFError(ValueError):
    """A Hugging Face folder mtk cannot read or a checkpoint it cannot write as one."""


def per_layer(config: ModelConfig, table: dict[str, str], ours: str, theirs: str) -> dict[str, str]:
    """``table`` (mtk suffix -> Hugging Face suffix) for every layer, under both prefixes."""
    return {
        f"{ours}.{i}.{a}": f"{theirs}.{i}.{b}" for i in range(config.num_layers) for a, b in table.items()
    }


def with_kinds(table: dict[str, str], kinds: tuple[str, ...]) -> dict[str, str]:
    return {f"{a}.{kind}": f"{b}.{kind}" for a, b in table.items() for kind in kinds}


def shape(config: ModelConfig) -> dict[str, Any]:
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


class HFAdapter(ABC):
    """One Hugging Face model type: its config, its parameter names, what it ties."""

    model_type: ClassVar[str]
    hf_class: ClassVar[str]
    base_prefix: ClassVar[str]  # the base model's prefix in the *ForX class ("bert.", "model." ...)
    default_preset: ClassVar[str]
    heads: ClassVar[tuple[str, ...]] = ()  # mtk parameters a bare base-model checkpoint may lack
    vocab_rows: ClassVar[tuple[str, ...]] = ("embedding.weight",)  # padded to mtk's vocabulary
    tokenizer_files: ClassVar[tuple[tuple[str, str], ...]] = (("tokenizer.json", "hf"),)  # the first found

    @abstractmethod
    def matches(self, config: ModelConfig) -> bool:
        """Whether a model of ``config`` (of the family declaring this adapter) exports as this type."""

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
