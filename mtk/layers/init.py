"""Initial values, declared by the module that owns each parameter (Megatron's init).

Every parametrised module of mtk says how its own parameters start (``parameter_inits``): normal(0,
std) weights with the std chosen where the module is created (depth-scaled for output projections),
zero biases, unit norm weights. ``initial_values`` collects the declarations of a plain model by
parameter name *before* anything wraps or swaps its modules, so wrapped, sharded or swapped layers
(recomputation, FSDP, tensor parallelism, FP8 linears) start from the values their plain self would.

Each value is drawn as the whole tensor from a generator seeded by (seed, parameter name): a model
gets the same weights whatever device it is built on and however it is later cut or sharded.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Init:
    """normal(0, ``std``) when ``std`` is set, else the constant ``fill``."""

    std: float | None = None
    fill: float = 0.0

    def full(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        if self.std is None:
            return torch.full(shape, self.fill)
        return torch.empty(shape).normal_(0.0, self.std, generator=generator)


ZEROS, ONES = Init(fill=0.0), Init(fill=1.0)


class Linear(nn.Linear):
    """``nn.Linear`` with normal(0, ``std``) weights and a zero bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool, std: float) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.std = std

    def parameter_inits(self) -> dict[str, Init]:
        return {"weight": Init(self.std), "bias": ZEROS}


class Embedding(nn.Embedding):
    """``nn.Embedding`` with normal(0, ``std``) rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.std = std

    def parameter_inits(self) -> dict[str, Init]:
        return {"weight": Init(self.std)}


def initial_values(model: nn.Module) -> dict[str, Init]:
    """Every parameter's declared initial value, by its name in ``model``."""
    table = {}
    for prefix, module in model.named_modules():
        declared = module.parameter_inits() if hasattr(module, "parameter_inits") else {}
        for name, _ in module.named_parameters(recurse=False):
            if name not in declared:
                raise TypeError(
                    f"{type(module).__name__} declares no initial value for its parameter '{name}'"
                )
            table[f"{prefix}.{name}" if prefix else name] = declared[name]
    return table


def draw(name: str, init: Init, shape: torch.Size, seed: int) -> torch.Tensor:
    """The whole initial tensor of parameter ``name``: a pure function of (seed, name)."""
    return init.full(shape, torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode())))


def copy_whole(param: torch.Tensor, full: torch.Tensor) -> None:
    param.copy_(full)


@torch.no_grad()
def initialize(
    model: nn.Module,
    seed: int,
    inits: dict[str, Init] | None = None,
    assign: Callable[[torch.Tensor, torch.Tensor], None] = copy_whole,
    name_of: Callable[[str], str] = lambda name: name,
) -> None:
    """Set every parameter of ``model`` to its initial value and rebuild computed buffers.

    ``inits`` (default: collected from ``model``) maps the plain model's names; ``name_of`` maps a
    name in ``model`` to that plain name, and ``assign`` stores a whole tensor into a parameter
    (``mtk.parallel`` passes ones that see through wrappers and keep a rank's shard).
    """
    inits = initial_values(model) if inits is None else inits
    for name, param in model.named_parameters():
        plain = name_of(name)
        assign(param, draw(plain, inits[plain], param.shape, seed))
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()


class SeededModule(nn.Module):
    """A model that initialises itself from a seed (``init_weights``), and on construction unless it
    is built on the meta device (then it is initialised once materialised, shard by shard)."""

    def init_weights(self, seed: int | None = None) -> None:
        """Initial weights from ``seed`` (default: drawn from torch's global generator)."""
        if seed is None:
            seed = int(torch.randint(2**62, ()).item())
        initialize(self, seed)

    def init_unless_meta(self) -> None:
        if next(self.parameters()).device.type != "meta":
            self.init_weights()
