"""The examples in the packages' docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"controlmd": ROOT / "controlmd", "controlmd_envs": ROOT / "envs"}
MODULES = sorted(
    ".".join((name, *path.relative_to(folder).with_suffix("").parts)).removesuffix(".__init__")
    for name, folder in PACKAGES.items()
    for path in folder.rglob("*.py")
    if ">>> " in path.read_text(encoding="utf-8")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, f"{name}: {result}"
