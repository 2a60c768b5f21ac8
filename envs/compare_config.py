"""The experiment file of ``controlmd compare``: its keys, defaults and checks (every
method's settings are built once when the file is read, before any job runs)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from controlmd.config import apply_overrides, read_toml, resolve_config
from controlmd.errors import ConfigError, ControlMDError
from controlmd.tasks.base import Task
from controlmd_envs.baselines import (
    ALGOS,
    ENV_KEYS,
    VEC_ENVS,
)
from controlmd_envs.control_env import OBSERVATIONS, default_control_interval

__all__ = [
    "COMPARE_KEYS",
    "ENV_DEFAULTS",
    "GRADIENT_DEFAULTS",
    "SB3_DEFAULTS",
    "SEARCH_KEYS",
    "Config",
    "load_compare_config",
    "resolve_compare_config",
]

Config = dict[str, Any]

COMPARE_KEYS: dict[str, tuple[type, Any, str]] = {
    "methods": (list, list(ALGOS), "methods to run (section names)"),
    "seeds": (int, 3, "runs per method (seeds experiment.seed + j)"),
    "budget_md_steps": (
        int,
        1_000_000,
        "training forward replica-steps per run (evaluations are not charged)",
    ),
    "control_interval": (
        int,
        0,
        "MD steps per piece / action (0: smallest divisor giving <= 20 pieces)",
    ),
    "eval_replicas": (int, 128, "held-out replicas of each learning-curve evaluation"),
    "final_replicas": (int, 1024, "other held-out replicas of the final evaluation"),
    "evals_per_decade": (int, 2, "learning-curve thresholds per decade of training MD steps"),
    "eval_chunk": (int, 1024, "replicas simulated at once during evaluations"),
    "wall_cap_s": (float, 1800.0, "wall-time cap of each run (s)"),
}
_REMOVED_KEYS = {
    "eval_points": "evaluations are at log-spaced thresholds of training MD steps "
    "(evals_per_decade, default 2)",
    "target_progress": "the sample efficiency is defined at 90% of each baseline's own gain",
}
_MINIMUM = {
    "seeds": 1,
    "budget_md_steps": 1,
    "control_interval": 0,
    "eval_replicas": 2,
    "final_replicas": 2,
    "evals_per_decade": 1,
    "eval_chunk": 1,
}

GRADIENT_DEFAULTS: dict[str, Any] = {
    "optimizer": "adam",
    "lr": 0.05,
    "replicas": 64,
    "variance_every": 0,
}
SEARCH_KEYS: dict[str, dict[str, tuple[type, Any]]] = {
    "cma_es": {"replicas": (int, 32), "sigma0": (float, 0.3), "popsize": (int, 0)},
    "random_search": {"replicas": (int, 32), "batch": (int, 8)},
}
ENV_DEFAULTS: dict[str, Any] = {
    "n_envs": 32,
    "vec_env": "batched",
    "observation": "time",
    "shaping": 0.0,
    "shaping_gamma": 1.0,
    "reward_scale": 1.0,
    "feature_scale": 1.0,
}
SB3_DEFAULTS: dict[str, dict[str, Any]] = {"ppo": {"gamma": 1.0}, "sac": {"gamma": 1.0}}
_SB3_RESERVED = (
    "policy",
    "env",
    "seed",
    "device",
    "verbose",
    "tensorboard_log",
    "_init_setup_model",
)


def load_compare_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read and validate a comparison experiment file.

    :param overrides: ``section.key=value`` strings (value parsed as TOML, else a string).
    :raises ConfigError: naming the file, section, key and value at fault.
    """
    path = Path(path)
    raw = apply_overrides(read_toml(path), overrides, sections=None)
    try:
        return resolve_compare_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def resolve_compare_config(raw: dict[str, Any]) -> Config:
    """Validate a comparison config dict and fill in the defaults (see the module docstring)."""
    for section in ("experiment", "task"):
        if not isinstance(raw.get(section), dict):
            raise ConfigError(f"missing section [{section}]")
    compare = _resolve_compare(raw.get("compare", {}))
    methods = compare["methods"]
    known = {"experiment", "task", "compare", *methods}
    for section in raw:
        if section not in known:
            raise ConfigError(
                f"unknown section [{section}]; expected experiment, task, compare or a method of "
                f"[compare] methods ({', '.join(methods)})"
            )

    # The trainer's resolver checks [experiment], [task] (names, keys, values) and [train].
    def trainer_config(train: dict[str, Any]) -> Config:
        return resolve_config(
            {
                "experiment": raw["experiment"],
                "task": raw["task"],
                "protocol": {"kind": "piecewise_constant", "n_pieces": 1},
                "train": {**GRADIENT_DEFAULTS, **train},
            }
        )

    base = trainer_config({})
    from controlmd.config import build_task

    task = build_task(base)
    interval = compare["control_interval"] or default_control_interval(task.n_steps)
    if task.n_steps % interval:
        raise ConfigError(
            f"[compare] control_interval = {interval} must divide the task's n_steps = {task.n_steps}"
        )
    compare["control_interval"] = interval
    cfg: Config = {
        "experiment": base["experiment"],
        "task": base["task"],
        "compare": compare,
        "methods": {},
    }
    for method in methods:
        algo = _algo(raw, method)
        values = {k: v for k, v in raw.get(method, {}).items() if k != "algo"}
        if algo == "gradient":
            try:
                values = trainer_config(values)["train"]
            except ConfigError as exc:
                raise ConfigError(f"[{method}] (trainer settings): {exc}") from None
        elif algo in SEARCH_KEYS:
            values = _resolve_simple(method, values, SEARCH_KEYS[algo])
        else:
            values = _resolve_sb3(method, algo, values)
        cfg["methods"][method] = {"algo": algo, **values}
    n_pieces = task.n_steps // interval
    cfg["compare"]["n_pieces"] = n_pieces
    for method, spec in cfg["methods"].items():
        _check_builds(method, spec, task, n_pieces=n_pieces, interval=interval)
    return cfg


def _check_builds(
    method: str, spec: dict[str, Any], task: Task, *, n_pieces: int, interval: int
) -> None:
    """Build the method's optimizer once (no simulation), so that a hyperparameter its
    library refuses is a :class:`ConfigError` when the file is read, before any job runs."""
    algo = spec["algo"]
    settings = {k: v for k, v in spec.items() if k != "algo"}
    try:
        if algo == "gradient":
            from controlmd.search import actions_to_protocol
            from controlmd.trainer import Trainer

            start = actions_to_protocol(np.zeros((n_pieces, task.controls.dim)), task)
            Trainer.from_config({"experiment": {"seed": 0}, "train": settings}, task, start)
        elif algo in SEARCH_KEYS:
            from controlmd.search import CMAES, RandomSearch

            if algo == "cma_es":
                CMAES(
                    task,
                    n_pieces=n_pieces,
                    replicas=settings["replicas"],
                    sigma0=settings["sigma0"],
                    popsize=settings["popsize"] or None,
                )
            else:
                RandomSearch(
                    task, n_pieces=n_pieces, replicas=settings["replicas"], batch=settings["batch"]
                )
        else:
            from stable_baselines3 import PPO, SAC

            from controlmd_envs.vec_env import BatchedControlVecEnv

            env = settings["env"]
            venv = BatchedControlVecEnv(
                task,
                env["n_envs"],
                control_interval=interval,
                observation=env["observation"],
                shaping=env["shaping"],
                shaping_gamma=env["shaping_gamma"],
                reward_scale=env["reward_scale"],
                feature_scale=env["feature_scale"],
                seed=0,
            )
            cls = {"ppo": PPO, "sac": SAC}[algo]
            params = dict(settings["params"])
            if algo == "sac":  # the replay buffer's size is checked by SB3 without allocating it
                params["buffer_size"] = min(params.get("buffer_size", 1_000_000), 1_000)
            cls("MlpPolicy", venv, device="cpu", verbose=0, **params)
    except ConfigError as exc:
        raise ConfigError(f"[{method}] {exc}") from None
    except (ControlMDError, TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"[{method}] (algo = {algo!r}): {type(exc).__name__}: {exc}") from None


def _algo(raw: dict[str, Any], method: str) -> str:
    section = raw.get(method, {})
    if not isinstance(section, dict):
        raise ConfigError(f"[{method}] must be a table, got {section!r}")
    algo = section.get("algo", method)
    if algo not in ALGOS:
        raise ConfigError(
            f"[{method}] algo: unknown value {algo!r}; expected one of: {', '.join(ALGOS)} "
            "(a method named otherwise needs an algo key)"
        )
    return algo


def _resolve_compare(values: Any) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ConfigError(f"[compare] must be a table, got {values!r}")
    out: dict[str, Any] = {}
    for key in values:
        if key in _REMOVED_KEYS:
            raise ConfigError(f"[compare] {key} was removed: {_REMOVED_KEYS[key]}")
        if key not in COMPARE_KEYS:
            raise ConfigError(
                f"unknown key {key!r} in [compare]; expected one of: {', '.join(COMPARE_KEYS)}"
            )
    for key, (kind, default, _) in COMPARE_KEYS.items():
        value = values.get(key, default)
        out[key] = _check_type(f"[compare] {key}", value, kind)
        if key in _MINIMUM and out[key] < _MINIMUM[key]:
            raise ConfigError(f"[compare] {key} must be >= {_MINIMUM[key]}, got {out[key]}")
    methods = out["methods"]
    if (
        not methods
        or not all(isinstance(m, str) for m in methods)
        or len(set(methods)) != len(methods)
    ):
        raise ConfigError(
            f"[compare] methods must be a non-empty list of distinct names, got {methods!r}"
        )
    if not out["wall_cap_s"] > 0:
        raise ConfigError(f"[compare] wall_cap_s must be > 0, got {out['wall_cap_s']}")
    return out


def _check_type(where: str, value: Any, kind: type) -> Any:
    if kind is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{where} must be a {kind.__name__}, got {value!r}")
    return value


def _resolve_simple(
    method: str, values: dict[str, Any], spec: dict[str, tuple[type, Any]]
) -> dict[str, Any]:
    for key in values:
        if key not in spec:
            raise ConfigError(
                f"unknown key {key!r} in [{method}]; expected one of: algo, {', '.join(spec)}"
            )
    out = {
        key: _check_type(f"[{method}] {key}", values.get(key, default), kind)
        for key, (kind, default) in spec.items()
    }
    for key, value in out.items():
        if (key != "popsize" and value <= 0) or value < 0:
            raise ConfigError(f"[{method}] {key} must be > 0, got {value}")
    return out


def _resolve_sb3(method: str, algo: str, values: dict[str, Any]) -> dict[str, Any]:
    from stable_baselines3 import PPO, SAC

    cls = {"ppo": PPO, "sac": SAC}[algo]
    accepted = [n for n in inspect.signature(cls).parameters if n not in ("self", *_SB3_RESERVED)]
    env = dict(ENV_DEFAULTS)
    params = dict(SB3_DEFAULTS[algo])
    for key, value in values.items():
        if key in ENV_KEYS:
            env[key] = value
        elif key in accepted:
            params[key] = value
        else:
            raise ConfigError(
                f"unknown key {key!r} in [{method}] (algo = {algo!r}); expected algo, env keys "
                f"({', '.join(ENV_KEYS)}) or {cls.__name__} arguments ({', '.join(accepted)})"
            )
    if env["observation"] not in OBSERVATIONS:
        raise ConfigError(
            f"[{method}] observation: unknown value {env['observation']!r}; expected one of: {', '.join(OBSERVATIONS)}"
        )
    if env["vec_env"] not in VEC_ENVS:
        raise ConfigError(
            f"[{method}] vec_env: unknown value {env['vec_env']!r}; expected one of: {', '.join(VEC_ENVS)}"
        )
    env["n_envs"] = _check_type(f"[{method}] n_envs", env["n_envs"], int)
    if env["n_envs"] < 1:
        raise ConfigError(f"[{method}] n_envs must be >= 1, got {env['n_envs']}")
    for key in ("shaping", "shaping_gamma", "reward_scale"):
        env[key] = _check_type(f"[{method}] {key}", env[key], float)
    return {"env": env, "params": params}
