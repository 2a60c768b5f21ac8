"""Experiment files: one TOML schema shared by every task.

::

    [experiment]            name (required), seed = 0, notes = "",
                            rng = "mt19937" | "philox" (per-replica noise streams)
    [task]                  name (required) + the task's constructor arguments
    [protocol]              kind (required) + the protocol's constructor arguments, and
                            init (initial u(t): a number or values at equally spaced knots)
    [train]                 optimizer, lr, iterations, replicas, gradient, window, clip,
                            estimator, lr_schedule, ... (see TRAIN_KEYS)
    [eval]                  replicas, every, final_replicas, seeds (optional section)
    [logging]               tensorboard, plots, checkpoint_every, histogram_every,
                            progress (optional section)

Unknown sections and keys, wrong types and invalid values raise :class:`ConfigError`
naming the section, key and value. ``[task]`` and ``[protocol]`` keys are checked against
the constructor of the named task / protocol kind, and the objects are built once so that
their own checks run before anything is written. ``protocol.dim``, ``t_final``, ``low``
and ``high`` default to the task's control channels and horizon.

Overrides ``section.key=value`` (the CLI's ``--set``) parse ``value`` as a TOML value
(``0.01``, ``true``, ``[64, 64]``, ``"adam"``), falling back to a bare string (``adam``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlmd import tomlfile
from controlmd.errors import ConfigError, ControlMDError
from controlmd.estimators import ESTIMATORS as _ESTIMATOR_CLASSES
from controlmd.files import atomic_write_text
from controlmd.protocols import Protocol, make_protocol, protocol_class, protocol_names
from controlmd.rng import RNG_KINDS
from controlmd.tasks import Task, task_class, task_names
from controlmd.tomlfile import check_run_name, dumps, read_toml
from controlmd.trainer import LR_SCHEDULES, OPTIMIZERS, SIMULATION_GRADIENTS, build_estimator

__all__ = [
    "EVAL_KEYS",
    "EXPERIMENT_KEYS",
    "LOGGING_KEYS",
    "TRAIN_KEYS",
    "Field",
    "at_least",
    "build_protocol",
    "build_task",
    "config_to_toml",
    "in_range",
    "load_config",
    "load_file",
    "non_negative",
    "parse_override",
    "positive",
    "resolve_config",
    "resolve_fixed",
    "resolve_sections",
    "resolve_task_section",
    "write_config",
]

Config = dict[str, dict[str, Any]]

GRADIENTS = SIMULATION_GRADIENTS
ESTIMATORS = tuple(_ESTIMATOR_CLASSES)
_UNSET = object()


@dataclass(frozen=True)
class Field:
    """One key of a fixed section: its type, default and allowed values."""

    type: type | tuple[type, ...]
    default: Any = _UNSET
    check: Callable[[Any], str | None] | None = None
    choices: tuple[str, ...] | None = None
    doc: str = ""


def _problem(check: Callable[[Any], Any], value: Any) -> str | None:
    try:
        check(value)
    except ConfigError:
        return "must be a plain file name (letters, digits, '.', '_', '+', '-'; no path separators)"
    return None


def positive(v: Any) -> str | None:
    """A :class:`Field` check: the value must be > 0."""
    return None if v > 0 else "must be > 0"


def non_negative(v: Any) -> str | None:
    """A :class:`Field` check: the value must be >= 0."""
    return None if v >= 0 else "must be >= 0"


def at_least(n: float) -> Callable[[Any], str | None]:
    """A :class:`Field` check: the value must be >= ``n``."""
    return lambda v: None if v >= n else f"must be >= {n}"


def _non_negative_numbers(v: Any) -> str | None:
    ok = all(isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in v)
    return None if ok else "must be a list of numbers >= 0"


def in_range(low: float, high: float, *, closed_low: bool = False) -> Callable[[Any], str | None]:
    """A :class:`Field` check: ``low < v <= high`` (``low <= v`` with ``closed_low``)."""
    left = "[" if closed_low else "("

    def check(v: Any) -> str | None:
        ok = (low <= v if closed_low else low < v) and v <= high
        return None if ok else f"must be in {left}{low}, {high}]"

    return check


EXPERIMENT_KEYS: dict[str, Field] = {
    "name": Field(
        str,
        check=lambda v: _problem(check_run_name, v),
        doc="experiment name; runs go to runs/<name>/",
    ),
    "seed": Field(
        int, 0, non_negative, doc="seed of protocol init, training and evaluation streams"
    ),
    "notes": Field(str, "", doc="free text"),
    "rng": Field(
        str,
        "mt19937",
        choices=RNG_KINDS,
        doc="per-replica noise streams (controlmd.rng): 'mt19937' (one generator per replica, "
        "the default and what runs without the key used) or 'philox' (counter-based, batched)",
    ),
    "fused_steps": Field(
        int,
        0,
        non_negative,
        doc="steps per compiled call of controlmd.dynamics.FusedSteps for the tasks' "
        "Brownian / Langevin particle dynamics (0: the engine's simulate; needs rng = 'philox')",
    ),
}

TRAIN_KEYS: dict[str, Field] = {
    "optimizer": Field(str, "adam", choices=OPTIMIZERS),
    "lr": Field(float, 1e-2, positive, doc="learning rate"),
    "iterations": Field(int, 100, non_negative, doc="optimizer iterations"),
    "replicas": Field(int, 256, at_least(1), doc="replicas per training rollout"),
    "gradient": Field(str, "direct", choices=GRADIENTS, doc="gradient path through the simulation"),
    "window": Field(int, 0, non_negative, doc="steps per checkpoint/truncation window (0: none)"),
    "clip": Field(float, 0.0, non_negative, doc="max gradient norm (0: no clipping)"),
    "estimator": Field(str, "pathwise", choices=ESTIMATORS),
    "chunk": Field(
        int, 0, non_negative, doc="replicas simulated at once by the estimator (0: all)"
    ),
    "windows": Field(int, 1, at_least(1), doc="windows of estimator = 'multiwindow' or 'mixed'"),
    "window_weights": Field(
        list,
        [],
        _non_negative_numbers,
        doc="one weight >= 0 per window of estimator = 'multiwindow' ([]: all 1)",
    ),
    "lr_schedule": Field(str, "constant", choices=LR_SCHEDULES),
    "lr_min": Field(float, 0.0, non_negative, doc="final lr of the cosine schedule"),
    "lr_gamma": Field(
        float, 0.5, positive, doc="decay factor (exponential: per iteration; step: per lr_step)"
    ),
    "lr_step": Field(int, 100, at_least(1), doc="iterations between decays of the step schedule"),
    "momentum": Field(float, 0.0, non_negative, doc="sgd/rmsprop momentum"),
    "weight_decay": Field(float, 0.0, non_negative),
    "lbfgs_max_iter": Field(int, 20, at_least(1), doc="L-BFGS iterations per training iteration"),
    "frozen_noise": Field(bool, False, doc="use the same training noise every iteration"),
    "grad_groups": Field(int, 8, at_least(2), doc="replica groups for the gradient variance"),
    "variance_every": Field(
        int, 10, non_negative, doc="iterations between gradient-variance estimates (0: never)"
    ),
}

EVAL_KEYS: dict[str, Field] = {
    "replicas": Field(int, 1000, at_least(1), doc="replicas of the periodic held-out evaluation"),
    "every": Field(
        int, 0, non_negative, doc="iterations between evaluations (0: only before/after)"
    ),
    "final_replicas": Field(
        int, 10_000, at_least(1), doc="fresh replicas scoring the initial and final protocol"
    ),
    "chunk": Field(int, 10_000, at_least(1), doc="replicas simulated at once during evaluation"),
}

LOGGING_KEYS: dict[str, Field] = {
    "tensorboard": Field(bool, True),
    "plots": Field(bool, True),
    "checkpoint_every": Field(
        int, 10, non_negative, doc="iterations between checkpoints (0: only at the end)"
    ),
    "histogram_every": Field(
        int, 10, non_negative, doc="iterations between parameter/gradient histograms (0: never)"
    ),
    "progress": Field(bool, True, doc="tqdm progress bar"),
}

FIXED_SECTIONS: dict[str, dict[str, Field]] = {
    "experiment": EXPERIMENT_KEYS,
    "train": TRAIN_KEYS,
    "eval": EVAL_KEYS,
    "logging": LOGGING_KEYS,
}
REQUIRED_SECTIONS = ("experiment", "task", "protocol", "train")
SECTIONS = ("experiment", "task", "protocol", "train", "eval", "logging")


def load_config(
    path: str | Path,
    overrides: Iterable[str] = (),
    *,
    seed: int | None = None,
    name: str | Path | None = None,
) -> Config:
    """Read, override and validate an experiment file; returns the resolved config.

    :param path: the TOML file.
    :param overrides: ``"section.key=value"`` strings applied in order.
    :param seed: if given, replaces ``experiment.seed``.
    :param name: the file named in errors (default ``path``; the CLI reads a copy of the
        user's file from the run folder and names the user's file).
    :raises ConfigError: naming the file, section, key and value at fault.
    """
    return load_file(path, resolve_config, overrides, sections=SECTIONS, seed=seed, name=name)


def apply_overrides(
    raw: dict[str, Any], overrides: Iterable[str], *, sections: Iterable[str] | None = SECTIONS
) -> dict[str, Any]:
    """Apply ``"section.key=value"`` overrides to ``raw`` in place (and return it); see
    :func:`controlmd.tomlfile.apply_overrides` (here the sections default to the trainer's)."""
    return tomlfile.apply_overrides(raw, overrides, sections=sections)


def parse_override(item: str, *, sections: Iterable[str] | None = SECTIONS) -> tuple[str, str, Any]:
    """``"train.lr=0.01"`` -> ``("train", "lr", 0.01)``; see
    :func:`controlmd.tomlfile.parse_override` (here the sections default to the trainer's)."""
    return tomlfile.parse_override(item, sections=sections)


def load_file(
    path: str | Path,
    resolve: Callable[[dict[str, Any]], Config],
    overrides: Iterable[str] = (),
    *,
    sections: Iterable[str] | None = SECTIONS,
    seed: int | None = None,
    name: str | Path | None = None,
) -> Config:
    """The one path from a TOML file to a resolved config, shared by every command: read
    the file, apply ``--set`` overrides (and ``--seed``), resolve with ``resolve``; any
    error names the file.

    :param resolve: the command's schema (e.g. :func:`resolve_config`).
    :param sections: sections an override may name (``None``: any).
    :param name: the file named in errors (default ``path``).
    """
    path = Path(path)
    raw = apply_overrides(read_toml(path), overrides, sections=sections)
    if seed is not None:
        raw.setdefault("experiment", {})["seed"] = seed
    try:
        return resolve(raw)
    except ConfigError as exc:
        raise ConfigError(f"{name if name is not None else path}: {exc}") from None


def resolve_sections(
    raw: dict[str, Any],
    fixed: dict[str, dict[str, Field]],
    *,
    required: Iterable[str],
    open_sections: Iterable[str] = (),
) -> Config:
    """Check the section names of ``raw`` and resolve its fixed sections.

    :param fixed: section -> its keys (:class:`Field`); absent optional sections get their
        defaults.
    :param required: sections that must be present.
    :param open_sections: sections whose keys the caller checks (``[task]``, ``[protocol]``).
    :return: the resolved fixed sections (the open ones are left to the caller).
    :raises ConfigError: an unknown or missing section, or a bad key or value.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"a config is a table of sections, got {type(raw).__name__}")
    known = [*fixed, *open_sections]
    for section in raw:
        if section not in known:
            raise ConfigError(f"unknown section [{section}]; expected: {', '.join(known)}")
        if not isinstance(raw[section], dict):
            raise ConfigError(f"[{section}] must be a table, got {_show(raw[section])}")
    missing = [s for s in required if s not in raw]
    if missing:
        raise ConfigError(f"missing section(s) {', '.join(f'[{s}]' for s in missing)}")
    return {
        section: resolve_fixed(section, raw.get(section, {}), keys)
        for section, keys in fixed.items()
    }


def resolve_config(raw: dict[str, Any]) -> Config:
    """Validate a config dict and fill in defaults (see the module docstring).

    Builds the task and the protocol once, so that their constructors' checks run too.
    """
    cfg = resolve_sections(
        raw, FIXED_SECTIONS, required=REQUIRED_SECTIONS, open_sections=("task", "protocol")
    )
    experiment, train = cfg["experiment"], cfg["train"]
    if experiment["fused_steps"] and experiment["rng"] != "philox":
        raise ConfigError(
            f"[experiment] fused_steps = {experiment['fused_steps']} draws its noise from "
            f"philox streams: set rng = 'philox' (got rng = {experiment['rng']!r})"
        )
    if train["gradient"] in ("checkpoint", "truncated") and train["window"] < 1:
        raise ConfigError(
            f"[train] gradient = {train['gradient']!r} needs window >= 1, got window = {train['window']}"
        )
    try:
        build_estimator(
            train["estimator"],
            chunk=train["chunk"],
            windows=train["windows"],
            window_weights=train["window_weights"] or None,
            gradient=train["gradient"],
            optimizer=train["optimizer"],
        )
    except ControlMDError as exc:
        raise ConfigError(f"[train] {exc}") from None
    cfg["task"] = resolve_task_section(raw["task"])
    task = build_task(cfg)
    cfg["protocol"] = _protocol_section(raw["protocol"], task)
    build_protocol(cfg, task)
    return cfg


def resolve_task_section(values: dict[str, Any]) -> dict[str, Any]:
    """``[task]``: ``name`` (registered, ``module:Class`` or a plugin) and the keys of its
    constructor."""
    return _resolve_open("task", values, "name", task_names(), _task_constructor)


def resolve_fixed(section: str, values: dict[str, Any], fields: dict[str, Field]) -> dict[str, Any]:
    """Check the keys and values of a fixed section and fill in the defaults."""
    out: dict[str, Any] = {}
    for key in values:
        if key not in fields:
            raise ConfigError(
                f"unknown key {key!r} in [{section}]; expected one of: {', '.join(fields)}"
            )
    for key, spec in fields.items():
        if key not in values:
            if spec.default is _UNSET:
                raise ConfigError(f"[{section}] is missing the required key {key!r}")
            out[key] = spec.default
            continue
        out[key] = _check_value(section, key, values[key], spec)
    return out


def _check_value(section: str, key: str, value: Any, spec: Field) -> Any:
    where = f"[{section}] {key}"
    if spec.type is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {_show(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be finite, got {value}")
    elif spec.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {_show(value)}")
    elif not isinstance(value, spec.type) or (spec.type is not bool and isinstance(value, bool)):
        name = (
            spec.type.__name__
            if isinstance(spec.type, type)
            else "/".join(t.__name__ for t in spec.type)
        )
        raise ConfigError(f"{where} must be a {name}, got {_show(value)}")
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(
            f"{where}: unknown value {value!r}; expected one of: {', '.join(spec.choices)}"
        )
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            raise ConfigError(f"{where} {problem}, got {value!r}")
    return value


def _task_constructor(name: str) -> Callable[..., Any]:
    try:
        return task_class(name)
    except ControlMDError as exc:
        raise ConfigError(f"[task] name: {exc}") from None


def _resolve_open(
    section: str,
    values: dict[str, Any],
    name_key: str,
    names: list[str],
    constructor: Callable[[str], Callable[..., Any]],
    extra_keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    if name_key not in values:
        raise ConfigError(
            f"[{section}] is missing the required key {name_key!r}; expected one of: {', '.join(names)}"
        )
    name = values[name_key]
    plugin = isinstance(name, str) and ":" in name  # module:Class, resolved by the constructor
    if not isinstance(name, str) or (name not in names and not plugin):
        raise ConfigError(
            f"[{section}] {name_key}: unknown value {name!r}; expected one of: {', '.join(names)}"
        )
    accepted = _accepted_keys(constructor(name))
    for key in values:
        if key == name_key or key in extra_keys:
            continue
        if accepted is not None and key not in accepted:
            raise ConfigError(
                f"unknown key {key!r} in [{section}] for {name_key} = {name!r}; expected one of: "
                f"{', '.join(sorted(accepted)) or '(none)'}"
            )
    return dict(values)


def _accepted_keys(fn: Callable[..., Any]) -> set[str] | None:
    """Keyword arguments ``fn`` accepts, following ``**kwargs`` up the class hierarchy."""
    keys: set[str] = set()
    classes = fn.__mro__ if isinstance(fn, type) else (fn,)
    for cls in classes:
        init = cls.__dict__.get("__init__") if isinstance(fn, type) else cls
        if init is None:
            continue
        params = inspect.signature(init).parameters
        if not cls.__name__.startswith("_"):  # private bases get their arguments from subclasses
            keys |= {
                n
                for n, p in params.items()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n != "self"
            }
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return keys
        if cls is Protocol:
            return keys
    return None


def build_task(cfg: Config) -> Task:
    """The task named in ``[task]``, built with the section's other keys."""
    params = {k: v for k, v in cfg["task"].items() if k != "name"}
    try:
        return _task_constructor(cfg["task"]["name"])(**params)
    except (ControlMDError, TypeError, ValueError) as exc:
        raise ConfigError(f"[task] name = {cfg['task']['name']!r}: {exc}") from None


def _protocol_section(values: dict[str, Any], task: Task) -> dict[str, Any]:
    section = _resolve_open(
        "protocol", values, "kind", protocol_names(), protocol_class, extra_keys=("init",)
    )
    cls = protocol_class(section["kind"])
    accepted = _accepted_keys(cls) or set()
    low, high = task.controls.low, task.controls.high
    defaults: dict[str, Any] = {"dim": task.controls.dim, "t_final": task.horizon}
    if "low" in accepted and len(low) > 0:
        defaults["low"] = list(low) if len(low) > 1 else low[0]
        defaults["high"] = list(high) if len(high) > 1 else high[0]
    _check_release_keys(section)
    fraction = section.get("release_fraction", 0.0)
    if fraction > 0 and "release_value" not in section and task.controls.dim > 0:
        value = task.default_control()
        if value is None:
            raise ConfigError(
                f"[protocol] release_fraction = {fraction!r}: task {task.name!r} has no "
                "no-control value (default_control); give release_value"
            )
        defaults["release_value"] = [float(v) for v in value]
    if "obs_dim" in accepted and "obs_dim" not in section:
        n_obs = task.observe(task.initial_state(1, 0)).shape[1]
        if n_obs == 0:
            raise ConfigError(
                f"[protocol] kind = {section['kind']!r} needs observations, but task {task.name!r} has none"
            )
        defaults["obs_dim"] = n_obs
    return {
        "kind": section["kind"],
        **{k: v for k, v in defaults.items() if k in accepted},
        **section,
    }


def _check_release_keys(section: dict[str, Any]) -> None:
    """``[protocol] release_fraction`` in ``[0, 0.5)`` and ``field_cost_weight >= 0``."""
    checks = {
        "release_fraction": (
            lambda v: 0.0 <= v < 0.5,
            "must be in [0, 0.5) (a fraction of the horizon, before its second half)",
        ),
        "field_cost_weight": (lambda v: v >= 0.0, "must be >= 0"),
    }
    for key, (ok, rule) in checks.items():
        if key not in section:
            continue
        value = section[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"[protocol] {key} must be a number, got {_show(value)}")
        if not (math.isfinite(value) and ok(value)):
            raise ConfigError(f"[protocol] {key} {rule}, got {value!r}")


def build_protocol(cfg: Config, task: Task | None = None) -> Protocol:
    """The protocol of ``[protocol]`` (fitted to ``init`` when given)."""
    params = dict(cfg["protocol"])
    kind = params.pop("kind")
    try:
        protocol = make_protocol(kind, **params)
    except (ControlMDError, TypeError, ValueError) as exc:
        raise ConfigError(f"[protocol] kind = {kind!r}: {exc}") from None
    if task is not None:
        try:
            task.check_protocol(protocol)
        except ControlMDError as exc:
            raise ConfigError(f"[protocol] {exc}") from None
    return protocol


def config_to_toml(cfg: Config) -> str:
    """The resolved config as TOML text (``None`` values are left out: TOML has no null)."""
    return dumps(cfg)


def write_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (atomically)."""
    atomic_write_text(path, config_to_toml(cfg))


def read_run_config(run_dir: str | Path) -> Config:
    """The resolved config of a run directory, re-validated."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: it has no config.toml")
    return load_config(path)


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"
