"""RETRO: the GPT decoder with chunked cross-attention to retrieved neighbours, as Megatron built it.

The sequence is cut into chunks of ``retro_chunk_length`` (m) tokens; every chunk has k neighbours
from the retrieval database, each a database chunk and the chunk after it (r = 2m tokens). Decoder
layers 6, 9, 12, ... (9, 12, ... beyond 15 layers) add chunked cross-attention (CCA) after
self-attention. The first of them owns the retrieval encoder: a 2-layer bidirectional transformer over
the neighbour tokens (embedded by the decoder's own embedding) whose first layer cross-attends to the
decoder chunk the neighbours were retrieved for; its output is the context of every CCA layer.
Causality: a token attends to the neighbours of the last complete chunk before or at it, so the first
m - 1 tokens see none.

Each chunk attends to its own k neighbours, as in Megatron: its encoder stacks the per-neighbour
outputs neighbour by neighbour, (r, k * chunks, d), so that its reshape to (r * k, chunks, d) gives
every chunk its own; here the encoded neighbours stay grouped by chunk, and the order of a chunk's
keys does not change attention. The encoder's cross-attention residual is the usual pre-norm one
(Megatron adds to the normed input). Missing neighbours (fewer than k survived filtering) are
end-of-document tokens. The deliberate differences from Megatron, with their reasons: docs/retro.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtk.config import ModelConfig, RunConfig
from mtk.layers.attention import Attention, KVCache
from mtk.layers.loss import LossTerm, loss_targets
from mtk.layers.mlp import MLP
from mtk.layers.norms import build_norm
from mtk.layers.rotary import RotaryEmbedding, build_rotary
from mtk.layers.transformer import (
    CrossAttentionLayer,
    TransformerLayer,
    layer_parameters,
    layer_plan,
    scaled_output_std,
)
from mtk.models.generation import RetrievalDecoding
from mtk.models.gpt import SPEC as GPT
from mtk.models.gpt import DecoderLM, decoder_breakdown
from mtk.models.spec import PALM_FLOPS, ModelBatch, TrainableFamily


def first_retro_layer(config: ModelConfig) -> int:
    """The 1-based decoder layer of the first chunked cross-attention (Megatron's rule)."""
    return 6 if config.num_layers <= 15 else 9


def retro_layer_numbers(config: ModelConfig) -> list[int]:
    """1-based decoder layers that carry chunked cross-attention (Megatron's rule)."""
    return list(range(first_retro_layer(config), config.num_layers + 1, 3))


@dataclass
class RetroCache:
    """What RETRO generation keeps between steps (``RetroModel.new_cache``), so that each step runs
    only its new tokens and encodes a chunk's neighbours once, when the chunk completes."""

    kv: list[KVCache]  # each decoder layer's self-attention keys and values
    states: torch.Tensor  # (batch, < m, d): the first CCA's input at the incomplete chunk's positions
    encoded: torch.Tensor | None = None  # (batch, chunks, k * r, d): the complete chunks' neighbours
    length: int = 0  # the positions run so far


class RetrievalEncoder(nn.Module):
    """Neighbour states (chunks * k, r, d) and their decoder chunks (chunks, m, d) -> encoded
    neighbours (chunks * k, r, d). Bidirectional; the first layer cross-attends to the decoder chunk;
    no final norm (Megatron's encoder has none)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_neighbors = config.retro_num_neighbors
        std = scaled_output_std(config, config.num_layers)
        self.layers = nn.ModuleDict(
            {
                str(i): CrossAttentionLayer(config, std) if i == 0 else TransformerLayer(config, std)
                for i in range(config.retro_encoder_num_layers)
            }
        )

    def forward(self, neighbours: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        context = chunks.repeat_interleave(self.num_neighbors, dim=0)  # each neighbour reads its chunk
        first, *rest = self.layers.values()
        x = first(neighbours, context, causal=False)
        for layer in rest:
            x = layer(x, causal=False)
        return x


class ChunkedCrossAttention(nn.Module):
    """Normed decoder states (batch, n, d) attend, chunk by chunk, to their encoded neighbours.

    ``context``: the embeddings of the neighbours of the complete chunks (batch * chunks * k, r, d)
    when this layer owns the encoder, else the encoded neighbours (batch, chunks, k * r, d) the owner
    returned. Returns the update to the residual stream and the encoded neighbours. With a ``cache``
    (generation), ``h`` continues the positions run before: the owner encodes only the chunks ``h``
    completes (the cache keeps the earlier ones, and the states of an incomplete chunk).
    """

    def __init__(self, config: ModelConfig, output_std: float, encoder: RetrievalEncoder | None) -> None:
        super().__init__()
        self.chunk_length = config.retro_chunk_length
        self.attention = Attention(config, output_std, cross=True)
        self.encoder = encoder

    def forward(
        self, h: torch.Tensor, context: torch.Tensor | None, cache: RetroCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``h``: positions ``cache.length`` on (0 without a cache) of the sequence."""
        start = 0 if cache is None else cache.length
        if self.encoder is not None:
            context = self._encode(h, context, cache)
        return self._attend(h, context, start), context

    def _encode(
        self, h: torch.Tensor, neighbours: torch.Tensor, cache: RetroCache | None
    ) -> torch.Tensor | None:
        """The encoded neighbours (batch, chunks, k * r, d) of the complete chunks: of those ``h``
        completes (``neighbours`` is their embedding) after the cached ones. None before the first."""
        batch, _, d = h.shape
        m = self.chunk_length
        states = h if cache is None else torch.cat([cache.states, h], dim=1)
        whole = states.shape[1] // m * m  # an incomplete last chunk waits for its last token
        encoded = None if cache is None else cache.encoded
        if whole:
            chunks = states[:, :whole].reshape(-1, m, d)
            new = self.encoder(neighbours, chunks).reshape(batch, whole // m, -1, d)
            encoded = new if encoded is None else torch.cat([encoded, new], dim=1)
        if cache is not None:
            cache.states, cache.encoded = states[:, whole:], encoded
        return encoded

    def _attend(self, h: torch.Tensor, context: torch.Tensor | None, start: int) -> torch.Tensor:
        """Causal alignment: the queries of chunk c are tokens c*m + m-1 ... c*m + 2m-2, so a chunk's
        neighbours are seen from its last token on, once all of the chunk is known; the tokens before
        the first chunk's last see none (a zero update). ``h`` holds positions ``start`` on."""
        batch, n, d = h.shape
        m, end = self.chunk_length, start + n
        first = max(start, m - 1)  # the first position of h that sees neighbours
        if first >= end:
            return torch.zeros_like(h)
        lead, chunk = (first + 1) % m, (first + 1) // m - 1  # first's place among its chunk's queries
        last = end // m  # one past the chunk of the last position
        queries = F.pad(h[:, first - start :], (0, 0, lead, last * m + m - 1 - end))
        keys = context[:, chunk:last].flatten(0, 1)
        out = self.attention(queries.reshape(-1, m, d), context=keys).reshape(batch, -1, d)
        return F.pad(out[:, lead : lead + end - first], (0, 0, first - start, 0))


class RetroDecoderLayer(nn.Module):
    """A decoder layer with chunked cross-attention (CCA) to the neighbours between self-attention and
    the MLP; it passes the encoded neighbours on to the next RETRO layer::

        x = x + dropout(attention(norm(x)))
        update, context = cca(norm(x), context)
        x = x + dropout(update)
        x = x + dropout(mlp(norm(x)))
    """

    def __init__(
        self,
        config: ModelConfig,
        output_std: float,
        rotary: RotaryEmbedding | None,
        encoder: RetrievalEncoder | None,
    ) -> None:
        super().__init__()
        self.attention_norm = build_norm(config)
        self.attention = Attention(config, output_std, rotary)
        self.mlp_norm = build_norm(config)
        self.mlp = MLP(config, output_std)
        # registered after the MLP: the parameter order of the models trained before
        self.cross_norm = build_norm(config)
        self.cross_attention = ChunkedCrossAttention(config, output_std, encoder)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache: RetroCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.attention(self.attention_norm(x), position_ids=position_ids, kv_cache=kv_cache)
        x = x + self.dropout(h)
        # the cache by keyword: tensor parallelism lays out the two positional inputs
        update, context = self.cross_attention(self.cross_norm(x), context, cache=cache)
        x = x + self.dropout(update)
        return x + self.dropout(self.mlp(self.mlp_norm(x))), context

    def tp_plan(self) -> dict[str, str]:
        """As a decoder layer's, and: the CCA gathers the sequence whole (chunks need all of it), its
        output projection all-reduces, and the update is cut back to this rank's slice. The encoder
        runs its layers on slices of the neighbour tokens and hands the CCA whole ones."""
        plan = layer_plan(self)
        plan["cross_norm"] = "sequence"
        plan["cross_attention"] = "chunked_cross_attention"
        cca = self.cross_attention.attention.tp_plan() | {"out_proj": "rowwise_whole"}
        plan.update({f"cross_attention.attention.{name}": style for name, style in cca.items()})
        encoder = self.cross_attention.encoder
        if encoder is not None:
            plan["cross_attention.encoder"] = "gather_output_local"
            for name, layer in encoder.layers.items():
                plan.update(
                    {f"cross_attention.encoder.layers.{name}.{k}": v for k, v in layer.tp_plan().items()}
                )
            plan["cross_attention.encoder.layers.0.cross_attention"] = (
                "gather_sequence"  # its context is whole
            )
        return plan


class RetroDecoder(nn.Module):
    """The decoder stack: GPT's layers, RETRO layers (``retro_layer_numbers``) that pass the encoded
    neighbours on, and a final norm. Pre-norm only, as Megatron's RETRO."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.post_norm:  # check_run refuses it first (RetroFamily.rules)
            raise ValueError("retro: the RETRO decoder is pre-norm; post_norm is not supported")
        self.rotary = build_rotary(config) if config.position_embedding_type == "rope" else None
        self.retro_layers = [number - 1 for number in retro_layer_numbers(config)]
        output_std = scaled_output_std(config, config.num_layers)

        def layer(index: int) -> nn.Module:
            if index not in self.retro_layers:
                return TransformerLayer(config, output_std, self.rotary)
            encoder = RetrievalEncoder(config) if index == self.retro_layers[0] else None
            return RetroDecoderLayer(config, output_std, self.rotary, encoder)

        self.layers = nn.ModuleDict({str(i): layer(i) for i in range(config.num_layers)})
        self.final_norm = build_norm(config)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        position_ids: torch.Tensor,
        cache: RetroCache | None = None,
    ) -> torch.Tensor:
        """``context``: the embedded neighbours, encoded by the first RETRO layer for the others."""
        for name, layer in self.layers.items():
            kv_cache = None if cache is None else cache.kv[int(name)]
            if int(name) in self.retro_layers:
                x, context = layer(x, context, position_ids=position_ids, kv_cache=kv_cache, cache=cache)
            else:
                x = layer(x, position_ids=position_ids, kv_cache=kv_cache)
        return self.final_norm(x)

    def tp_plan(self, prefix: str) -> dict[str, str]:
        """The plan of every layer and the final norm under ``prefix`` (this stack's path)."""
        plan = {
            f"{prefix}.layers.{name}.{path}": style
            for name, layer in self.layers.items()
            for path, style in layer.tp_plan().items()
        }
        plan[f"{prefix}.final_norm"] = "sequence"
        return plan


class RetroModel(DecoderLM):
    """tokens (batch, n) and neighbour tokens (batch, chunks, k, r) -> logits (batch, n, padded vocab)
    (given ``targets``, the loss term instead):
    GPT's embeddings and output around the RETRO decoder; the neighbours are embedded by the same
    embedding. With ``cache`` (``new_cache``) the tokens continue the ones run before, and only the
    neighbours of the chunks they complete are embedded and encoded."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, RetroDecoder(config))

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        neighbours: torch.Tensor | None = None,
        cache: RetroCache | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor | LossTerm:
        if neighbours is None:
            raise ValueError("a RETRO model needs the neighbour tokens of every chunk (batch, chunks, k, r)")
        batch, n = tokens.shape
        start = 0 if cache is None else cache.length
        if position_ids is None:
            position_ids = torch.arange(start, start + n, device=tokens.device).expand(batch, n)
        x = self.embed(tokens, position_ids)
        m, r = self.config.retro_chunk_length, neighbours.shape[-1]
        # the chunks these tokens complete (an incomplete last chunk's neighbours are never seen), as
        # rows (sample * chunks + chunk) * k + neighbour
        flat = neighbours[:, start // m : (start + n) // m].reshape(-1, r)
        context = self.embed(flat, torch.arange(r, device=flat.device).expand(flat.shape[0], r))
        x = self.decoder(x, context, position_ids, cache)
        if cache is not None:
            cache.length += n
        return self.head(x, targets)

    def new_cache(self, batch: int, max_length: int) -> RetroCache:
        """An empty generation cache of ``batch`` rows up to ``max_length`` positions (dynamic)."""
        weight = self.embedding.weight
        kv = [
            layer.attention.new_cache(batch, max_length, weight.device, weight.dtype)
            for layer in self.decoder.layers.values()
        ]
        return RetroCache(kv, weight.new_zeros(batch, 0, weight.shape[1]))


class RetroFamily(TrainableFamily):
    name = "retro"
    generation = RetrievalDecoding()
    model_takes_targets = True
    flops_convention = PALM_FLOPS.replace(
        " per token (PaLM)",
        " per token (PaLM), the encoder counted for the 2k neighbour tokens it encodes per decoder token",
    )
    tiny_preset = "retro-tiny"
    config_fields = ("retro_encoder_num_layers", "retro_num_neighbors", "retro_chunk_length")
    train_inputs = "--retro-project DIR"
    train_data = "retro"
    megatron_script = "pretrain_retro.py"
    megatron_inputs = "--retro-project-dir DIR (it holds the data, the tokenizer and the sample counts)"
    megatron_switches = ("--retro-add-retriever",)
    megatron_without_switches = GPT.name  # pretrain_retro.py without --retro-add-retriever trains a GPT
    # what pretrain_retro.py reads from --retro-project-dir, whatever the script says (as mtk train
    # --retro-project)
    megatron_project = (
        "--retro-project-dir",
        ("seq_length", "max_position_embeddings", "global_batch_size", "train_samples", "eval_interval",
         "eval_iters", "seed", "retro_chunk_length"),
    )  # fmt: skip
    pipeline_refusal = (
        "Megatron trains RETRO without pipeline stages (the first retrieval layer's encoder output feeds "
        "every later one); use --tp and data parallelism"
    )

    def rules(self, config: RunConfig) -> list[str]:
        model, found = config.model, []
        if model.post_norm:
            found.append(
                "retro: post_norm is not supported: the RETRO decoder is pre-norm, as Megatron's (post_norm "
                "is the original BERT's layout); remove it"
            )
        first = first_retro_layer(model)
        if model.num_layers < first:
            found.append(
                f"retro: num_layers {model.num_layers} has no chunked cross-attention layer (the first is "
                f"layer {first}); use at least {first} layers"
            )
        if model.seq_length % model.retro_chunk_length:
            found.append(
                f"retro: seq_length {model.seq_length} is not a multiple of retro_chunk_length "
                f"{model.retro_chunk_length}; make it one"
            )
        return found

    def layout_problems(self, config: RunConfig) -> list[str]:
        found = super().layout_problems(config)
        if config.parallel.context_parallel_size > 1:
            found.append(
                "family 'retro': chunked cross-attention needs whole chunks of the sequence on one rank; "
                "run it with --cp 1"
            )
        return found

    def encoder_parameters(self, config: ModelConfig) -> int:
        layer, cross_layer = layer_parameters(config), layer_parameters(config, cross_attention=True)
        return (config.retro_encoder_num_layers - 1) * layer + cross_layer

    def num_parameters(self, config: ModelConfig, tensor_parallel: int = 1) -> int:
        return sum(self.parameter_breakdown(config, tensor_parallel).values())

    def parameter_breakdown(self, config: ModelConfig, tensor_parallel: int = 1) -> dict[str, int]:
        layer, cross_layer = layer_parameters(config), layer_parameters(config, cross_attention=True)
        retro_layers = len(retro_layer_numbers(config))
        stacks = {"decoder layers": (config.num_layers - retro_layers) * layer + retro_layers * cross_layer}
        if retro_layers:  # inside the first layer with chunked cross-attention
            stacks["retrieval encoder"] = self.encoder_parameters(config)
        return decoder_breakdown(config, tensor_parallel, stacks)

    def flops_per_token(self, config: ModelConfig) -> float:
        encoder = 6.0 * self.encoder_parameters(config) * (2 * config.retro_num_neighbors - 1)
        return super().flops_per_token(config) + encoder

    def new_model(self, config: ModelConfig) -> RetroModel:
        return RetroModel(config)

    def blocks(self, model: RetroModel) -> list[nn.ModuleDict]:
        return [model.decoder.layers]

    def tp_plan(self, model: RetroModel) -> dict[str, str]:
        plan = {"embedding": "vocab_embedding"}
        if model.position_embedding is not None:
            plan["position_embedding"] = "vocab_embedding"
        plan.update(model.decoder.tp_plan("decoder"))
        plan["decoder"] = "gather_output"
        if model.output is not None:
            plan["output"] = "vocab_output"
        return plan

    def model_batch(self, batch: dict[str, torch.Tensor]) -> ModelBatch:
        return ModelBatch(
            batch["tokens"],
            {"position_ids": batch["position_ids"], "neighbours": batch["neighbours"]},
            loss_targets(batch["labels"], batch["loss_mask"]),
        )

    def datasets(self, config: RunConfig, num_samples: tuple[int, int, int], facts) -> tuple:
        model = config.model
        if config.data.mock_data:
            from mtk.data.mock import MockRetroDataset

            return tuple(
                MockRetroDataset(count, model, config.train.seed + i) if count else None
                for i, count in enumerate(num_samples)
            )
        from mtk.data.blended import parse_blend
        from mtk.data.indexed import IndexedDataset
        from mtk.data.retro import RetroDataset
        from mtk.data.retro_project import RetroProject, RetroProjectError
        from mtk.models.gpt import SPEC as GPT

        if config.data.retro_project is None:
            raise RetroProjectError("retro: give --retro-project DIR (built by `mtk retro`) or --mock-data")
        project = RetroProject(config.data.retro_project)
        query = project.stage("query-neighbours")
        if not query.get("complete"):
            raise RetroProjectError(f"{project.root}: query-neighbours did not finish; run it again")
        if query["num_neighbours"] < model.retro_num_neighbors:
            raise RetroProjectError(
                f"retro_num_neighbors {model.retro_num_neighbors} exceeds the {query['num_neighbours']} "
                f"neighbours saved in {project.root}; lower it or re-run query-neighbours"
            )
        chunks = np.asarray(project.chunks())
        indexed = [IndexedDataset(prefix) for _, prefix in parse_blend(config.data.data_path)]
        wrapped = []
        for split, samples in zip(
            ("train", "valid", "test"), GPT.datasets(config, num_samples, facts), strict=True
        ):
            if samples is None:
                wrapped.append(None)
                continue
            neighbours = np.load(project.neighbours_path(split), mmap_mode="r")
            needed = num_samples[("train", "valid", "test").index(split)]
            if len(neighbours) < needed:
                raise RetroProjectError(
                    f"{project.neighbours_path(split)} holds neighbours of {len(neighbours)} {split} samples, "
                    f"this run reads {needed}: re-run `mtk retro query-neighbours`"
                )
            wrapped.append(
                RetroDataset(
                    samples,
                    neighbours,
                    chunks,
                    indexed,
                    model.retro_num_neighbors,
                    model.retro_chunk_length,
                    facts.eod,
                )  # fmt: skip
            )
        return tuple(wrapped)


SPEC = RetroFamily()
