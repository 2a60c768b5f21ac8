"""Experiment files: schema, defaults, overrides, errors naming key and value, round trip."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from controlmd.config import (
    build_protocol,
    build_task,
    config_to_toml,
    load_config,
    parse_override,
    resolve_config,
    write_config,
)
from controlmd.errors import ConfigError
from controlmd.tomlfile import read_toml

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

MINIMAL = """
[experiment]
name = "tiny"

[task]
name = "trap_drag"
n_steps = 10

[protocol]
kind = "chebyshev"
degree = 2

[train]
iterations = 3
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def _raw(**changes: dict) -> dict:
    raw = tomllib.loads(MINIMAL)
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    return raw


def _run_experiments() -> list[Path]:
    """The shipped files of ``controlmd run`` (``[compare]`` and ``[ibi]`` files have their
    own loaders and tests)."""
    return [
        p for p in sorted(EXPERIMENTS.glob("*.toml")) if not {"compare", "ibi"} & set(read_toml(p))
    ]


@pytest.mark.parametrize("path", _run_experiments(), ids=lambda p: p.stem)
def test_shipped_experiments_build_their_task_protocol_and_estimator(path: Path) -> None:
    cfg = load_config(path)  # resolves [train], the estimator's options included
    task = build_task(cfg)
    protocol = build_protocol(cfg, task)
    assert cfg["experiment"]["name"] and cfg["protocol"]["t_final"] == task.horizon
    assert protocol.dim == len(task.controls.names)


def test_defaults_are_filled_from_schema_and_task(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, MINIMAL))
    assert cfg["experiment"]["seed"] == 0
    assert cfg["train"]["optimizer"] == "adam" and cfg["train"]["estimator"] == "pathwise"
    assert cfg["eval"]["replicas"] == 1000 and cfg["logging"]["tensorboard"] is True
    task = build_task(cfg)
    assert cfg["protocol"]["dim"] == 1 and cfg["protocol"]["t_final"] == task.horizon
    assert (cfg["protocol"]["low"], cfg["protocol"]["high"]) == (
        task.controls.low[0],
        task.controls.high[0],
    )


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, MINIMAL), ["protocol.init=[0.0, 5.0]", "train.lr=0.05"])
    write_config(cfg, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == cfg
    assert tomllib.loads(config_to_toml(cfg))["train"]["lr"] == 0.05


def test_overrides_parse_toml_values_with_bare_string_fallback(tmp_path: Path) -> None:
    assert parse_override("train.lr=1e-3") == ("train", "lr", 1e-3)
    assert parse_override("protocol.hidden=[64, 64]") == ("protocol", "hidden", [64, 64])
    assert parse_override("train.optimizer=sgd") == ("train", "optimizer", "sgd")
    assert parse_override("logging.plots=false") == ("logging", "plots", False)
    cfg = load_config(_write(tmp_path, MINIMAL), ["train.optimizer=sgd", "task.lambda_f=2"], seed=7)
    assert (
        cfg["train"]["optimizer"] == "sgd"
        and cfg["task"]["lambda_f"] == 2
        and cfg["experiment"]["seed"] == 7
    )
    for bad in ("train.lr", "lr=0.1", "nosection.key=1", "train.a.b=1"):
        with pytest.raises(ConfigError):
            parse_override(bad)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train": {"lrr": 0.1}}, r"unknown key 'lrr' in \[train\]"),
        ({"train": {"lr": "fast"}}, r"\[train\] lr must be a number, got 'fast' \(str\)"),
        ({"train": {"iterations": 2.5}}, r"\[train\] iterations must be an integer, got 2.5"),
        ({"train": {"replicas": True}}, r"\[train\] replicas must be an integer, got True"),
        ({"train": {"lr": -0.1}}, r"\[train\] lr must be > 0, got -0.1"),
        (
            {"train": {"optimizer": "adamm"}},
            r"\[train\] optimizer: unknown value 'adamm'; expected one of: adam",
        ),
        (
            {"train": {"gradient": "truncated"}},
            r"gradient = 'truncated' needs window >= 1, got window = 0",
        ),
        ({"train": {"optimizer": "lbfgs", "estimator": "score"}}, r"lbfgs"),
        ({"logging": {"tensorboard": "yes"}}, r"\[logging\] tensorboard must be a bool, got 'yes'"),
        ({"task": {"t_f": 0.0}}, r"t_f must be > 0, got 0"),
        ({"task": {"t_f": -1.0}}, r"t_f must be > 0, got -1"),
        ({"task": {"n_steps": 0}}, r"n_steps must be >= 1, got 0"),
        (
            {"task": {"stiffness": 2.0}},
            r"unknown key 'stiffness' in \[task\] for name = 'trap_drag'; expected one of: .*k, kT",
        ),
        (
            {"task": {"name": "trap_dragg"}},
            r"\[task\] name: unknown value 'trap_dragg'; expected one of: .*trap_drag",
        ),
        (
            {"protocol": {"kind": "splin"}},
            r"\[protocol\] kind: unknown value 'splin'; expected one of: .*spline",
        ),
        ({"protocol": {"degre": 3}}, r"unknown key 'degre' in \[protocol\] for kind = 'chebyshev'"),
        (
            {"protocol": {"low": 3.0, "high": 3.0}},
            r"bounds need low < high, got low = \[3.0\], high = \[3.0\]",
        ),
        ({"protocol": {"low": 5.0, "high": 1.0}}, r"bounds need low < high"),
        ({"protocol": {"t_final": 2.0}}, r"t_final = 2.0 differs from task 'trap_drag'"),
        ({"protocol": {"init": [0.0, 500.0]}}, r"outside the bounds"),
        ({"experiment": {"seed": -1}}, r"\[experiment\] seed must be >= 0, got -1"),
    ],
)
def test_bad_values_raise_config_errors_naming_key_and_value(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_config(_raw(**changes))


def test_missing_and_unknown_sections(tmp_path: Path) -> None:
    raw = _raw()
    del raw["train"]
    with pytest.raises(ConfigError, match=r"missing section\(s\) \[train\]"):
        resolve_config(raw)
    with pytest.raises(ConfigError, match=r"unknown section \[optim\]"):
        resolve_config(_raw(optim={"lr": 1.0}))
    raw = _raw()
    del raw["experiment"]["name"]
    with pytest.raises(ConfigError, match=r"\[experiment\] is missing the required key 'name'"):
        resolve_config(raw)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(_write(tmp_path, "[experiment\nname = 1"))


def test_build_protocol_starts_from_init(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, MINIMAL), ["protocol.init=[0.0, 5.0]"])
    task = build_task(cfg)
    protocol = build_protocol(cfg, task)
    assert task.exact_metric(protocol) == pytest.approx(task.linear_work(), rel=1e-3)
