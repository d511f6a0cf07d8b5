"""Model families: one file each, holding the plain ``nn.Module`` and its spec (``mtk.models.spec``)."""

from __future__ import annotations

import importlib

from mtk.config import ConfigError
from mtk.models.spec import FamilySpec

# ModelConfig.family -> the module whose SPEC describes it
FAMILY_MODULES = {
    "gpt": "mtk.models.gpt",
    "bert": "mtk.models.bert",
    "t5": "mtk.models.t5",
    "retro": "mtk.models.retro",
}


def family_spec(family: str) -> FamilySpec:
    if family not in FAMILY_MODULES:
        raise ConfigError(f"unknown model family '{family}' (known: {', '.join(FAMILY_MODULES)})")
    return importlib.import_module(FAMILY_MODULES[family]).SPEC
