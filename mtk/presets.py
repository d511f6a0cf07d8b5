"""Named presets: TOML files under ``presets/`` (shipped inside the wheel as ``mtk/preset_files``)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mtk.config import SECTIONS, ConfigError, RunConfig


@dataclass
class Preset:
    name: str
    description: str
    config: RunConfig
    tokenizer: str = ""
    tiny: bool = False
    published: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)  # the values the file sets


def _preset_files() -> dict[str, Any]:
    try:
        root = resources.files("mtk.preset_files")
    except ModuleNotFoundError:  # running from a checkout that is not installed
        root = Path(__file__).resolve().parent.parent / "presets"
    return {p.name[: -len(".toml")]: p for p in root.iterdir() if p.name.endswith(".toml")}


def preset_names() -> list[str]:
    """Recipe presets first (in file-name order), tiny ones after."""
    names = sorted(_preset_files())
    return sorted(names, key=lambda n: (load_preset(n).tiny, n))


def load_preset(name: str) -> Preset:
    files = _preset_files()
    if name not in files:
        raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(sorted(files))}")
    data = tomllib.loads(files[name].read_text(encoding="utf-8"))
    sections = {key: data.pop(key, {}) for key in SECTIONS}
    published = data.pop("published", {})
    description = data.pop("description", "")
    tokenizer = data.pop("tokenizer", "")
    tiny = data.pop("tiny", False)
    if data:
        raise ConfigError(f"preset {name}: unknown top-level keys {sorted(data)}")
    config = RunConfig.from_dict(sections, where=f"preset {name}")
    return Preset(
        name=name,
        description=description,
        config=config,
        tokenizer=tokenizer,
        tiny=tiny,
        published=published,
        sections=sections,
    )
