"""torch.compile applied from outside the model: each transformer block compiled in place.

Regional compilation, as torchtitan does it: every layer of ``family.blocks(model)`` is compiled with
``nn.Module.compile()`` (in place: the module stays where it is, so parameter names and checkpoints
are those of the eager model, with no ``_orig_mod.`` prefix). Layers of one type share one graph, so
compile time does not grow with depth. ``parallelize`` compiles after FP8 conversion, tensor and
context parallelism and the recomputation wrapper (the checkpoint-wrapped block is what is compiled),
and before FSDP2/DDP wraps the blocks.

``CompilePlan`` says whether a run compiles, why, and what (console, ``mtk.json``, ``mtk bench``);
its backend counts, for each block, the calls that compiled something (one call may compile several
graphs around graph breaks: torchao's FP8 casts, hooks); a block that compiles again on more than
``RECOMPILES_TOLERATED`` calls (shapes or Python values that change between steps: a recompile storm)
is named once in a warning.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mtk.config import RunConfig

WHAT = "per transformer block"
# calls of one block that may compile before it is called a storm: train and eval (no-grad) modes,
# one dynamic-shape recompile (automatic dynamic shapes), a last short batch
RECOMPILES_TOLERATED = 4


def compile_wanted(config: RunConfig, device: str) -> tuple[bool, str]:
    """Whether a run of ``config`` on ``device`` compiles, and why (the setting, or the default)."""
    return compile_choice(config.train.compile, device)


def compile_choice(setting: bool | None, device: str) -> tuple[bool, str]:
    """``--compile/--no-compile`` (``setting``; None: the default for ``device``), and why."""
    if setting is not None:
        return setting, "--compile" if setting else "--no-compile"
    if device.startswith("cuda"):
        return True, "the default on CUDA devices; --no-compile turns it off"
    return False, "the default on CPU, where it does not pay for small models; --compile turns it on"


@dataclass
class CompilePlan:
    """Whether the run compiled its blocks, why, and the graphs each block compiled so far."""

    enabled: bool
    reason: str
    blocks: list[str] = field(default_factory=list)  # block names in the plain model
    graphs: int = 0  # graphs compiled so far, all blocks
    compiles: Counter = field(default_factory=Counter)  # block name -> its calls that compiled
    warn: Callable[[str], None] | None = None  # where the storm warning goes (default: warnings.warn)
    warned: set[str] = field(default_factory=set)

    def summary(self) -> str:
        if not self.enabled:
            return f"torch.compile off ({self.reason})"
        return f"torch.compile {WHAT} ({len(self.blocks)} blocks, inductor; {self.reason})"

    def describe(self) -> dict[str, Any]:
        """For the run's ``mtk.json``."""
        return {
            "enabled": self.enabled,
            "what": WHAT if self.enabled else None,
            "reason": self.reason,
            "blocks": len(self.blocks),
        }

    def backend(self, graph, example_inputs):
        """Inductor, counting the graphs compiled."""
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return compile_fx(graph, example_inputs)

    def called(self, name: str, graphs_before: int) -> None:
        """Block ``name`` returned: count the call if it compiled, and warn once about a storm."""
        if self.graphs == graphs_before:
            return
        self.compiles[name] += 1
        count = self.compiles[name] - 1
        if count > RECOMPILES_TOLERATED and name not in self.warned:
            self.warned.add(name)
            message = (
                f"block {name} recompiled {count} times: its input shapes or Python values change "
                "between steps (e.g. a varying sequence length or batch size), so torch.compile keeps "
                "recompiling it; keep shapes fixed or run with --no-compile"
            )
            (self.warn or (lambda text: warnings.warn(text, stacklevel=3)))(f"warning: {message}")


def apply_compile(model: nn.Module, blocks: list[nn.ModuleDict], plan: CompilePlan) -> None:
    """Compile each layer of ``blocks`` (layers of ``model``) in place, with ``plan``'s counting backend."""
    from mtk.parallel.apply import plain_name

    names = {id(module): plain_name(name) for name, module in model.named_modules()}
    for layers in blocks:
        for layer in layers.values():
            name = names[id(layer)]
            layer.compile(backend=plan.backend)
            layer._compiled_call_impl = _naming(layer._compiled_call_impl, name, plan)
            plan.blocks.append(name)


def _naming(call: Callable, name: str, plan: CompilePlan) -> Callable:
    """``call`` (a block's compiled call) that first records which block runs, for the storm warning."""

    def named(*args: Any, **kwargs: Any) -> Any:
        before = plan.graphs
        result = call(*args, **kwargs)
        plan.called(name, before)
        return result

    return named


__all__ = ["CompilePlan", "apply_compile", "compile_choice", "compile_wanted", "RECOMPILES_TOLERATED", "WHAT"]
