"""The one way a command gets its model: the config checked, the model described on the meta device and
turned into this rank's ``ParallelModel`` by ``mtk.parallel.parallelize``.

``mtk train``, ``mtk bench``, ``mtk eval-squad``, ``mtk generate`` (``mtk.generate.load_run``) and
``mtk checkpoint import-hf`` (``mtk.hf.import_hf``, the model its weights are copied into) all build
through ``build_model``: FP8, recomputation, data parallelism (and whatever ``parallelize``
applies next) cannot be applied differently by one of them, so ``mtk bench`` measures the model
``mtk train`` trains, and initial weights come from ``config.train.seed`` everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mtk.config import ParallelConfig, RunConfig, check_run
from mtk.models import family_spec
from mtk.models.spec import TrainableFamily, check_model_fits
from mtk.parallel.apply import ParallelModel

# what a model that only runs forward (generation, answering) is checked against: its family's rules;
# the layout, batch, length and data rules are about a training run
INFERENCE_RULES = ("data", "layout", "batch", "length", "schedule", "precision")


@dataclass
class BuiltModel:
    """What ``build_model`` returns: the family spec, this rank's model and the config it was built from."""

    family: TrainableFamily
    model: ParallelModel
    config: RunConfig

    @property
    def module(self) -> torch.nn.Module:
        """The whole model of a single process (its one part)."""
        return self.model.parts[0]

    def describe(self) -> str:
        """What was applied to the plain model: FP8, recomputation, torch.compile, data-parallel wrapping."""
        fp8 = self.model.fp8.summary() if self.model.fp8 is not None else "FP8 off"
        recompute = self.config.parallel.recompute_granularity
        dims = self.model.dims
        sharding = (
            f"data parallel {self.config.parallel.sharding_strategy()} over {dims.dp * dims.cp} rank(s)"
            if self.model.data_parallel
            else "no data-parallel wrapping"
        )
        compiled = self.model.compiled
        compiling = compiled.summary() if compiled is not None else "torch.compile off"
        return f"{fp8}, recompute {recompute or 'off'}, {compiling}, {sharding}"


def check_config(
    config: RunConfig,
    world_size: int = 1,
    device: str = "cpu",
    training: bool = True,
    ignore: Sequence[str] = (),
) -> TrainableFamily:
    """The family of ``config`` once every rule holds (``check_run``, which also completes ``config.model``
    with what the family derives) and, for training, the run fits
    ``device`` (``check_fits``); ConfigError otherwise, before anything is allocated. ``training``
    False checks a model that only runs forward: its family's rules, and that its weights fit.
    ``ignore``: rule kinds the caller answers for itself (``eval-squad``'s data is neither)."""
    from mtk.plan import check_fits

    family = family_spec(config.model.family)
    check_run(config, world_size, family, ignore=(*ignore, *(() if training else INFERENCE_RULES)))
    if training:
        check_fits(config, world_size, device)
    if world_size == 1:  # the whole model on this device: its weights alone must fit
        check_model_fits(family, config.model, torch.device(device))
    return family


def inference_config(config: RunConfig) -> RunConfig:
    """``config`` for a model that only runs forward in one process: no FP8, no recomputation, no
    torch.compile (generation runs eager: its KV cache grows by a token a step), no model or data
    parallelism (the checkpoint's weights as they were saved, whole)."""
    parallel = one_process(config.parallel, recompute_granularity=None, data_parallel_sharding_strategy=None)
    train = dataclasses.replace(config.train, fp8=None, compile=False)
    return dataclasses.replace(config, train=train, parallel=parallel)


def one_process(parallel: ParallelConfig, **changes: Any) -> ParallelConfig:
    """``parallel`` without model parallelism (TP, PP, VP, CP all 1), and ``changes``."""
    return dataclasses.replace(
        parallel,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        context_parallel_size=1,
        **changes,
    )


def build_model(
    config: RunConfig,
    device: str = "cpu",
    world_size: int = 1,
    mesh: Any = None,
    *,
    training: bool = True,
    check: bool = True,
    wrap_alone: bool = False,
) -> BuiltModel:
    """This rank's model of ``config`` on ``device``, as ``mtk train`` builds it on ``world_size`` ranks.

    The config is checked first (``check_config``; ``check`` False when the caller just did). The model
    is described on the meta device, then ``parallelize`` converts it to FP8, cuts it for the layout
    of ``mesh`` (None in a single process; built here under torchrun when ``world_size`` > 1 and none
    is given), wraps recomputation and data parallelism, and only then allocates this rank's part and
    initialises it from ``config.train.seed``. ``training`` False builds the plain model for forward
    use (``inference_config``). ``wrap_alone``: wrap data parallelism even as the only data-parallel rank
    (``mtk bench --fsdp``, measuring the wrappers; needs ``mesh``).
    """
    from mtk.parallel.apply import parallelize
    from mtk.parallel.dims import ParallelDims

    if not training:
        config = inference_config(config)
    family = check_config(config, world_size, device, training) if check else family_spec(config.model.family)
    dims = ParallelDims.from_config(config, world_size)
    if mesh is None and world_size > 1:
        mesh = dims.build_mesh(device.split(":")[0])
    with torch.device("meta"):  # nothing allocated until this rank's part is known
        model = family.build(config.model)
    parallel = parallelize(model, family, config, dims, mesh, device, wrap_alone=wrap_alone)
    return BuiltModel(family, parallel, config)


__all__ = ["BuiltModel", "build_model", "check_config", "inference_config", "one_process", "INFERENCE_RULES"]
