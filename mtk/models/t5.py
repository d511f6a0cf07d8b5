"""T5 as Megatron-LM builds it: a bidirectional encoder, a causal decoder that cross-attends to the
encoder's output, one word and position embedding shared by both, and an LM head tied to it.

Config switches make it Google's T5 (Hugging Face's ``T5ForConditionalGeneration``, ``t5_hf.py``):
relative positions (``position_embedding_type = "relative"``: a bias per head and distance bucket,
one table per stack, no position embedding), RMSNorm, no biases (``add_bias_linear = false``, the LM
head's included), a ReLU (v1.0, ``relu``) or gated-GELU (v1.1 and Flan-T5, ``geglu``) MLP and an
untied output layer (``untie_embeddings_and_output_weights``).

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
from mtk.layers.init import Embedding, Linear, SeededModule
from mtk.layers.loss import loss_targets
from mtk.layers.transformer import TransformerBlock, embedding_parameters, layer_parameters, norm_parameters
from mtk.models.generation import EncoderDecoderDecoding
from mtk.models.masked import MaskedLMFamily
from mtk.models.spec import ModelBatch
from mtk.models.t5_hf import T5 as HFT5


class T5Model(SeededModule):
    """(encoder tokens (batch, seq), decoder tokens (batch, decoder seq)) -> logits (batch, decoder
    seq, padded vocab). ``encoder_mask`` (1 = a token, 0 = padding) keeps encoder padding out of the
    encoder's attention and the decoder's cross-attention; the decoder attends causally."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        std, hidden = config.init_method_std, config.hidden_size
        relative = config.position_embedding_type == "relative"
        self.embedding = Embedding(config.padded_vocab_size(), hidden, std)
        self.position_embedding = None if relative else Embedding(config.max_position_embeddings, hidden, std)
        self.encoder_relative_bias = RelativePositionBias(config, bidirectional=True) if relative else None
        self.decoder_relative_bias = RelativePositionBias(config, bidirectional=False) if relative else None
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.encoder = TransformerBlock(config, config.num_layers)
        self.decoder = TransformerBlock(config, config.decoder_num_layers, cross_attention=True)
        untied, bias = config.untie_embeddings_and_output_weights, config.add_bias_linear
        self.lm_head = None if untied else LMHead(config, transform=False, bias=bias)
        self.output = Linear(hidden, config.padded_vocab_size(), bias, std) if untied else None
        if config.init_method == "t5":
            self._t5_initialisation()
        self.init_unless_meta()

    def _t5_initialisation(self) -> None:
        """Google T5's initial values (Mesh TensorFlow's; Hugging Face's ``_init_weights``): every matrix
        normal(0, 1/sqrt(fan-in)), embeddings and an untied output layer normal(0, 1), relative
        tables normal(0, 1/sqrt(hidden)); a tied output layer sees the decoder's output scaled by
        1/sqrt(hidden) (its final norm starts there, as ``t5_hf`` imports the scale). T5 draws its
        queries with a further 1/sqrt(kv_channels) where mtk's attention divides the scores by it:
        the same scores."""
        hidden = self.config.hidden_size
        for module in self.modules():
            if isinstance(module, Linear):
                module.std = module.in_features**-0.5
        for table in (self.embedding, self.position_embedding, self.output):
            if table is not None:
                table.std = 1.0
        for bias in (self.encoder_relative_bias, self.decoder_relative_bias):
            if bias is not None:
                bias.table.std = hidden**-0.5
        if self.output is None:
            self.decoder.final_norm.initial_gamma = hidden**-0.5

    def embed(self, tokens: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        x = self.embedding(tokens)
        if self.position_embedding is not None:
            positions = (start + torch.arange(tokens.shape[1], device=tokens.device)).expand_as(tokens)
            x = x + self.position_embedding(positions)
        return self.embedding_dropout(x)

    def encode(self, tokens: torch.Tensor, encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = _key_mask(encoder_mask)
        if self.encoder_relative_bias is not None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            mask = _masked_bias(self.encoder_relative_bias(positions, positions), mask)
        return self.encoder(self.embed(tokens), causal=False, attention_mask=mask)

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
        self_mask = None  # causal
        if self.decoder_relative_bias is not None:
            new, device = decoder_tokens.shape[1], decoder_tokens.device
            # a static cache (tensor length) attends over all its positions, those not written masked
            keys = kv_caches[0].keys.shape[2] if isinstance(start, torch.Tensor) else start + new
            queries, keys = start + torch.arange(new, device=device), torch.arange(keys, device=device)
            causal = keys[None, :] <= queries[:, None]
            self_mask = _masked_bias(self.decoder_relative_bias(queries, keys), causal)
        x = self.decoder(
            self.embed(decoder_tokens, start),
            kv_caches=kv_caches,
            causal=True,
            context=encoded,
            context_mask=_key_mask(encoder_mask),
            attention_mask=self_mask,
        )
        return self.output(x) if self.output is not None else self.lm_head(x, self.embedding.weight)

    def new_decoder_caches(self, batch: int, max_length: int, static: bool = False) -> list[KVCache]:
        """Empty self-attention caches of the decoder layers, for decoding token by token; ``static``:
        a tensor length, for a compiled step (``KVCache``)."""
        weight = self.embedding.weight
        return [
            layer.attention.new_cache(batch, max_length, weight.device, weight.dtype, static)
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


def _masked_bias(bias: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
    """An additive attention mask: ``bias`` where ``attend`` (True = attend; broadcast), -inf elsewhere."""
    return bias if attend is None else torch.where(attend, bias, float("-inf"))


class RelativePositionBias(nn.Module):
    """T5's relative positions: a learned bias per head for each bucket of key - query distance, added
    to the attention scores of every layer of a stack (Megatron's ``RelativePositionEmbedding``,
    Hugging Face's ``relative_attention_bias``). Half the buckets are exact distances, the rest
    log-spaced up to ``relative_attention_max_distance``; ``bidirectional`` (the encoder) gives keys
    after the query buckets of their own, the decoder's causal buckets count only keys before it.

    Tensor parallelism splits ``table`` over heads (column-wise, as the q projection), so each rank's
    bias holds the heads its attention holds."""

    def __init__(self, config: ModelConfig, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.buckets, self.max_distance = (
            config.relative_attention_num_buckets,
            config.relative_attention_max_distance,
        )
        self.table = Embedding(self.buckets, config.num_attention_heads, config.init_method_std)

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        """The bucket of each key - query distance, as T5 computes it."""
        buckets, offset = self.buckets, 0
        if self.bidirectional:
            buckets //= 2
            offset = (relative > 0).long() * buckets
            distance = relative.abs()
        else:
            distance = (-relative).clamp(min=0)
        exact = buckets // 2
        log = torch.log(distance.float().clamp(min=1) / exact) / math.log(self.max_distance / exact)
        far = (exact + (log * (buckets - exact)).long()).clamp(max=buckets - 1)
        return offset + torch.where(distance < exact, distance, far)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Positions of the queries and of the keys (1-D) -> the bias, (1, heads, queries, keys)."""
        return self.table(self.bucket(keys[None, :] - queries[:, None])).permute(2, 0, 1)[None]


class T5Family(MaskedLMFamily):
    name = "t5"
    generation = EncoderDecoderDecoding()  # greedy answers (mtk eval-squad)
    hf_adapters = (HFT5(),)  # mtk/models/t5_hf.py: Google's T5 v1.0, v1.1, Flan-T5
    needs_sentinels = True
    tiny_preset = "t5-tiny"
    config_fields = ("decoder_num_layers", "decoder_seq_length", "relative_attention_num_buckets",
                     "relative_attention_max_distance", "relu", "geglu", "init_method")  # fmt: skip
    position_embedding_types = ("learned_absolute", "relative")
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
        vocab = config.padded_vocab_size(tensor_parallel)
        relative = config.position_embedding_type == "relative"
        parts = {
            "embeddings": embedding_parameters(config, tensor_parallel),
            "relative position biases": 2 * config.relative_attention_num_buckets * config.num_attention_heads
            if relative
            else 0,
            "encoder layers": config.num_layers * layer_parameters(config),
            "encoder final norm": norm,
            "decoder layers": self._decoder_layers(config) * decoder,
            "decoder final norm": norm,
            # tied: the head's bias alone (the weights are the embedding's)
            "LM head": (config.hidden_size if config.untie_embeddings_and_output_weights else 0) * vocab
            + (vocab if config.add_bias_linear else 0),
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
        if model.relu + model.geglu + model.swiglu > 1:
            found.append("relu, geglu and swiglu each choose the MLP: set one of them")
        buckets, distance = model.relative_attention_num_buckets, model.relative_attention_max_distance
        if model.position_embedding_type == "relative" and (buckets < 4 or distance <= buckets // 2):
            found.append(
                f"relative positions need relative_attention_num_buckets >= 4 (found {buckets}) and "
                f"relative_attention_max_distance above half of them (found {distance}): a quarter of the "
                "buckets are exact distances each way, the rest log-spaced up to the distance"
            )
        absolute = model.position_embedding_type == "learned_absolute"
        if absolute and max(model.seq_length, decoder_length) > model.max_position_embeddings:
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
        plan = {"embedding": "vocab_embedding"}
        if model.position_embedding is not None:
            plan["position_embedding"] = "vocab_embedding"
        else:  # each rank's bias holds its heads (the tables are split over heads, as q is)
            plan.update({f"{stack}_relative_bias.table": "colwise" for stack in ("encoder", "decoder")})
        plan.update(model.encoder.tp_plan("encoder"))
        plan.update(model.decoder.tp_plan("decoder"))
        plan["decoder"] = "gather_output"
        if model.output is not None:
            plan["output"] = "vocab_output"
        else:
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
