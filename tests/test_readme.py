"""The README's quickstart blocks run as printed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from controlmd.config import resolve_config
from controlmd.tomlfile import read_toml

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def test_the_toml_quickstart_is_a_valid_experiment(tmp_path: Path) -> None:
    (block,) = _blocks("toml")
    path = tmp_path / "quick.toml"
    path.write_text(block)
    cfg = resolve_config(read_toml(path))
    assert cfg["task"]["name"] == "trap_drag" and cfg["protocol"]["kind"] == "mlp"


@pytest.mark.slow
def test_the_python_quickstart_runs(capsys: pytest.CaptureFixture) -> None:
    (block,) = _blocks("python")
    assert len(block.strip().splitlines()) <= 20
    exec(compile(block, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "T = " in out and "d loss / d epsilon = " in out
