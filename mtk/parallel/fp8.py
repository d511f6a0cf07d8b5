"""FP8 matmuls for the transformer layers' linears, applied from outside the model like parallelism.

``convert_to_fp8`` swaps the chosen ``nn.Linear`` modules for torchao's ``Float8Linear`` (current
scaling: each cast computes its own amax), before tensor parallelism and FSDP2 wrap them, as
torchtitan does. Which linears: those of the transformer layers (``family.blocks``), except the
first/last layers with ``first_last_layers_bf16``; embeddings, the output layer and heads stay in
high precision. Formats: hybrid = E4M3 forward, E5M2 gradients; e4m3 everywhere. A recipe torchao
cannot run (delayed or blockwise scaling: Transformer Engine's) falls back to tensorwise, said in
``FP8Plan.note`` (console and run manifest), or is an error with ``fp8_strict``. With Transformer
Engine installed (CUDA only), its ``Linear`` replaces the same linears and the forward runs under
``fp8_autocast`` with Megatron's recipe mapping (delayed -> DelayedScaling, tensorwise ->
Float8CurrentScaling, blockwise -> Float8BlockScaling); the CUDA-only lines are ``_plan_te``,
``te_recipe``, ``_swap_te_linears`` and ``FP8Plan.autocast``. ``--fp8-backend auto`` takes Transformer
Engine only where it can run the run (installed, a CUDA device, no tensor parallelism, a recipe it
has), torchao otherwise, and says which and why (``FP8Plan.backend_reason``). Off CUDA (or below
compute capability 8.9) the FP8 casts are emulated: the numerics are FP8's, the speed is not.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mtk.config import ConfigError, RunConfig

TORCHAO_RECIPES = ("tensorwise", "rowwise")
# Megatron's mapping of --fp8-recipe to Transformer Engine's recipe classes (it has no rowwise)
TE_RECIPES = {
    "delayed": "DelayedScaling",
    "tensorwise": "Float8CurrentScaling",
    "blockwise": "Float8BlockScaling",
}


@dataclass
class FP8Plan:
    """What FP8 a run uses: for the console, the manifest and the amax monitor."""

    format: str
    recipe: str  # the recipe in effect
    requested_recipe: str
    backend: str
    emulated: bool
    backend_reason: str = ""  # why this backend: asked for, or what ``auto`` saw
    linears: list[str] = field(default_factory=list)  # module names converted
    fsdp_all_gather: bool = False  # FSDP2 all-gathers the weights in FP8
    note: str | None = None  # a fallback or an ignored setting, said out loud
    te_recipe: Any = None  # Transformer Engine's recipe object (backend "te")

    def describe(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key not in ("linears", "te_recipe")} | {
            "linears": len(self.linears)
        }

    def autocast(self):
        """The context the forward runs in: Transformer Engine's ``fp8_autocast`` with the recipe (its
        linears are FP8 only inside it); nothing for torchao, whose linears cast by themselves."""
        if self.backend != "te":
            import contextlib

            return contextlib.nullcontext()
        import transformer_engine.pytorch as te

        return te.fp8_autocast(enabled=True, fp8_recipe=self.te_recipe)

    def summary(self) -> str:
        emulated = ", emulated (no FP8 hardware)" if self.emulated else ""
        text = (
            f"FP8 {self.format}, {self.recipe} scaling, {self.backend}{emulated}, {len(self.linears)} linears"
        )
        return "; ".join(part for part in (text, self.backend_reason, self.note) if part)


def fp8_linears(model: nn.Module, blocks: list[nn.ModuleDict], config: RunConfig) -> list[str]:
    """Names (in ``model``) of the linears of the transformer layers FP8 applies to."""
    train = config.train
    names = {id(module): name for name, module in model.named_modules()}
    chosen = []
    for layers in blocks:
        keys = list(layers.keys())
        skip = set()
        if train.first_last_layers_bf16:
            skip = set(keys[: train.num_layers_at_start_in_bf16])
            skip |= set(keys[len(keys) - train.num_layers_at_end_in_bf16 :])
        for key in keys:
            if key in skip:
                continue
            for module in layers[key].modules():
                if isinstance(module, nn.Linear):
                    chosen.append(names[id(module)])
    return chosen


def _emulated(device: str) -> bool:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return True
    return torch.cuda.get_device_capability() < (8, 9)


def plan_fp8(config: RunConfig, device: str) -> FP8Plan | None:
    """The FP8 a run of ``config`` on ``device`` gets (None without ``fp8``); ConfigError for a choice
    that cannot be honoured (a backend that is not there, a recipe fallback under ``fp8_strict``)."""
    train = config.train
    if train.fp8 is None:
        return None
    backend, reason = choose_backend(config, device)
    plan = _plan_te(config, device) if backend == "te" else _plan_torchao(config, device)
    plan.backend_reason = reason
    return plan


TE_MISSING = "Transformer Engine is not installed"


def te_problems(config: RunConfig, device: str) -> list[str]:
    """Why Transformer Engine cannot run ``config`` on ``device`` (nothing when it can)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return [TE_MISSING]  # the rest is moot
    problems = []
    tp = config.parallel.tensor_model_parallel_size
    if tp > 1:
        problems.append(
            f"Transformer Engine's linears do their own tensor parallelism, which mtk's DTensor plans "
            f"(--tp {tp}) do not drive"
        )
    if not device.startswith("cuda"):
        problems.append(f"Transformer Engine runs on CUDA devices only, not {device}")
    return problems


def choose_backend(config: RunConfig, device: str) -> tuple[str, str]:
    """The FP8 backend of ``config`` on ``device`` and why: the one asked for, or for ``auto``
    Transformer Engine where it runs this layout and recipe, else torchao."""
    train = config.train
    if train.fp8_backend != "auto":
        return train.fp8_backend, f"--fp8-backend {train.fp8_backend}"
    problems = te_problems(config, device)
    if train.fp8_recipe not in TE_RECIPES:
        problems.append(f"Transformer Engine has no {train.fp8_recipe} scaling")
    if not problems:
        return "te", "auto chose Transformer Engine: installed, a CUDA device, no tensor parallelism"
    return "torchao", f"auto chose torchao: {'; '.join(problems)}"


def _plan_torchao(config: RunConfig, device: str) -> FP8Plan:
    """torchao's Float8Linear: current scaling, any device (emulated off FP8 hardware)."""
    train = config.train
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("FP8 needs torchao: pip install torchao (or mtk's 'fp8' extra)")
    notes = []
    recipe = train.fp8_recipe
    if recipe not in TORCHAO_RECIPES:
        message = f"torchao has no {recipe} scaling: tensorwise current scaling instead"
        if train.fp8_strict:
            raise ConfigError(
                f"--fp8-recipe {recipe} with --fp8-strict: {message.split(':')[0]}; use --fp8-recipe tensorwise or rowwise"
            )
        notes.append(message)
        recipe = "tensorwise"
    if recipe != "delayed" and (train.fp8_margin or train.fp8_amax_history_len != 1):
        notes.append("--fp8-margin and the amax history apply to delayed scaling only: not used")
    emulated = _emulated(device)
    if not emulated:  # FP8 tensor cores multiply widths that are multiples of 16
        model, tp = config.model, config.parallel.tensor_model_parallel_size
        widths = {
            "hidden_size": model.hidden_size,
            "ffn_hidden_size / TP": model.ffn_hidden_size // tp,
            "heads x kv_channels / TP": model.num_attention_heads * model.kv_channels // tp,
            "query groups x kv_channels / TP": model.num_query_groups * model.kv_channels // tp,
        }
        odd = [f"{name} = {value}" for name, value in widths.items() if value % 16]
        if odd:
            raise ConfigError(
                f"FP8 matmuls need every linear's width to be a multiple of 16: {', '.join(odd)}"
            )
    parallel = config.parallel
    return FP8Plan(
        format=train.fp8,
        recipe=recipe,
        requested_recipe=train.fp8_recipe,
        backend="torchao",
        emulated=emulated,
        note="; ".join(notes) or None,
        fsdp_all_gather=recipe == "tensorwise" and parallel.sharding_strategy() == "optim_grads_params",
    )


def _plan_te(config: RunConfig, device: str) -> FP8Plan:
    """Transformer Engine: Megatron's recipe mapping, under ``fp8_autocast``; CUDA only."""
    train = config.train
    problems = te_problems(config, device)
    if problems == [TE_MISSING]:
        problems = [f"{TE_MISSING} (pip install 'mtk[te]' on a CUDA machine)"]
    if problems:
        raise ConfigError(f"--fp8-backend te: {'; '.join(problems)}; use --fp8-backend torchao or auto")
    notes, recipe = [], train.fp8_recipe
    if recipe not in TE_RECIPES:
        if train.fp8_strict:
            raise ConfigError(
                f"--fp8-recipe {recipe} with --fp8-strict: Transformer Engine has no {recipe} scaling"
            )
        notes.append(f"Transformer Engine has no {recipe} scaling: tensorwise (Float8CurrentScaling) instead")
        recipe = "tensorwise"
    plan = FP8Plan(format=train.fp8, recipe=recipe, requested_recipe=train.fp8_recipe, backend="te",
                   emulated=_emulated(device), note="; ".join(notes) or None)  # fmt: skip
    plan.te_recipe = te_recipe(config, recipe)
    return plan


def te_recipe(config: RunConfig, recipe: str) -> Any:
    """Transformer Engine's recipe object for ``recipe``, as Megatron builds it from the same flags."""
    from transformer_engine.common import recipe as te

    train = config.train
    fp8_format = te.Format.HYBRID if train.fp8 == "hybrid" else te.Format.E4M3
    if recipe == "delayed":
        return te.DelayedScaling(
            margin=train.fp8_margin,
            fp8_format=fp8_format,
            amax_history_len=train.fp8_amax_history_len,
            amax_compute_algo=train.fp8_amax_compute_algo,
        )
    return getattr(te, TE_RECIPES[recipe])(fp8_format=fp8_format)


def _quiet_torchao() -> None:
    """torchao logs a warning for each CUDA kernel library it cannot load (all of them on CPU), and
    torch one for an enum torchao registers: neither is the user's concern."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _torchao_config(plan: FP8Plan):
    _quiet_torchao()
    from torchao.float8.config import CastConfig, Float8LinearConfig, ScalingGranularity

    granularity = ScalingGranularity.AXISWISE if plan.recipe == "rowwise" else ScalingGranularity.TENSORWISE
    forward = CastConfig(scaling_granularity=granularity, target_dtype=torch.float8_e4m3fn)
    gradient_dtype = torch.float8_e5m2 if plan.format == "hybrid" else torch.float8_e4m3fn
    gradient = CastConfig(scaling_granularity=granularity, target_dtype=gradient_dtype)
    return Float8LinearConfig(
        cast_config_input=forward,
        cast_config_weight=forward,
        cast_config_grad_output=gradient,
        round_scales_to_power_of_2=plan.recipe == "rowwise",
        emulate=plan.emulated,
        # FSDP2 gathers the weights already cast to FP8 (half the bytes of bf16): tensorwise only
        enable_fsdp_float8_all_gather=plan.fsdp_all_gather,
    )


def convert_to_fp8(model: nn.Module, blocks: list[nn.ModuleDict], config: RunConfig, plan: FP8Plan) -> None:
    """Swap the FP8 linears of ``model`` (a plain model, before any parallelism) in place."""
    if plan.backend == "te":
        plan.linears = fp8_linears(model, blocks, config)
        _swap_te_linears(model, plan.linears)
        return
    _quiet_torchao()
    from torchao.float8 import convert_to_float8_training

    plan.linears = fp8_linears(model, blocks, config)
    chosen = set(plan.linears)
    convert_to_float8_training(
        model, config=_torchao_config(plan), module_filter_fn=lambda module, name: name in chosen
    )


def _swap_te_linears(model: nn.Module, names: list[str]) -> None:
    """Replace each named ``nn.Linear`` by Transformer Engine's ``Linear`` holding the same weights (same
    parameter names, so checkpoints do not change)."""
    import transformer_engine.pytorch as te

    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attribute)
        weight = linear.weight
        swapped = te.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            params_dtype=weight.dtype, device=weight.device)  # fmt: skip
        with torch.no_grad():
            swapped.weight.copy_(weight)
            if linear.bias is not None:
                swapped.bias.copy_(linear.bias)
        setattr(parent, attribute, swapped)


class AmaxMonitor:
    """The largest input and weight amax each FP8 linear saw since the last ``take``: an FP8
    overflow (an inf or a huge amax) is traced to its layer."""

    def __init__(self, parts: list[nn.Module], names: list[str]) -> None:
        self.largest: tuple[float, str] = (0.0, "")
        wanted = set(names)
        for part in parts:
            for name, module in part.named_modules():
                plain = name.replace("_checkpoint_wrapped_module.", "")
                if plain in wanted:
                    module.register_forward_pre_hook(self._hook(plain))

    def _hook(self, name: str):
        @torch.no_grad()
        def hook(module: nn.Module, args: tuple) -> None:
            for what, tensor in (("input", args[0]), ("weight", module.weight)):
                # this rank's part (``take`` gathers the maximum over ranks); a weight FSDP2 gathered
                # in FP8 arrives cast (read back at its precision) or wrapped for the cast
                tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
                if hasattr(tensor, "to_original_precision"):
                    tensor = tensor.to_original_precision()
                tensor = getattr(tensor, "_tensor", tensor)
                value = float(tensor.detach().abs().max()) if tensor.numel() else 0.0
                if not value <= self.largest[0]:  # also NaN
                    self.largest = (value, f"{name} {what}")

        return hook

    def take(self) -> dict[str, Any]:
        """The largest amax (over every rank) and where, for a metrics record; then start again.
        Every rank calls it."""
        value, where = self.largest
        self.largest = (0.0, "")
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            seen: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(seen, (value, where))
            value, where = max(seen, key=lambda item: (item[0] != item[0], item[0]))  # NaN first
        return {"fp8_amax": value, "fp8_amax_at": where}
