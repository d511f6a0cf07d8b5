"""Decoder-only language model covering GPT-3 and Llama 3: the config picks norm, positions, MLP, GQA, tying.

``GPTModel`` is the plain single-device module; ``SPEC`` is its family spec (``mtk.models.spec``).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtk.config import ModelConfig, RunConfig
from mtk.layers.attention import KVCache
from mtk.layers.init import Embedding, Linear, SeededModule
from mtk.layers.loss import LossTerm, loss_targets, projected_cross_entropy
from mtk.layers.transformer import TransformerBlock, embedding_parameters, layer_parameters, norm_parameters
from mtk.models.generation import CachedDecoding
from mtk.models.gpt_hf import GPT2, Llama
from mtk.models.spec import ModelBatch, PipelinedFamily


class DecoderLM(SeededModule):
    """A decoder language model around its ``decoder`` stack: token (and learned position) embeddings
    in, logits (batch, seq, padded vocab) out, projected by ``output`` or, tied, by the word embedding.

    What GPT and RETRO share; each model's ``forward`` says how its stack runs (GPT's on a KV cache
    and in pipeline stages, RETRO's with the neighbours).
    """

    def __init__(self, config: ModelConfig, decoder: nn.Module) -> None:
        super().__init__()
        self.config = config
        vocab, std = config.padded_vocab_size(), config.init_method_std
        self.embedding = Embedding(vocab, config.hidden_size, std)
        self.position_embedding = (
            Embedding(config.max_position_embeddings, config.hidden_size, std)
            if config.position_embedding_type == "learned_absolute"
            else None
        )
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.decoder = decoder
        self.output = (
            Linear(config.hidden_size, vocab, bias=False, std=std)
            if config.untie_embeddings_and_output_weights
            else None
        )
        self.init_unless_meta()

    def embed(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token (and learned position) embeddings, then dropout."""
        x = self.embedding(tokens)
        if self.position_embedding is not None:
            x = x + self.position_embedding(position_ids)
        return self.embedding_dropout(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The output projection: by ``output``, or by the word embedding when they are tied."""
        return self.output(x) if self.output is not None else F.linear(x, self.embedding.weight)

    def head(self, x: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | LossTerm:
        """The logits of ``x``, or given ``targets`` the language-model loss term (the output layer
        fused with the loss where it can be: ``mtk.layers.loss.projected_cross_entropy``)."""
        if targets is None:
            return self.logits(x)
        weight = self.output.weight if self.output is not None else self.embedding.weight
        return projected_cross_entropy(x, weight, targets, self.logits)


class GPTModel(DecoderLM):
    """tokens (batch, seq) -> logits (batch, seq, padded vocab); with ``kv_caches``
    (``new_kv_caches``) the tokens continue the ones run before; with ``targets`` (batch, seq) the
    loss term instead of the logits (Megatron's ``labels``).

    A pipeline stage (``pipeline_stage``) holds only the modules it runs, the others None. It embeds
    tokens only when ``pre_process`` (Megatron's name), else takes the previous stage's hidden
    states; it ends with the output projection only when ``post_process``, else returns hidden
    states. Two flags rather than None alone because of tying: a tied last stage keeps ``embedding``
    for its projection but does not embed, a tied first stage holds it but does not project.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, TransformerBlock(config, config.num_layers))
        self.pre_process = self.post_process = True

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor | LossTerm:
        if position_ids is None:
            start = 0 if kv_caches is None else kv_caches[0].length
            batch, length = tokens.shape[:2]  # token ids, or hidden states on a later pipeline stage
            # start: a static cache's length is a tensor
            position_ids = (start + torch.arange(length, device=tokens.device)).expand(batch, length)
        x = self.embed(tokens, position_ids) if self.pre_process else tokens
        x = self.decoder(x, kv_caches=kv_caches, position_ids=position_ids)
        return self.head(x, targets) if self.post_process else x

    def pipeline_stage(self, layers: range, first: bool, last: bool) -> GPTModel:
        """A copy keeping only what one pipeline stage runs (the rest None, the layers of other stages
        deleted); parameter names stay the whole model's."""
        stage = copy.deepcopy(self)
        stage.pre_process, stage.post_process = first, last
        for name in list(stage.decoder.layers.keys()):
            if int(name) not in layers:
                del stage.decoder.layers[name]
        if not first:
            stage.position_embedding = None
            if not (last and stage.output is None):  # a tied last stage projects with the embedding
                stage.embedding = None
        if not last:
            stage.decoder.final_norm = None
            stage.output = None
        return stage

    def new_kv_caches(
        self, batch: int, max_length: int, dtype: torch.dtype | None = None, static: bool = False
    ) -> list[KVCache]:
        """Empty caches of the layers; ``static``: a tensor length, for a compiled step (``KVCache``)."""
        weight = self.embedding.weight
        return [
            layer.attention.new_cache(batch, max_length, weight.device, dtype or weight.dtype, static)
            for layer in self.decoder.layers.values()
        ]


def decoder_breakdown(config: ModelConfig, tensor_parallel: int, stacks: dict[str, int]) -> dict[str, int]:
    """The parameters of a ``DecoderLM`` by part: its embeddings, ``stacks`` (the decoder's layers, by
    name), the decoder's final norm (none in a post-norm stack) and the output layer when untied."""
    parts = {"embeddings": embedding_parameters(config, tensor_parallel), **stacks}
    if not config.post_norm:
        parts["final norm"] = norm_parameters(config)
    if config.untie_embeddings_and_output_weights:
        parts["output layer"] = config.padded_vocab_size(tensor_parallel) * config.hidden_size
    return parts


class GPTFamily(PipelinedFamily):
    name = "gpt"
    hf_adapters = (Llama(), GPT2())  # mtk/models/gpt_hf.py
    generation = CachedDecoding()
    model_takes_targets = True
    tiny_preset = "gpt-tiny"
    megatron_script = "pretrain_gpt.py"
    megatron_inputs = (
        "--data-path PREFIX (or --mock-data) and the tokenizer's files: --vocab-file and --merge-file "
        "(GPT-2 BPE), or --tokenizer-type and --tokenizer-model"
    )

    def num_parameters(self, config: ModelConfig, tensor_parallel: int = 1) -> int:
        return sum(self.parameter_breakdown(config, tensor_parallel).values())

    def parameter_breakdown(self, config: ModelConfig, tensor_parallel: int = 1) -> dict[str, int]:
        return decoder_breakdown(
            config, tensor_parallel, {"decoder layers": config.num_layers * layer_parameters(config)}
        )

    def new_model(self, config: ModelConfig) -> GPTModel:
        return GPTModel(config)

    def blocks(self, model: GPTModel) -> list[nn.ModuleDict]:
        return [model.decoder.layers]

    def tp_plan(self, model: GPTModel) -> dict[str, str]:
        plan = {}
        if model.embedding is not None:  # also the tied copy on the last stage: sharded the same way
            plan["embedding"] = "vocab_embedding"
        if model.position_embedding is not None:
            plan["position_embedding"] = "vocab_embedding"  # positions split like a vocabulary
        plan.update(model.decoder.tp_plan("decoder"))
        if model.post_process:
            plan["decoder"] = "gather_output"
            if model.output is not None:
                plan["output"] = "vocab_output"
        return plan

    def pipeline_stage(self, model: GPTModel, layers: range, first: bool, last: bool) -> GPTModel:
        return model.pipeline_stage(layers, first, last)

    def tied_parameters(self, config: ModelConfig) -> list[str]:
        return [] if config.untie_embeddings_and_output_weights else ["embedding.weight"]

    def model_batch(self, batch: dict[str, torch.Tensor]) -> ModelBatch:
        return ModelBatch(
            batch["tokens"],
            {"position_ids": batch["position_ids"]},
            loss_targets(batch["labels"], batch["loss_mask"]),
        )

    def datasets(
        self, config: RunConfig, num_samples: tuple[int, int, int], facts: Any
    ) -> tuple[Any, Any, Any]:
        seq_length, seed = config.model.seq_length, config.train.seed
        if config.data.mock_data:
            from mtk.data.mock import MockGPTDataset

            vocab = config.model.vocab_size
            train, valid, test = (
                MockGPTDataset(count, seq_length, vocab, seed + i) if count else None
                for i, count in enumerate(num_samples)
            )
            return train, valid, test
        from mtk.data.blended import build_split_datasets
        from mtk.data.gpt_dataset import GPTDataset

        make = functools.partial(
            GPTDataset, seq_length=seq_length, seed=seed, eod=facts.eod if facts else None
        )
        return build_split_datasets(
            config.data.data_path, config.data.split, num_samples, make, config.data.data_cache_path
        )


SPEC = GPTFamily()
