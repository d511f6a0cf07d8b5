"""BERT: a bidirectional encoder with a masked-LM head and the sentence-order (binary) head.

``BertModel`` is the plain single-device module, pre-norm as Megatron builds it or post-norm
(``post_norm``) as the original BERT and its Hugging Face checkpoints; ``SPEC`` is its family spec.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn

from mtk.config import ModelConfig, RunConfig
from mtk.layers.heads import LMHead, Pooler
from mtk.layers.init import Embedding, Linear, SeededModule
from mtk.layers.loss import loss_targets, token_cross_entropy
from mtk.layers.norms import build_norm
from mtk.layers.transformer import TransformerBlock, embedding_parameters, layer_parameters, norm_parameters
from mtk.models.bert_hf import Bert, MegatronBert
from mtk.models.masked import MaskedLMFamily
from mtk.models.spec import LossTerms, ModelBatch, PipelinedFamily

TOKEN_TYPES = 2  # segment A and B


class BertModel(SeededModule):
    """tokens (batch, seq) -> MLM logits (batch, seq, padded vocab), and the sentence-order logits
    (batch, 2) with the binary head.

    ``padding_mask`` (batch, seq; 1 = a token, 0 = padding) keeps padding out of attention;
    ``token_types`` (0 / 1) say which segment a token belongs to. A pipeline stage embeds only when
    ``pre_process`` and ends with the heads only when ``post_process`` (keeping the tied embedding).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.pre_process = self.post_process = True
        std, hidden = config.init_method_std, config.hidden_size
        self.embedding = Embedding(config.padded_vocab_size(), hidden, std)
        self.position_embedding = Embedding(config.max_position_embeddings, hidden, std)
        self.token_type_embedding = Embedding(TOKEN_TYPES, hidden, std) if config.bert_binary_head else None
        self.embedding_norm = build_norm(config) if config.post_norm else None
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.encoder = TransformerBlock(config, config.num_layers)
        self.lm_head = LMHead(config, transform=True)
        self.pooler = Pooler(config) if config.bert_binary_head else None
        self.binary_head = Linear(hidden, 2, True, std) if config.bert_binary_head else None
        self.init_unless_meta()

    def embed(self, tokens: torch.Tensor, token_types: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.embedding(tokens) + self.position_embedding(positions)
        if self.token_type_embedding is not None:
            types = torch.zeros_like(tokens) if token_types is None else token_types
            x = x + self.token_type_embedding(types)
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        return self.embedding_dropout(x)

    def forward(
        self,
        tokens: torch.Tensor,
        token_types: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(tokens, token_types) if self.pre_process else tokens
        mask = None if padding_mask is None else padding_mask[:, None, None, :].bool()
        x = self.encoder(x, causal=False, attention_mask=mask)
        if not self.post_process:
            return x
        logits = self.lm_head(x, self.embedding.weight)
        if self.binary_head is None:
            return logits
        return logits, self.binary_head(self.pooler(x))

    def hidden_states(self, tokens: torch.Tensor, token_types=None, padding_mask=None) -> torch.Tensor:
        """The encoder's output (batch, seq, hidden), before the heads."""
        mask = None if padding_mask is None else padding_mask[:, None, None, :].bool()
        return self.encoder(self.embed(tokens, token_types), causal=False, attention_mask=mask)

    def pipeline_stage(self, layers: range, first: bool, last: bool) -> BertModel:
        stage = copy.deepcopy(self)
        stage.pre_process, stage.post_process = first, last
        for name in list(stage.encoder.layers.keys()):
            if int(name) not in layers:
                del stage.encoder.layers[name]
        if not first:
            stage.position_embedding = stage.token_type_embedding = stage.embedding_norm = None
            if not last:
                stage.embedding = None
        if not last:
            stage.encoder.final_norm = stage.lm_head = stage.pooler = stage.binary_head = None
        return stage


class BertFamily(MaskedLMFamily, PipelinedFamily):
    name = "bert"
    hf_adapters = (Bert(), MegatronBert())  # mtk/models/bert_hf.py; no generation: an encoder
    tiny_preset = "bert-tiny"
    config_fields = ("bert_binary_head",)
    megatron_script = "pretrain_bert.py"
    megatron_inputs = (
        "--data-path PREFIX and --vocab-file with --tokenizer-type BertWordPieceLowerCase "
        "(or BertWordPieceCase)"
    )

    def num_parameters(self, config: ModelConfig, tensor_parallel: int = 1) -> int:
        return sum(self.parameter_breakdown(config, tensor_parallel).values())

    def parameter_breakdown(self, config: ModelConfig, tensor_parallel: int = 1) -> dict[str, int]:
        hidden, norm = config.hidden_size, norm_parameters(config)
        embeddings = embedding_parameters(config, tensor_parallel)
        embeddings += TOKEN_TYPES * hidden if config.bert_binary_head else 0
        parts = {"embeddings": embeddings}
        if config.post_norm:  # the norm on the embeddings instead of a final one
            parts["embedding norm"] = norm
        parts["encoder layers"] = config.num_layers * layer_parameters(config)
        if not config.post_norm:
            parts["final norm"] = norm
        # the transform (dense, norm) and the vocabulary bias; the projection is the tied embedding
        parts["LM head"] = (hidden * hidden + hidden) + norm + config.padded_vocab_size(tensor_parallel)
        if config.bert_binary_head:
            parts["pooler and sentence-order head"] = (hidden * hidden + hidden) + (2 * hidden + 2)
        return parts

    def new_model(self, config: ModelConfig) -> BertModel:
        return BertModel(config)

    def blocks(self, model: BertModel) -> list[nn.ModuleDict]:
        return [model.encoder.layers]

    def tp_plan(self, model: BertModel) -> dict[str, str]:
        plan = {}
        for name in ("embedding", "position_embedding", "token_type_embedding"):
            if getattr(model, name) is not None:
                plan[name] = "vocab_embedding"
        if model.embedding_norm is not None:
            plan["embedding_norm"] = "sequence"
        plan.update(model.encoder.tp_plan("encoder"))
        if model.post_process:
            plan["encoder"] = "gather_output"
            plan["lm_head"] = "vocab_bias"
            if model.pooler is not None:
                plan["pooler"] = "replicate"
                plan["binary_head"] = "replicate_local_output"
        return plan

    def pipeline_stage(self, model: BertModel, layers: range, first: bool, last: bool) -> BertModel:
        return model.pipeline_stage(layers, first, last)

    def tied_parameters(self, config: ModelConfig) -> list[str]:
        return ["embedding.weight"]

    def model_batch(self, batch: dict[str, torch.Tensor]) -> ModelBatch:
        """Targets: the masked tokens' ids (IGNORE_INDEX elsewhere), then one column with the
        sentence-order label (1: segments swapped)."""
        order = batch["is_random"].long()[:, None]
        return ModelBatch(
            batch["text"],
            {"token_types": batch["types"], "padding_mask": batch["padding_mask"]},
            torch.cat([loss_targets(batch["labels"], batch["loss_mask"]), order], dim=1),
        )

    def loss_terms(self, outputs: Any, targets: torch.Tensor) -> LossTerms:
        """Megatron's BERT loss: the mean cross-entropy over masked tokens, plus the mean
        sentence-order cross-entropy over the samples."""
        logits, order = outputs if isinstance(outputs, tuple) else (outputs, None)
        terms = {"lm loss": token_cross_entropy(logits, targets[:, :-1])}
        if order is not None:
            terms["sop loss"] = token_cross_entropy(order, targets[:, -1])
        return terms

    def loss_names(self, config: ModelConfig) -> tuple[str, ...]:
        return ("lm loss", "sop loss") if config.bert_binary_head else ("lm loss",)

    def datasets(
        self, config: RunConfig, num_samples: tuple[int, int, int], facts: Any
    ) -> tuple[Any, Any, Any]:
        from mtk.data.bert_dataset import BertDataset

        data, model = config.data, config.model
        make = functools.partial(
            BertDataset,
            seq_length=model.seq_length,
            seed=config.train.seed,
            binary_head=model.bert_binary_head,
            short_probability=data.short_seq_prob,
            masking=self.masking(config),
        )
        return self.split_datasets(config, num_samples, facts, make)


SPEC = BertFamily()
