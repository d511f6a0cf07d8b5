"""T5 as Megatron-LM builds it: a bidirectional encoder, a causal decoder that cross-attends to the
encoder's output, one word and position embedding shared by both, and an LM head tied to it.

``T5Model`` is the plain single-device module; ``SPEC`` is its family spec.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from mtk.config import ModelConfig, RunConfig
from mtk.layers.attention import KVCache
from mtk.layers.heads import LMHead
from mtk.layers.init import Embedding, SeededModule
from mtk.layers.loss import loss_targets
from mtk.layers.transformer import TransformerBlock, embedding_parameters, layer_parameters, norm_parameters
from mtk.models.generation import EncoderDecoderDecoding
from mtk.models.masked import MaskedLMFamily
from mtk.models.spec import ModelBatch


class T5Model(SeededModule):
    """(encoder tokens (batch, seq), decoder tokens (batch, decoder seq)) -> logits (batch, decoder
    seq, padded vocab). ``encoder_mask`` (1 = a token, 0 = padding) keeps encoder padding out of the
    encoder's attention and the decoder's cross-attention; the decoder attends causally."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        std, hidden = config.init_method_std, config.hidden_size
        self.embedding = Embedding(config.padded_vocab_size(), hidden, std)
        self.position_embedding = Embedding(config.max_position_embeddings, hidden, std)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.encoder = TransformerBlock(config, config.num_layers)
        self.decoder = TransformerBlock(config, config.decoder_num_layers, cross_attention=True)
        self.lm_head = LMHead(config, transform=False)
        self.init_unless_meta()

    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.embedding_dropout(self.embedding(tokens) + self.position_embedding(positions))

    def encode(self, tokens: torch.Tensor, encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(self.embed(tokens), causal=False, attention_mask=_key_mask(encoder_mask))

    def decode(
        self,
        encoded: torch.Tensor,
        decoder_tokens: torch.Tensor,
        encoder_mask: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """Logits of ``decoder_tokens``; with ``kv_caches`` (``new_decoder_caches``) the tokens continue
        the ones decoded before."""
        start = 0 if kv_caches is None else kv_caches[0].length
        x = self.decoder(
            self.embed(decoder_tokens, start),
            kv_caches=kv_caches,
            causal=True,
            context=encoded,
            context_mask=_key_mask(encoder_mask),
        )
        return self.lm_head(x, self.embedding.weight)

    def new_decoder_caches(self, batch: int, max_length: int) -> list[KVCache]:
        """Empty self-attention caches of the decoder layers, for decoding token by token."""
        weight = self.embedding.weight
        return [
            layer.attention.new_cache(batch, max_length, weight.device, weight.dtype)
            for layer in self.decoder.layers.values()
        ]

    def forward(
        self,
        tokens: torch.Tensor,
        decoder_tokens: torch.Tensor,
        encoder_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.decode(self.encode(tokens, encoder_mask), decoder_tokens, encoder_mask)


def _key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(batch, keys) 1/0 -> (batch, 1, 1, keys) True = attend."""
    return None if mask is None else mask[:, None, None, :].bool()


class T5Family(MaskedLMFamily):
    name = "t5"
    generation = EncoderDecoderDecoding()  # greedy answers (mtk eval-squad)
    needs_sentinels = True
    tiny_preset = "t5-tiny"
    config_fields = ("decoder_num_layers", "decoder_seq_length")
    megatron_script = "pretrain_t5.py"
    megatron_inputs = (
        "--data-path PREFIX and --vocab-file with --tokenizer-type BertWordPieceCase --vocab-extra-ids 100"
    )
    # pretrain_t5.py names the encoder's depth and length
    megatron_flag_names = {"--num-layers": "--encoder-num-layers", "--seq-length": "--encoder-seq-length"}
    pipeline_refusal = (
        "pipeline parallelism would cut the encoder and the decoder, whose every layer needs the "
        "encoder's output; t5-220m fits one device: use --tp and data parallelism (--pp 1)"
    )
    flops_convention = (
        "6 * parameters per token of each stack (encoder: seq_length, decoder and LM head: "
        "decoder_seq_length) + attention, per encoder token, no recompute"
    )

    def complete(self, config: ModelConfig) -> None:
        """The decoder is as deep as the encoder unless ``decoder_num_layers`` says otherwise."""
        if config.decoder_num_layers is None:
            config.decoder_num_layers = config.num_layers

    @staticmethod
    def _decoder_layers(config: ModelConfig) -> int:
        return config.num_layers if config.decoder_num_layers is None else config.decoder_num_layers

    def num_parameters(self, config: ModelConfig, tensor_parallel: int = 1) -> int:
        return sum(self.parameter_breakdown(config, tensor_parallel).values())

    def parameter_breakdown(self, config: ModelConfig, tensor_parallel: int = 1) -> dict[str, int]:
        norm = 0 if config.post_norm else norm_parameters(config)  # a post-norm stack has no final norm
        decoder = layer_parameters(config, cross_attention=True)
        parts = {
            "embeddings": embedding_parameters(config, tensor_parallel),
            "encoder layers": config.num_layers * layer_parameters(config),
            "encoder final norm": norm,
            "decoder layers": self._decoder_layers(config) * decoder,
            "decoder final norm": norm,
            "LM head": config.padded_vocab_size(tensor_parallel),  # its bias; the weights are tied
        }
        return {part: count for part, count in parts.items() if count}

    def stacks(self, config: ModelConfig) -> list[tuple[int, int, int]]:
        decoder = (
            self._decoder_layers(config),
            layer_parameters(config, cross_attention=True),
            self._decoder_length(config),
        )
        return [(config.num_layers, layer_parameters(config), config.seq_length), decoder]

    @staticmethod
    def _decoder_length(config: ModelConfig) -> int:
        return config.decoder_seq_length or config.seq_length

    def rules(self, config: RunConfig) -> list[str]:
        found = []
        model = config.model
        decoder_length = self._decoder_length(model)
        # A sample's spans stop where its decoder is full (mtk.data.masking.SpanRoom); this length
        # holds <bos>, one sentinel and the longest span the masking budget allows, so a sample's
        # first span always fits.
        one_span = 2 + math.floor(config.data.mask_prob * (model.seq_length - 2))
        if decoder_length < one_span:
            found.append(
                f"decoder_seq_length {decoder_length} cannot hold one span of a {model.seq_length}-token "
                f"sample masked at {config.data.mask_prob}: <bos>, a sentinel and up to "
                f"{one_span - 2} masked tokens; set decoder_seq_length >= {one_span}"
            )
        if max(model.seq_length, decoder_length) > model.max_position_embeddings:
            found.append(
                f"max_position_embeddings {model.max_position_embeddings} is below the encoder or decoder "
                "length; the two stacks share the position table"
            )
        return found

    def flops_per_token(self, config: ModelConfig) -> float:
        hidden, enc, dec = (
            config.hidden_size,
            config.seq_length,
            config.decoder_seq_length or config.seq_length,
        )
        decoder_layers = self._decoder_layers(config)
        encoder = config.num_layers * layer_parameters(config)
        decoder = decoder_layers * layer_parameters(config, cross_attention=True)
        head = config.padded_vocab_size() * hidden
        attention = 12.0 * hidden * (config.num_layers * enc + decoder_layers * (dec + enc) * dec / enc)
        return 6.0 * (encoder + (decoder + head) * dec / enc) + attention

    def new_model(self, config: ModelConfig) -> T5Model:
        return T5Model(config)

    def blocks(self, model: T5Model) -> list[nn.ModuleDict]:
        return [model.encoder.layers, model.decoder.layers]

    def tp_plan(self, model: T5Model) -> dict[str, str]:
        plan = {"embedding": "vocab_embedding", "position_embedding": "vocab_embedding"}
        plan.update(model.encoder.tp_plan("encoder"))
        plan.update(model.decoder.tp_plan("decoder"))
        plan["decoder"] = "gather_output"
        plan["lm_head"] = "vocab_bias"
        return plan

    def tied_parameters(self, config: ModelConfig) -> list[str]:
        return []  # one stage holds the embedding and the head

    def model_batch(self, batch: dict[str, torch.Tensor]) -> ModelBatch:
        return ModelBatch(
            batch["text_enc"],
            {"decoder_tokens": batch["text_dec"], "encoder_mask": batch["enc_mask"]},
            loss_targets(batch["labels"], batch["loss_mask"]),
        )

    def datasets(
        self, config: RunConfig, num_samples: tuple[int, int, int], facts: Any
    ) -> tuple[Any, Any, Any]:
        from mtk.data.t5_dataset import T5Dataset

        model = config.model
        make = functools.partial(
            T5Dataset,
            encoder_length=model.seq_length,
            decoder_length=self._decoder_length(model),
            seed=config.train.seed,
            short_probability=config.data.short_seq_prob,
            masking=self.masking(config),
        )
        return self.split_datasets(config, num_samples, facts, make)


SPEC = T5Family()
