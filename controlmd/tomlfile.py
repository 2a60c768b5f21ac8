"""Experiment files as raw tables, without torch: reading TOML, ``--set`` overrides, the
run name rule, and writing tables back.

:mod:`controlmd.config` validates what these functions return against a schema; the CLI
uses them alone to create a run folder before the heavy modules load.
"""

from __future__ import annotations

import copy
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tomli_w

from controlmd.errors import ConfigError, ControlMDError
from controlmd.files import read_text

__all__ = [
    "apply_overrides",
    "check_run_name",
    "dumps",
    "parse_override",
    "read_toml",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def read_toml(path: str | Path, what: str = "experiment file") -> dict[str, Any]:
    """The raw tables of a TOML file.

    :raises ConfigError: a missing file, a folder, text that is not UTF-8 or not TOML
        (one line naming the file).
    """
    path = Path(path)
    try:
        text = read_text(path, what)
    except ControlMDError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def apply_overrides(
    raw: dict[str, Any], overrides: Iterable[str], *, sections: Iterable[str] | None = None
) -> dict[str, Any]:
    """Apply ``"section.key=value"`` overrides to ``raw`` in place (and return it)."""
    for item in overrides:
        section, key, value = parse_override(item, sections=sections)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"--set {item!r}: [{section}] is not a section")
        raw[section][key] = value
    return raw


def parse_override(item: str, *, sections: Iterable[str] | None = None) -> tuple[str, str, Any]:
    """``"train.lr=0.01"`` -> ``("train", "lr", 0.01)``; the value is parsed as TOML, else
    kept as a string. ``sections`` lists the valid section names (``None`` accepts any)."""
    lhs, sep, rhs = item.partition("=")
    section, dot, key = lhs.strip().partition(".")
    if not sep or not dot or not section or not key or "." in key:
        raise ConfigError(f"--set expects section.key=value (e.g. train.lr=0.01), got {item!r}")
    if sections is not None and section not in sections:
        names = ", ".join(sections)
        raise ConfigError(f"--set {item!r}: unknown section [{section}]; expected one of: {names}")
    text = rhs.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return section, key.strip(), value


def check_run_name(name: Any, key: str = "experiment.name") -> str:
    """A run name is a plain file name (it names a folder under ``runs/``): letters,
    digits, ``.``, ``_``, ``+``, ``-``, not starting with a dot; no separators, no ``..``,
    not empty.

    :raises ConfigError: naming ``key`` and the value.
    """
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise ConfigError(
            f"{key} must be a plain file name (letters, digits, '.', '_', '+', '-'; no path "
            f"separators, not starting with '.'), got {name!r}"
        )
    return name


def dumps(tables: dict[str, dict[str, Any]]) -> str:
    """Tables as TOML text (``None`` values are left out: TOML has no null)."""
    clean = {s: {k: v for k, v in values.items() if v is not None} for s, values in tables.items()}
    return tomli_w.dumps(copy.deepcopy(clean))
