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
from mtk.layers.attention import fuse_qkv, split_qkv


class HFError(ValueError):
    """A Hugging Face folder mtk cannot read or a checkpoint it cannot write as one."""


def per_layer(config: ModelConfig, table: dict[str, str], ours: str, theirs: str) -> dict[str, str]:
    """``table`` (mtk suffix -> Hugging Face suffix) for every layer, under both prefixes."""
    return {
        f"{ours}.{i}.{a}": f"{theirs}.{i}.{b}" for i in range(config.num_layers) for a, b in table.items()
    }


def qkv_per_layer(
    config: ModelConfig, ours: str, theirs: str, parts: tuple[str, str, str], kinds: tuple[str, ...]
) -> dict[str, tuple[str, str, str]]:
    """``HFAdapter.qkv_parts`` of every layer: ``{ours}.{i}.attention.qkv_proj.{kind}`` from the
    ``parts`` (suffixes of the q, k, v projections) under ``{theirs}.{i}``."""
    return {
        f"{ours}.{i}.attention.qkv_proj.{kind}": tuple(f"{theirs}.{i}.{part}.{kind}" for part in parts)
        for i in range(config.num_layers)
        for kind in kinds
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

    def qkv_parts(self, config: ModelConfig) -> dict[str, tuple[str, str, str]]:
        """mtk's fused self-attention projections (``qkv_proj``, ``mtk.layers.attention.fuse_qkv``)
        -> the Hugging Face q, k, v parameters each is made of (for types that keep them apart)."""
        return {}

    def to_mtk(self, weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        names = self.names(config)
        out = {ours: weights[theirs] for ours, theirs in names.items() if theirs in weights}
        for ours, parts in self.qkv_parts(config).items():
            if all(part in weights for part in parts):
                out[ours] = fuse_qkv(*(weights[part] for part in parts), config.num_query_groups)
        return out

    def to_hf(self, state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        names, fused = self.names(config), self.qkv_parts(config)
        out = {names[ours]: tensor for ours, tensor in state.items() if ours not in fused}
        for ours, parts in fused.items():
            pieces = split_qkv(state[ours], config.num_attention_heads, config.num_query_groups)
            out.update(zip(parts, pieces, strict=True))
        return out

    def tied_outputs(self, config: ModelConfig) -> dict[str, str]:
        """Hugging Face output weights that are copies of the embedding in a tied model (exported too)."""
        return {}

    def used_names(self, config: ModelConfig) -> set[str]:
        parts = {part for group in self.qkv_parts(config).values() for part in group}
        return set(self.names(config).values()) | parts | set(self.tied_outputs(config))
