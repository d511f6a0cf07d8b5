"""The family seam: what the rest of mtk knows about a model family, and nothing more.

Each family file ``mtk/models/<family>.py`` holds its ``nn.Module`` and a spec object ``SPEC``;
the registry of ``mtk.models`` (``register_family``, ``family_spec(name)``, ``family_names()``) maps
``ModelConfig.family`` to it. Training, benchmarking, planning, generation and the presets go through
the spec only:

- ``TrainableFamily``: what a family says from its config alone (parameter count, its own rules, how
  the presets show it, its Megatron-LM script) and everything ``mtk train`` needs: build the model,
  its transformer blocks (the units of recomputation and FSDP), its tensor-parallel plan as plain
  data, batch -> model inputs and targets, its loss terms, its datasets, FLOPs per token.
- ``PipelinedFamily``: a family that can also be cut into pipeline stages.
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from mtk.config import ConfigError, ModelConfig, RunConfig

if TYPE_CHECKING:
    from mtk.data.prepared import DataFacts
    from mtk.models.generation import GenerationStrategy
    from mtk.models.hf_adapter import HFAdapter

LossTerms = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (summed loss, count it averages over)


@dataclass
class ModelBatch:
    """One micro-batch as a model takes it.

    ``inputs`` enter the model (the first pipeline stage) as its positional argument; ``extra`` reach
    every stage as keyword arguments; ``targets`` go to the loss (one tensor, so that pipeline
    schedules can split it by sample). Every tensor has the batch first and, when context
    parallelism applies, the sequence second.
    """

    inputs: torch.Tensor
    extra: dict[str, torch.Tensor]
    targets: torch.Tensor

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> ModelBatch:
        """The batch with ``function`` applied to every tensor (device moves, sequence sharding)."""
        return ModelBatch(
            function(self.inputs), {k: function(v) for k, v in self.extra.items()}, function(self.targets)
        )


GIB = 2**30


def available_memory(device: torch.device) -> int | None:
    """Bytes ``device`` can still allocate: free CUDA memory, else the host's available memory (the
    kernel's MemAvailable, which counts reclaimable caches); None where it cannot be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def check_model_fits(family: TrainableFamily, config: ModelConfig, device: torch.device) -> None:
    """ConfigError naming the model's size and the memory available when its parameters alone do not
    fit in what ``device`` can still allocate; nothing is checked on the meta device."""
    if device.type == "meta":
        return
    available = available_memory(device)
    parameters = family.num_parameters(config)
    size = parameters * torch.get_default_dtype().itemsize
    if available is not None and size > available:
        raise ConfigError(
            f"the model is too large to build on {device}: {parameters:,} parameters take "
            f"{size / GIB:,.1f} GiB ({torch.get_default_dtype()}), and {available / GIB:,.1f} GiB are "
            "available; choose a smaller model (num_layers, hidden_size, ffn_hidden_size, vocab_size) "
            "or a machine with more memory"
        )


def config_defaults() -> dict[str, Any]:
    """Every ModelConfig field's default (None for the ones derived from others)."""
    return {
        item.name: item.default if item.default is not dataclasses.MISSING else item.default_factory()
        for item in dataclasses.fields(ModelConfig)
    }


PALM_FLOPS = "6 * parameters + 12 * layers * hidden * seq per token (PaLM), no recompute"


class TrainableFamily(ABC):
    """A model family: what its config says (parameters, rules, display, Megatron-LM's script), and how
    ``mtk train`` builds, parallelises and trains it (without pipeline stages unless it is a
    ``PipelinedFamily``). Registered by name in ``mtk.models`` (``register_family``).

    ``build`` first checks that the model fits the device it is built on (``check_model_fits``): a
    model too large for this machine is refused, naming its size, before anything is allocated,
    whoever builds it (train, bench, generate, import-hf, eval-squad)."""

    name: ClassVar[str]  # ModelConfig.family
    flops_convention: ClassVar[str] = PALM_FLOPS  # how ``flops_per_token`` counts, for reports
    pipeline_refusal: ClassVar[str] = "it cannot be cut into pipeline stages"  # why, for --pp > 1
    tiny_preset: ClassVar[str | None] = None  # the preset (name or path) the layout tests train it with
    train_inputs: ClassVar[str] = "--data PREFIX"  # what `mtk train` needs besides the preset
    # what it trains on, as the workspace records outputs: prepare-data's "document" or "sentence"
    # level, or a "retro" project
    train_data: ClassVar[str] = "document"
    # the Hugging Face model types it imports and exports as (mtk.hf looks here; the first match exports)
    hf_adapters: ClassVar[tuple[HFAdapter, ...]] = ()
    # how its model produces text token by token (mtk.generate); None: it does not generate
    generation: ClassVar[GenerationStrategy | None] = None
    # its model takes ``targets=`` and returns its one "lm loss" term itself (``forward_loss``)
    model_takes_targets: ClassVar[bool] = False
    # Megatron-LM (mtk/megatron.py): the pretrain_*.py script that trains the family (None: none does),
    # the inputs that script needs (the machine's files, never part of a preset), the switches it needs
    # to train this family and the family it trains without them, the flags it names differently
    # (Megatron's usual flag -> this script's), and the run inputs' flag with the keys the script reads
    # from it rather than from its own arguments
    megatron_script: ClassVar[str | None] = None
    megatron_inputs: ClassVar[str] = ""
    megatron_switches: ClassVar[tuple[str, ...]] = ()
    megatron_without_switches: ClassVar[str | None] = None
    megatron_flag_names: ClassVar[dict[str, str]] = {}
    megatron_project: ClassVar[tuple[str, tuple[str, ...]] | None] = None
    # the ModelConfig fields only this family reads (T5's decoder_num_layers): a run of another family
    # that sets one away from its default is refused (``problems``), and `mtk presets show` of another
    # family's preset lists it only when set; fields several families read (post_norm) are no one's
    config_fields: ClassVar[tuple[str, ...]] = ()
    # the position_embedding_type values its model honours (T5's relative positions are its own)
    position_embedding_types: ClassVar[tuple[str, ...]] = ("learned_absolute", "rope")

    @abstractmethod
    def num_parameters(self, config: ModelConfig, tensor_parallel: int = 1) -> int:
        """Parameters of the whole model from its config alone (no allocation), vocabulary padded for TP."""

    def parameter_breakdown(self, config: ModelConfig, tensor_parallel: int = 1) -> dict[str, int]:
        """``num_parameters`` by part of the model (embeddings, each stack's layers, final norms, output
        layer ...), in model order, for `mtk presets show`; the values sum to ``num_parameters``. By
        default one part, the whole model."""
        return {"model": self.num_parameters(config, tensor_parallel)}

    def complete(self, config: ModelConfig) -> None:
        """Fill in ``config`` the values this family derives from others (T5: the decoder depth);
        ``check_run`` and ``build`` call it. By default nothing."""
        return

    def problems(self, config: RunConfig) -> list[str]:
        """What in ``config`` this family cannot run (``mtk.config.check_run`` reports it): the settings
        of other families set away from their defaults (``foreign_settings``), then its own ``rules``.
        A family adds rules by overriding ``rules``, not this."""
        found = self.foreign_settings(config.model)
        if config.model.position_embedding_type not in self.position_embedding_types:
            found.append(
                f"position_embedding_type {config.model.position_embedding_type!r}: family '{self.name}' "
                f"takes {' or '.join(repr(kind) for kind in self.position_embedding_types)}"
            )
        return found + self.rules(config)

    def rules(self, config: RunConfig) -> list[str]:
        """This family's own rules: what in ``config`` it cannot run. By default none."""
        return []

    def foreign_fields(self) -> dict[str, str]:
        """The ModelConfig fields other registered families declare as theirs (``config_fields``) and
        this one does not: field -> the family it belongs to."""
        from mtk.models import family_names, family_spec

        owned = set(self.config_fields)
        return {
            key: name
            for name in family_names()
            if name != self.name
            for key in family_spec(name).config_fields
            if key not in owned
        }

    def foreign_settings(self, config: ModelConfig) -> list[str]:
        """A problem for each setting of another family that ``config`` moves away from its default."""
        defaults = config_defaults()
        return [
            f"{key} = {getattr(config, key)!r} is a setting of family '{owner}'; this run is family "
            f"'{self.name}': remove it"
            for key, owner in self.foreign_fields().items()
            if getattr(config, key) != defaults[key]
        ]

    def layout_problems(self, config: RunConfig) -> list[str]:
        """The parallel layouts of ``config`` this family cannot run (``mtk plan`` skips them)."""
        if config.parallel.pipeline_model_parallel_size > 1 and not isinstance(self, PipelinedFamily):
            return [f"family '{self.name}': {self.pipeline_refusal}"]
        return []

    def stacks(self, config: ModelConfig) -> list[tuple[int, int, int]]:
        """Its transformer stacks as (layers, parameters per layer, tokens per sample): what the
        memory plan counts. One decoder or encoder stack unless the family says otherwise."""
        from mtk.layers.transformer import layer_parameters

        return [(config.num_layers, layer_parameters(config), config.seq_length)]

    def layers_label(self, config: ModelConfig) -> str:
        """The layers column of `mtk presets list`: the depth of each stack."""
        return "+".join(str(layers) for layers, _, _ in self.stacks(config))

    def build(self, config: ModelConfig) -> nn.Module:
        """The whole model on the current default device (``torch.device("meta")`` allocates nothing);
        ConfigError when it does not fit there."""
        self.complete(config)
        check_model_fits(self, config, torch.get_default_device())
        return self.new_model(config)

    @abstractmethod
    def new_model(self, config: ModelConfig) -> nn.Module:
        """The family's model for ``config``, unchecked (``build`` checks that it fits first)."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> list[nn.ModuleDict]:
        """The containers of transformer layers: each layer is a unit of recomputation and of FSDP."""

    @abstractmethod
    def tp_plan(self, model: nn.Module) -> dict[str, str]:
        """Module path -> tensor-parallel style name (``mtk.parallel.tensor.STYLES``) for ``model`` or a
        pipeline stage of it."""

    def tied_parameters(self, config: ModelConfig) -> list[str]:
        """Parameters held by both the first and the last pipeline stage (tied embeddings): their
        gradients are summed across the two, and a gradient norm counts them once."""
        return []

    @abstractmethod
    def model_batch(self, batch: dict[str, torch.Tensor]) -> ModelBatch:
        """A collated micro-batch of this family's dataset as the model and loss take it."""

    def forward_loss(self, model: nn.Module, batch: ModelBatch) -> LossTerms:
        """The loss terms of ``batch`` through ``model`` (whole, not a pipeline stage): its outputs
        then ``loss_terms``, or, where the model takes the targets, the term it returns (a decoder
        fuses its output layer with the loss: the logits never exist whole)."""
        if self.model_takes_targets:
            return {"lm loss": model(batch.inputs, **batch.extra, targets=batch.targets)}
        return self.loss_terms(model(batch.inputs, **batch.extra), batch.targets)

    def loss_terms(self, outputs: Any, targets: torch.Tensor) -> LossTerms:
        """The loss of one micro-batch as named ``(sum, count)`` terms; its value is sum(sum / count).
        By default the language-model loss of ``outputs`` (logits) against ``targets``."""
        from mtk.layers.loss import token_cross_entropy

        return {"lm loss": token_cross_entropy(outputs, targets)}

    def loss_names(self, config: ModelConfig) -> tuple[str, ...]:
        """The names ``loss_terms`` returns for ``config`` (metrics report each when there are several)."""
        return ("lm loss",)

    @abstractmethod
    def datasets(
        self, config: RunConfig, num_samples: tuple[int, int, int], facts: DataFacts | None
    ) -> tuple[Any, Any, Any]:
        """Train, valid and test datasets of ``num_samples`` samples each (None where a split has none);
        mock data when ``config.data.mock_data``, else ``config.data.data_path`` (described by ``facts``)."""

    def flops_per_token(self, config: ModelConfig) -> float:
        """Training FLOPs per token, the model-FLOPs convention of MFU (no recomputation). By default
        6 x parameters (forward + backward matmuls) + 12 x layers x hidden x seq (attention), as PaLM
        counts them (Chowdhery et al., 2022, appendix B); a family adds its own terms to it."""
        attention = 12.0 * config.num_layers * config.hidden_size * config.seq_length
        return 6.0 * self.num_parameters(config) + attention


class PipelinedFamily(TrainableFamily):
    """A family that pipeline parallelism can cut into stages by layer ranges."""

    def pipeline_layers(self, config: ModelConfig) -> int:
        """How many layers the pipeline split distributes over stages (by default ``num_layers``)."""
        return config.num_layers

    @abstractmethod
    def pipeline_stage(self, model: nn.Module, layers: range, first: bool, last: bool) -> nn.Module:
        """A copy of ``model`` with only what one stage runs: ``layers``, the input embedding when
        ``first``, the output and loss inputs when ``last``. Parameter names stay the whole model's."""
