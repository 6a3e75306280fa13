"""DPL's named presets and the `--dpl-config` file: research settings kept out of the options.

A settings file is a JSON object of `DplLossConfig` fields, the schema of the `dpl` block of a
model folder's `dpl_defaults.json`, with two optional objects: `null_text` (fields of
`NullTextSettings`, for NTI and DPL) and `background` (fields of `BackgroundSettings`, how the
background mask is estimated). A preset is such a file that ships with the package, written
here as data; `model` is the one whose DPL block is the model folder's own.

A file is untrusted input: every key, type and range is checked before the model loads, and
any problem is one `DplError` naming the key. This module imports no torch (the command's help
lists the presets from here); the settings classes are imported when a file is checked.
"""

from __future__ import annotations

import difflib
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dpl_edit.errors import DplError

if TYPE_CHECKING:
    from dpl_edit.dpl.losses import DplLossConfig

SECTIONS = ("null_text", "background")
"""The objects a settings file may hold next to its DPL fields."""
MAX_FILE_BYTES = 1 << 20
"""A settings file is a few hundred bytes; a larger one is refused before it is parsed."""


@dataclass(frozen=True)
class Preset:
    """A named settings file: `dpl` None means the model folder's own DPL settings."""

    help: str
    dpl: Mapping[str, Any] | None
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "model": Preset(
        "the model folder's own (its dpl_defaults.json, else the paper's): own-region DPL on "
        "the bundled models (one loss on each word's own region, bounded vectors)",
        dpl=None,
    ),
    "paper": Preset("the paper's three losses", dpl={}),
}
DEFAULT_PRESET = "model"


@dataclass(frozen=True)
class DplChoice:
    """What a preset and a settings file ask for, checked, before the model is known.

    `base` holds the preset's DPL fields (None: the model's own settings), `dpl` the file's on
    top of them; `null_text` and `background` the fields of those sections, the file's on top
    of the preset's. `explicit` says whether a preset was named: with the file's DPL fields,
    what an inversion by another method must refuse rather than ignore.
    """

    base: Mapping[str, Any] | None
    dpl: Mapping[str, Any]
    null_text: Mapping[str, Any]
    background: Mapping[str, Any]
    explicit: bool

    @property
    def has_dpl(self) -> bool:
        """Whether any DPL loss or background setting was asked for."""
        return self.explicit or bool(self.dpl) or bool(self.background)

    def dpl_config(
        self, model_config: DplLossConfig, extra: Mapping[str, Any] | None = None
    ) -> DplLossConfig:
        """The `DplLossConfig`: the preset's (or `model_config`, the model's own), then `extra`
        (e.g. --fast's), then the file's fields."""
        from dpl_edit.dpl.losses import DplLossConfig

        base = model_config if self.base is None else DplLossConfig(**self.base)
        return replace(base, **{**(extra or {}), **self.dpl})


def _settings_classes() -> dict[str, type]:
    """Each part of a settings file and the dataclass whose fields it holds."""
    from dpl_edit.dpl.losses import DplLossConfig
    from dpl_edit.dpl.stage import BackgroundSettings
    from dpl_edit.engine.settings import NullTextSettings

    return {"": DplLossConfig, "null_text": NullTextSettings, "background": BackgroundSettings}


def _reject_constant(name: str) -> float:
    raise DplError(f"{name} is not a number JSON allows; use a finite number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's keys, refusing one given twice (JSON would keep the last silently)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise DplError(f"the key '{_shown(key)[1:-1]}' is given twice")
        seen.add(key)
    return dict(pairs)


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`, refusing what is not one (no NaN, no repeated key)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DplError(f"is larger than {MAX_FILE_BYTES // 1024} KiB; a settings file is small")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DplError("does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DplError(f"cannot be read ({exc})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise DplError(f"is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DplError(f"must hold a JSON object, not {type(data).__name__}")
    return data


def _shown(value: Any, limit: int = 60) -> str:
    """A value of the file as an error message shows it: JSON, escaped onto one line, cut short."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(hint: Any) -> str:
    """What a value of `hint` looks like, for an error message."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(choice) for choice in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        kinds = [_kind(arg) for arg in typing.get_args(hint) if arg is not type(None)]
        return " or ".join([*kinds, "null"])
    if origin is tuple:
        element = typing.get_args(hint)[0]
        return "a list of " + {int: "whole numbers", float: "numbers"}.get(element, str(element))
    return {bool: "true or false", int: "a whole number", float: "a number"}.get(hint, str(hint))


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value is of the type `hint` names (a bool is no number here)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return isinstance(value, str) and value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(
            value is None if arg is type(None) else _fits(value, arg)
            for arg in typing.get_args(hint)
        )
    if origin is tuple:
        return isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False
        try:
            return math.isfinite(float(value))
        except OverflowError:  # an integer beyond any float
            return False
    return False


def _checked(section: str, values: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """`values` with every key a field of `cls` and every value of its type; then `cls` built
    from them (on its defaults) so that its own range checks run now."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    prefix = f"{section}." if section else ""
    for key, value in values.items():
        if key not in hints:
            shown = _shown(key)[1:-1]
            close = difflib.get_close_matches(shown, names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else "see docs/guide.md"
            where = f"in '{section}'" if section else "of DPL"
            raise DplError(f"'{prefix}{shown}' is not a setting {where}; {hint}")
        if not _fits(value, hints[key]):
            raise DplError(f"'{prefix}{key}' must be {_kind(hints[key])}, got {_shown(value)}")
    converted = {
        key: tuple(value) if isinstance(value, list) else value for key, value in values.items()
    }
    try:
        cls(**converted)
    except DplError as exc:
        message = _shown(str(exc), 200)[1:-1]
        raise DplError(f"{section}: {message}" if section else message) from None
    return converted


def check_settings(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A settings object's DPL fields and its sections, each checked (`DplError` otherwise)."""
    classes = _settings_classes()
    sections: dict[str, dict[str, Any]] = {}
    for name in SECTIONS:
        block = data.get(name, {})
        if not isinstance(block, dict):
            raise DplError(f"'{name}' must be a JSON object of settings, got {_shown(block)}")
        sections[name] = _checked(name, block, classes[name])
    dpl = {key: value for key, value in data.items() if key not in SECTIONS}
    return _checked("", dpl, classes[""]), sections


def choose(preset: str | None = None, config_file: str | Path | None = None) -> DplChoice:
    """The settings a preset (default `model`) and a settings file on top of it ask for, both
    checked now, before any model work; errors name the option and the key."""
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise DplError(f"unknown --dpl-preset '{name}'; use {', '.join(PRESETS)}")
    chosen = PRESETS[name]
    base_dpl, base_sections = check_settings({**(chosen.dpl or {}), **chosen.sections})
    dpl: dict[str, Any] = {}
    sections = base_sections
    if config_file is not None:
        try:
            dpl, file_sections = check_settings(read_settings_file(config_file))
        except DplError as exc:
            raise DplError(f"--dpl-config '{config_file}': {exc}") from None
        sections = {key: {**base_sections[key], **file_sections[key]} for key in SECTIONS}
    return DplChoice(
        base=None if chosen.dpl is None else base_dpl,
        dpl=dpl,
        null_text=sections["null_text"],
        background=sections["background"],
        explicit=preset is not None,
    )
