"""Model families: one file each, holding the plain ``nn.Module`` and its spec (``mtk.models.spec``).

The registry below is the one list of families: ``ModelConfig.family`` is a name in it. The built-in
families (``BUILT_IN``) register themselves on the first lookup; code outside mtk adds one with
``register_family(name, spec)`` (as torchtitan's ``register_train_spec``), and every command
(``mtk train``, ``plan``, ``bench``, ``presets``) then takes presets with ``family = name``.
"""

from __future__ import annotations

import importlib

from mtk.config import ConfigError, ModelConfig, field_names
from mtk.models.spec import TrainableFamily

# the modules of the built-in families, whose SPEC is registered before any lookup, in this order
BUILT_IN = ("mtk.models.gpt", "mtk.models.bert", "mtk.models.t5", "mtk.models.retro")

_REGISTRY: dict[str, TrainableFamily] = {}
_BUILT_IN_NAMES: set[str] = set()


def _registry() -> dict[str, TrainableFamily]:
    if not _BUILT_IN_NAMES:
        for module in BUILT_IN:
            spec = importlib.import_module(module).SPEC
            _BUILT_IN_NAMES.add(spec.name)
            _add(spec.name, spec)
    return _REGISTRY


def _add(name: str, spec: TrainableFamily) -> None:
    if not isinstance(spec, TrainableFamily):
        raise TypeError(f"register_family({name!r}, ...): expected a TrainableFamily instance, got {spec!r}")
    if getattr(spec, "name", None) != name:
        raise ConfigError(
            f"register_family({name!r}, ...): the spec is named {getattr(spec, 'name', None)!r}; "
            "register it under its own name (the class attribute `name`)"
        )
    unknown = [key for key in spec.config_fields if key not in field_names(ModelConfig) or key == "family"]
    if unknown:
        raise ConfigError(
            f"register_family({name!r}, ...): config_fields {unknown} are not fields of ModelConfig; a "
            "family declares the model settings only it reads"
        )
    known = _REGISTRY.get(name)
    if known is not None and known is not spec:
        raise ConfigError(
            f"model family '{name}' is already registered ({type(known).__module__}.{type(known).__qualname__}); "
            "choose another name for this family"
        )
    _REGISTRY[name] = spec


def register_family(name: str, spec: TrainableFamily) -> None:
    """Add the family ``spec`` under ``name`` (its ``spec.name``): configs with ``family = name`` then
    train, plan and show through it. Registering the same spec again does nothing; another spec under
    a registered name is refused (ConfigError)."""
    _registry()
    _add(name, spec)


def unregister_family(name: str) -> None:
    """Remove a family added with ``register_family`` (the built-in ones stay)."""
    if name in _BUILT_IN_NAMES:
        raise ConfigError(f"model family '{name}' is built in; it cannot be unregistered")
    _registry().pop(name, None)


def family_names() -> list[str]:
    """The registered families: the built-in ones first, then those registered since, in order."""
    return list(_registry())


def family_spec(family: str) -> TrainableFamily:
    """The spec of ``ModelConfig.family``; ConfigError naming the known families for another name."""
    registry = _registry()
    if family not in registry:
        raise ConfigError(f"unknown model family '{family}' (known: {', '.join(registry)})")
    return registry[family]


def megatron_families(script: str) -> list[TrainableFamily]:
    """The families Megatron-LM's ``script`` (``pretrain_gpt.py`` ...) trains, in registry order."""
    return [spec for spec in _registry().values() if spec.megatron_script == script]
