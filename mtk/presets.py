"""Presets: TOML files under ``presets/`` (shipped inside the wheel as ``mtk/preset_files``), or any
file of the same format given by its path (``mtk train --preset ./mine.toml``)."""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Sequence
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


def is_preset_path(name: str) -> bool:
    """Whether ``name`` is a preset file's path rather than a shipped preset's name."""
    return name.endswith(".toml") or "/" in name or "\\" in name


def load_preset(name: str) -> Preset:
    """A shipped preset by name (``gpt3-175b``), or a preset file by path (``./mine.toml``)."""
    if is_preset_path(name):
        path = Path(name)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(
                f"preset file {path}: cannot be read ({getattr(err, 'strerror', None) or err})"
            ) from None
        where, preset_name = f"preset file {path}", path.stem
    else:
        files = _preset_files()
        if name not in files:
            raise ConfigError(
                f"unknown preset '{name}'; choose one of: {', '.join(sorted(files))}, or give a preset file's path"
            )
        text, where, preset_name = files[name].read_text(encoding="utf-8"), f"preset {name}", name
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where}: not valid TOML ({err})") from None
    sections = {key: data.pop(key, {}) for key in SECTIONS}
    published = data.pop("published", {})
    description = data.pop("description", "")
    tokenizer = data.pop("tokenizer", "")
    tiny = data.pop("tiny", False)
    if data:
        raise ConfigError(f"{where}: unknown top-level keys {sorted(data)}")
    config = RunConfig.from_dict(sections, where=where)
    return Preset(
        name=preset_name,
        description=description,
        config=config,
        tokenizer=tokenizer,
        tiny=tiny,
        published=published,
        sections=sections,
    )


def preset_toml(
    description: str, sections: dict[str, dict[str, Any]], comments: Sequence[str] = (), tokenizer: str = ""
) -> str:
    """A preset file: ``comments`` (one ``#`` line each), description, tokenizer, then one table per
    section in config order; ``load_preset`` reads it back to the same values."""
    lines = [f"# {comment}".rstrip() for comment in comments]
    lines.append(f"description = {_toml_value(description)}")
    if tokenizer:
        lines.append(f"tokenizer = {_toml_value(tokenizer)}")
    for section in SECTIONS:
        values = {key: value for key, value in sections.get(section, {}).items() if value is not None}
        if values:
            lines += ["", f"[{section}]", *(f"{key} = {_toml_value(value)}" for key, value in values.items())]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # 6e-05, 0.00015, 4294967296.0: all TOML floats
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string: the same escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")
