"""Equal-budget comparison of gradient-designed protocols with RL and derivative-free baselines.

``controlmd compare EXPERIMENT.toml [--out DIR] [--address auto] [--local]`` runs every
method of ``[compare] methods`` for ``seeds`` seeds on one task, each under the same budget
of training forward MD replica-steps (evaluations are counted apart and not charged) and a
wall cap. Every (method, seed) run is an independent job (:func:`run_compare_job`) run by
:func:`controlmd.runner.run_folder_jobs`: a Ray task when Ray is installed (a local
instance, or the cluster at ``--address``), else one after another in this process;
results are the same either way. A job that fails is recorded (its traceback in
``<method>/seed<k>/error.txt``, its message in ``comparison.json`` ``jobs``) and the others
go on; ``controlmd compare --resume DIR`` re-runs the failed and unfinished jobs. Every
method's settings are checked when the file is read (its optimizer is built once), before
any job runs. It writes to ``DIR`` (default ``runs/<experiment>/<YYYYmmdd-HHMMSS>/``):

* ``comparison.json``: ``jobs`` (``method``, ``seed``, ``status`` done/failed,
  ``message``, ``traceback``), ``metric_name``, ``higher_is_better``, ``curves`` (per
  method and seed: ``md_steps`` (training), ``cpu_seconds`` (training, backward passes
  included), ``metric``, ``se`` on the common held-out replicas), ``sample_efficiency``
  (per baseline, :func:`sample_efficiency`), per method its runs and a summary.
* ``comparison.png``: metric against training MD steps (log x), mean ± SE over seeds,
  the start and the analytic optimum where the task knows it.
* ``comparison.md``: the markdown table.
* ``compare_config.json`` (the resolved config: the plan ``--resume`` reads),
  ``config.toml``, ``start.json`` (the common start's evaluations).
* ``<method>/seed<k>/``: the run folder of each run (``tb/`` TensorBoard events with the
  same tags for every method: ``eval/metric`` and the method's ``train/...`` at x =
  training MD replica-steps; ``progress.jsonl``, ``metrics.json``, ``protocol.pt`` /
  ``protocol.csv``, SB3's ``model.zip``; ``error.txt`` of a failed run); ``metrics.json``
  is written last and marks the run done. The comparison files are assembled from these
  folders (:func:`summarize_folder`) after the runs, also when some failed or were
  interrupted.

Experiment file::

    [experiment]   name, seed = 0, notes = ""
    [task]         name + the task's arguments (as for `controlmd run`)
    [compare]      methods, seeds, budget_md_steps, control_interval, eval_replicas,
                   final_replicas, evals_per_decade, eval_chunk, wall_cap_s
    [<method>]     one section per method (optional): ``algo`` (default: the method's
                   name; one of gradient, ppo, sac, cma_es, random_search) and its
                   settings: gradient -> the trainer's [train] keys; ppo / sac -> env keys
                   (n_envs, vec_env = "batched" | "subproc" | "dummy", observation, shaping,
                   shaping_gamma, reward_scale, feature_scale) and stable-baselines3
                   constructor arguments;
                   cma_es -> replicas, sigma0, popsize; random_search -> replicas, batch

Seeds: run ``j`` uses seed ``experiment.seed + j``; every method and run is evaluated on
the same held-out replicas (``experiment.seed + EVAL_SEED_OFFSET``, finally
``experiment.seed + FINAL_SEED_OFFSET``), so curves differ by the protocols only.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from controlmd.checkpoint import atomic_write_json, atomic_write_text
from controlmd.config import apply_overrides, read_toml, resolve_config, write_config
from controlmd.errors import ConfigError, ControlMDError
from controlmd.evaluation import Evaluation, evaluate
from controlmd.protocols import Protocol
from controlmd.rng import EVAL_SEED_OFFSET, FINAL_SEED_OFFSET
from controlmd.runner import (
    ERROR_FILE,
    Job,
    JobResult,
    new_output_dir,
    read_result,
    run_folder_jobs,
)
from controlmd.tasks.base import Task
from controlmd_envs.baselines import (
    ALGOS,
    ENV_KEYS,
    VEC_ENVS,
    BudgetTracker,
    run_gradient,
    run_logger,
    run_sb3,
    run_search,
)
from controlmd_envs.control_env import OBSERVATIONS, default_control_interval

__all__ = [
    "COMPARE_KEYS",
    "ComparisonRun",
    "efficiency_lines",
    "first_reach",
    "load_compare_config",
    "mean_curve",
    "run_compare_job",
    "run_comparison",
    "sample_efficiency",
    "summarize",
    "summarize_folder",
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
TARGET_FRACTION = 0.9
"""A baseline's score ``S_m``: the start plus this fraction of its own final gain."""
BOOTSTRAP_SAMPLES = 1000
"""Resamples of the seeds in the sample-efficiency confidence interval."""

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
_RUN_ONLY_KEYS = ("task", "metric_name", "settings")
"""Keys of a run's ``metrics.json`` that ``comparison.json`` keeps once, not per run."""
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


# ---------------------------------------------------------------------------------- running


PLAN_FILE = "compare_config.json"
RESULT_FILE = "metrics.json"


@dataclass
class ComparisonRun:
    """Outcome of :func:`run_comparison`: the folder, ``comparison.json`` (``None`` if the
    folder was never set up) and the ``<method>/seed<k>`` runs not done."""

    out_dir: Path
    result: dict[str, Any] | None
    failed: list[str] = field(default_factory=list)


def run_comparison(
    cfg: Config | None,
    *,
    out: str | Path | None = None,
    runs_root: str | Path = "runs",
    resume: str | Path | None = None,
    progress: bool = True,
    address: str | None = None,
    backend: str = "auto",
    num_cpus: int | None = None,
    cpus_per_job: int = 1,
) -> ComparisonRun:
    """Run (or resume) every (method, seed) run of a resolved comparison config.

    Each run is an independent job (:func:`run_compare_job`, through
    :func:`controlmd.runner.run_jobs`: a Ray task when Ray is installed, else in this
    process) writing ``<method>/seed<k>/``; ``comparison.json/.md/.png`` are then assembled
    from those folders (:func:`summarize_folder`), also when some runs failed.

    :param cfg: the config (:func:`load_compare_config`); with ``resume`` it may be ``None``
        and must otherwise equal the folder's ``compare_config.json``.
    :param out: the output folder (default ``runs_root/<experiment>/<YYYYmmdd-HHMMSS>/``);
        it must not exist or be empty.
    :param resume: a comparison folder: run only the runs without ``metrics.json`` (a killed
        run's folder is cleared and the run starts over; finished runs are not redone).
    :param address, backend, num_cpus, cpus_per_job: where the runs go
        (:func:`controlmd.runner.run_jobs`; ``address="auto"`` joins a running Ray cluster).
    :raises ConfigError: bad ``out`` / ``resume`` folder; :class:`ControlMDError`: a Ray
        address that cannot be reached. Nothing is written then.
    """
    if resume is not None:
        out_dir = Path(resume)
        saved = _read_plan(out_dir)
        if cfg is not None and _plain(cfg) != saved:
            raise ConfigError(
                f"--resume {out_dir}: the experiment and --set given differ from its {PLAN_FILE}; "
                f"resume with `controlmd compare --resume {out_dir}` alone"
            )
        cfg = saved
    elif cfg is None:
        raise ConfigError("give a comparison experiment file, or --resume DIR")
    else:
        cfg = _plain(cfg)  # fresh and resumed runs use the same (JSON round-tripped) config
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = new_output_dir(
            out, Path(runs_root) / cfg["experiment"]["name"] / stamp, plan_file=PLAN_FILE
        )
    comp = cfg["compare"]
    seed0 = cfg["experiment"]["seed"]
    runs = [(method, seed0 + j) for j in range(comp["seeds"]) for method in cfg["methods"]]
    say = (
        (lambda line: print(line, file=sys.stderr, flush=True))
        if progress
        else (lambda _line: None)
    )

    def describe(result: JobResult) -> str:
        r = result.value
        return (
            f"{r['metric_name']} = {r['final']['metric']:.6g} +- {r['final']['se']:.2g} after "
            f"{r['md_steps']:.3g} training MD steps (+{r['eval_md_steps']:.3g} evaluating), "
            f"{r['cpu_s']:.1f} CPU s, {r['wall_s']:.1f} s ({r['stop_reason']})"
        )

    def create() -> None:
        out_dir.mkdir(parents=True)
        write_config({k: cfg[k] for k in ("experiment", "task")}, out_dir / "config.toml")
        atomic_write_json(out_dir / PLAN_FILE, cfg)

    def prepare() -> None:
        _start_evaluations(cfg, out_dir)

    jobs = [Job(f"{m}/seed{s}", _compare_job, (str(out_dir.resolve()), cfg, m, s)) for m, s in runs]
    result: dict[str, Any] | None = None
    missing = [job.name for job in jobs]
    try:
        run = run_folder_jobs(
            out_dir,
            jobs,
            result_file=RESULT_FILE,
            describe=describe,
            say=say,
            what="comparison",
            create=create if resume is None else None,
            prepare=prepare,
            address=address,
            backend=backend,
            num_cpus=num_cpus,
            cpus_per_job=cpus_per_job,
        )
        missing = run.missing
    finally:  # also after Ctrl-C or when every run failed: record every job's state
        if (out_dir / PLAN_FILE).exists():
            result = summarize_folder(out_dir)
            missing = [
                f"{j['method']}/seed{j['seed']}" for j in result["jobs"] if j["status"] != "done"
            ]
    if missing and result is not None:
        # errors are printed even with --quiet (progress=False)
        for job in result["jobs"]:
            if job["status"] != "done":
                where = f" (traceback: {out_dir / job['traceback']})" if job["traceback"] else ""
                print(
                    f"{job['method']}/seed{job['seed']}: FAILED: {job['message']}{where}",
                    file=sys.stderr,
                )
        print(
            f"{len(missing)} of {len(runs)} runs failed or not done; re-run them with: "
            f"controlmd compare --resume {out_dir}",
            file=sys.stderr,
            flush=True,
        )
    return ComparisonRun(out_dir, result, missing)


def _compare_job(out_dir: str, cfg: Config, method: str, seed: int) -> dict[str, Any]:
    """A comparison folder's (method, seed) job: :func:`run_compare_job` from the folder's
    common start evaluation (``start.json``, written before any job runs)."""
    start = read_result(Path(out_dir), "start.json")
    if start is None:
        raise ControlMDError(f"{out_dir} has no start.json (the comparison was not set up)")
    return run_compare_job(
        cfg, method, seed, str(Path(out_dir) / method / f"seed{seed}"), start["initial"]
    )


def run_compare_job(
    cfg: Config, method: str, seed: int, run_dir: str, initial: dict[str, Any]
) -> dict[str, Any]:
    """One (method, seed) run of a comparison into ``run_dir``; returns its ``metrics.json``.

    A module-level function of picklable arguments (a Ray task). The result depends on
    ``cfg``, ``method`` and ``seed`` only: the global torch generator is seeded with
    ``seed`` first, and a folder left by a killed attempt (no ``metrics.json``) is cleared.

    :param initial: the common starting protocol's curve evaluation (fields of
        :class:`controlmd.evaluation.Evaluation`): the curve's first point (its replica-steps
        counted in the run's ``eval_md_steps``), not recomputed (RL
        policies are evaluated as they are).
    """
    import shutil

    import torch

    from controlmd.config import build_task

    path = Path(run_dir)
    done = read_result(path, RESULT_FILE)
    if done is not None:
        return done
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    torch.manual_seed(seed)
    task = build_task(cfg)
    comp = cfg["compare"]
    spec = cfg["methods"][method]
    seed0 = cfg["experiment"]["seed"]
    logger = run_logger(path)
    tracker = BudgetTracker(
        task,
        budget_md_steps=comp["budget_md_steps"],
        eval_replicas=comp["eval_replicas"],
        final_replicas=comp["final_replicas"],
        eval_seed=seed0 + EVAL_SEED_OFFSET,
        final_seed=seed0 + FINAL_SEED_OFFSET,
        wall_cap_s=comp["wall_cap_s"],
        chunk=comp["eval_chunk"],
        initial=None if spec["algo"] in ("ppo", "sac") else Evaluation(**initial),
        logger=logger,
        method=method,
        evals_per_decade=comp["evals_per_decade"],
    )
    final = _run_method(
        method,
        spec,
        task,
        tracker,
        n_pieces=comp["n_pieces"],
        interval=comp["control_interval"],
        seed=seed,
        run_dir=path,
    )
    tracker.finish(final)
    logger.close()
    record = _jsonable(
        {
            "method": method,
            "algo": spec["algo"],
            "seed": seed,
            **tracker.summary(),
            "exact_final": _exact_metric(task, final),
            "task": task.name,
            "metric_name": task.metric_name,
            "settings": spec,
        }
    )
    atomic_write_json(path / RESULT_FILE, record)  # last: marks the run done
    return record


def _plain(cfg: Config) -> Config:
    return json.loads(json.dumps(_jsonable(cfg)))


def _read_plan(out_dir: Path) -> Config:
    try:
        return json.loads((out_dir / PLAN_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{out_dir} is not a comparison folder: it has no {PLAN_FILE}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{out_dir}/{PLAN_FILE} is not valid JSON: {exc}") from None


def _start_evaluations(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """``start.json``: the common starting protocol on the curve- and final-evaluation
    replicas (deterministic; computed once per folder, read back on resume)."""
    from controlmd.config import build_task
    from controlmd.search import actions_to_protocol

    start = read_result(out_dir, "start.json")
    if start is not None and "initial" in start:
        return start
    task = build_task(cfg)
    comp = cfg["compare"]
    seed0 = cfg["experiment"]["seed"]
    protocol = actions_to_protocol(np.zeros((comp["n_pieces"], task.controls.dim)), task)
    initial = evaluate(
        task, protocol, comp["eval_replicas"], seed0 + EVAL_SEED_OFFSET, chunk=comp["eval_chunk"]
    )
    final = evaluate(
        task, protocol, comp["final_replicas"], seed0 + FINAL_SEED_OFFSET, chunk=comp["eval_chunk"]
    )
    start = {
        "m0": initial.mean,
        "m0_se": initial.se,
        "m0_final": final.mean,
        "m0_final_se": final.se,
        "m0_exact": _exact_metric(task, protocol),
        "initial": asdict(initial),
    }
    atomic_write_json(out_dir / "start.json", start)
    return start


def _write_outputs(out_dir: Path, result: dict[str, Any]) -> None:
    atomic_write_json(out_dir / "comparison.json", _jsonable(result))
    atomic_write_text(out_dir / "comparison.md", markdown_table(result))
    plot_comparison(result, out_dir / "comparison.png")


def summarize_folder(out_dir: str | Path) -> dict[str, Any]:
    """Assemble ``comparison.json/.md/.png`` of a comparison folder from its run folders
    (``<method>/seed<k>/metrics.json``; ``error.txt`` of a failed run), also when some
    or all runs failed or were interrupted."""
    from controlmd.config import build_task
    from controlmd.protocols import load_protocol

    out_dir = Path(out_dir)
    cfg = _read_plan(out_dir)
    task = build_task(cfg)
    comp = cfg["compare"]
    seeds = [cfg["experiment"]["seed"] + j for j in range(comp["seeds"])]
    runs: dict[str, list[dict[str, Any]]] = {}
    jobs: list[dict[str, Any]] = []
    for method in cfg["methods"]:
        runs[method] = []
        for seed in seeds:
            job_dir = out_dir / method / f"seed{seed}"
            record = read_result(job_dir, RESULT_FILE)
            if record is None:
                jobs.append(_failed_job(out_dir, method, seed))
                continue
            jobs.append({"method": method, "seed": seed, "status": "done", "message": ""})
            record = {k: v for k, v in record.items() if k not in _RUN_ONLY_KEYS}
            path = job_dir / "protocol.pt"
            if "exact_final" not in record and path.exists():
                record["exact_final"] = _exact_metric(task, load_protocol(path))
            runs[method].append(record)
    start = _start_evaluations(cfg, out_dir)
    result = summarize(
        cfg,
        task,
        runs,
        m0=start["m0"],
        m0_final=start["m0_final"],
        m0_exact=start.get("m0_exact"),
        jobs=jobs,
    )
    _write_outputs(out_dir, result)
    return result


def _failed_job(out_dir: Path, method: str, seed: int) -> dict[str, Any]:
    """A job without ``metrics.json``: its error (last line of ``error.txt``) or why none."""
    name = f"{method}/seed{seed}"
    error = out_dir / name / ERROR_FILE
    if error.is_file():
        lines = error.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        message = lines[-1] if lines else "failed"
        return {
            "method": method,
            "seed": seed,
            "status": "failed",
            "message": message,
            "traceback": f"{name}/{ERROR_FILE}",
        }
    return {
        "method": method,
        "seed": seed,
        "status": "failed",
        "message": "not finished (interrupted, killed, or not started)",
        "traceback": None,
    }


def _exact_metric(task: Task, final: Any) -> float | None:
    """The task's noise-free metric of an open-loop protocol, where the task has one
    (``exact_metric``, as the trainer uses it)."""
    if not isinstance(final, Protocol):
        return None
    value = task.exact_metric(final)
    return None if value is None else float(value)


def _run_method(
    method: str,
    spec: dict[str, Any],
    task: Task,
    tracker: BudgetTracker,
    *,
    n_pieces: int,
    interval: int,
    seed: int,
    run_dir: Path,
) -> Any:
    algo = spec["algo"]
    settings = {k: v for k, v in spec.items() if k != "algo"}
    try:
        if algo == "gradient":
            return run_gradient(
                task, tracker, train=settings, n_pieces=n_pieces, seed=seed, run_dir=run_dir
            )
        if algo in SEARCH_KEYS:
            return run_search(
                algo, task, tracker, params=settings, n_pieces=n_pieces, seed=seed, run_dir=run_dir
            )
        return run_sb3(
            algo,
            task,
            tracker,
            env=settings["env"],
            params=settings["params"],
            control_interval=interval,
            seed=seed,
            run_dir=run_dir,
            method=method,
        )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ControlMDError):
            raise
        raise ConfigError(f"[{method}] (algo = {algo!r}): {exc}") from exc


# ---------------------------------------------------------------------------------- summary

Curve = tuple[np.ndarray, np.ndarray]
"""A learning curve: training MD steps ``[n]`` (the first 0, the common start) and metric ``[n]``."""


def mean_curve(curves: list[Curve]) -> Curve:
    """Mean over seeds, point by point (evaluation ``j`` of every seed), up to the shortest."""
    n = min(len(x) for x, _ in curves)
    return (
        np.mean([np.asarray(x[:n], dtype=float) for x, _ in curves], axis=0),
        np.mean([np.asarray(y[:n], dtype=float) for _, y in curves], axis=0),
    )


def first_reach(x: np.ndarray, y: np.ndarray, score: float, sign: float) -> float | None:
    """The training MD steps at which the curve ``(x, y)`` first reaches ``score`` (at or
    beyond it in the direction ``sign``: +1 higher is better, -1 lower), linearly
    interpolated between the two evaluations around the crossing; ``None`` if never."""
    d = sign * (np.asarray(y, dtype=float) - score)
    hit = np.nonzero(d >= 0)[0]
    if hit.size == 0:
        return None
    i = int(hit[0])
    if i == 0:
        return float(x[0])
    f = d[i - 1] / (d[i - 1] - d[i])
    return float(x[i - 1] + f * (x[i] - x[i - 1]))


def _ratio(gradient: list[Curve], baseline: list[Curve], m0: float, sign: float) -> dict | None:
    """``s_m / g_m`` of mean curves, or ``None`` if the baseline's mean curve gains nothing."""
    bx, by = mean_curve(baseline)
    gain = sign * (by[-1] - m0)
    if not gain > 0:
        return None
    score = m0 + TARGET_FRACTION * (by[-1] - m0)
    s = first_reach(bx, by, score, sign)
    gx, gy = mean_curve(gradient)
    g = first_reach(gx, gy, score, sign)
    assert s is not None  # the mean curve's last point has the whole gain
    return {
        "ratio": 0.0 if g is None else (s / g if g > 0 else math.inf),
        "score": float(score),
        "steps_baseline": s,
        "steps_gradient": g,
        "gain": float(gain),
    }


def sample_efficiency(
    gradient: list[Curve],
    baseline: list[Curve],
    *,
    m0: float,
    higher_is_better: bool,
    eval_se: float = 0.0,
    n_boot: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """The gradient method's sample efficiency relative to one baseline ``m``.

    If ``m``'s mean final gain over the start ``m0`` is at least 3 standard errors (SE of
    the mean over seeds, ``sd / sqrt(n)``; with one seed, ``eval_se``, the final point's
    evaluation SE): ``S_m = m0 + 0.9 (final - m0)`` on ``m``'s mean curve, ``s_m`` the
    training MD steps at which that curve first reaches ``S_m``, ``g_m`` the steps at
    which the gradient method's mean curve does (both linearly interpolated between
    evaluations); ``ratio = s_m / g_m``, 0 if the gradient curve never reaches ``S_m``
    (>1: the gradient method needs fewer MD steps). The confidence interval: 2.5 and 97.5
    percentiles over ``n_boot`` resamples (with replacement) of the seeds of both methods
    (resamples whose baseline mean gains nothing are left out; ``bootstrap_used`` counts
    the others).

    :param gradient: the gradient method's curves, one per seed (first point: the start).
    :param baseline: the baseline's curves, one per seed.
    :param m0: the start's metric on the evaluation replicas.
    :return: ``status`` ("ratio" or "no learning"), ``ratio``, ``ci_low``, ``ci_high``,
        ``score``, ``steps_baseline``, ``steps_gradient``, ``gain``, ``gain_se``,
        ``bootstrap_used`` (``None`` where not defined).
    """
    sign = 1.0 if higher_is_better else -1.0
    n = min(len(x) for x, _ in baseline)
    finals = np.array([y[n - 1] for _, y in baseline], dtype=float)
    gain = sign * (finals.mean() - m0)
    gain_se = float(finals.std(ddof=1) / math.sqrt(finals.size)) if finals.size > 1 else eval_se
    empty = dict.fromkeys(
        ("ratio", "ci_low", "ci_high", "score", "steps_baseline", "steps_gradient")
    )
    if not (gain > 0 and gain >= 3.0 * gain_se):
        return {
            "status": "no learning",
            **empty,
            "gain": float(gain),
            "gain_se": gain_se,
            "bootstrap_used": 0,
        }
    point = _ratio(gradient, baseline, m0, sign)
    assert point is not None
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(n_boot):
        b = [baseline[i] for i in rng.integers(0, len(baseline), len(baseline))]
        g = [gradient[i] for i in rng.integers(0, len(gradient), len(gradient))]
        r = _ratio(g, b, m0, sign)
        if r is not None:
            ratios.append(r["ratio"])
    low, high = np.percentile(ratios, [2.5, 97.5]) if ratios else (math.nan, math.nan)
    return {
        "status": "ratio",
        **point,
        "ci_low": float(low),
        "ci_high": float(high),
        "gain_se": gain_se,
        "bootstrap_used": len(ratios),
    }


def _curve(run: dict[str, Any]) -> dict[str, list[float]]:
    points = run["curve"]
    return {
        "md_steps": [p["md_steps"] for p in points],
        "cpu_seconds": [p["cpu_s"] for p in points],
        "metric": [p["metric"] for p in points],
        "se": [p["se"] for p in points],
    }


def summarize(
    cfg: Config,
    task: Task,
    runs: dict[str, list[dict[str, Any]]],
    *,
    m0: float,
    m0_final: float,
    m0_exact: float | None = None,
    jobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The content of ``comparison.json``: jobs, learning curves, runs, summaries per
    method and the sample efficiency of the gradient method against each baseline.

    :param runs: per method the finished runs (``metrics.json`` records; may be empty).
    :param m0: the starting protocol's metric on the curve-evaluation replicas.
    :param m0_final: the same on the final-evaluation replicas.
    :param m0_exact: its noise-free metric, where the task has ``exact_metric``.
    :param jobs: ``{method, seed, status, message}`` of every job (default: the runs, done).
    """
    comp = cfg["compare"]
    if jobs is None:
        jobs = [
            {"method": m, "seed": r["seed"], "status": "done", "message": ""}
            for m, rs in runs.items()
            for r in rs
        ]
    methods: dict[str, Any] = {}
    curves: dict[str, dict[str, Any]] = {}
    for method, spec in cfg["methods"].items():
        rs = sorted(runs.get(method, []), key=lambda r: r["seed"])
        curves[method] = {str(r["seed"]): _curve(r) for r in rs}
        failed = [j for j in jobs if j["method"] == method and j["status"] != "done"]
        summary = None
        if rs:
            f = np.array([r["final"]["metric"] for r in rs])
            summary = {
                "final_mean": float(f.mean()),
                "final_sd": float(f.std(ddof=1)) if f.size > 1 else 0.0,
                "final_min": float(f.min()),
                "final_max": float(f.max()),
                "exact_final_mean": _mean_or_none([r.get("exact_final") for r in rs]),
                "md_steps_mean": float(np.mean([r["md_steps"] for r in rs])),
                "eval_md_steps_mean": float(np.mean([r["eval_md_steps"] for r in rs])),
                "grad_steps_mean": float(np.mean([r["grad_steps"] for r in rs])),
                "cpu_s_mean": float(np.mean([r["cpu_s"] for r in rs])),
                "wall_s_mean": float(np.mean([r["wall_s"] for r in rs])),
                "eval_wall_s_mean": float(np.mean([r["eval_wall_s"] for r in rs])),
                "stop_reasons": sorted({r["stop_reason"] for r in rs}),
            }
        methods[method] = {
            "algo": spec["algo"],
            "settings": spec,
            "runs": rs,
            "failed": len(failed),
            "summary": summary,
        }
    efficiency: dict[str, Any] = {}
    gradient = next((m for m, d in methods.items() if d["algo"] == "gradient" and d["runs"]), None)
    if gradient is not None:
        as_curves = {
            m: [(np.array(c["md_steps"]), np.array(c["metric"])) for c in curves[m].values()]
            for m in methods
        }
        for method, data in methods.items():
            if data["algo"] == "gradient" or not data["runs"]:
                continue
            efficiency[method] = {
                "gradient_method": gradient,
                **sample_efficiency(
                    as_curves[gradient],
                    as_curves[method],
                    m0=m0,
                    higher_is_better=task.higher_is_better,
                    eval_se=data["runs"][0]["curve"][-1]["se"],
                ),
            }
    finals = [r["final"]["metric"] for d in methods.values() for r in d["runs"]]
    extras = task.extras()
    return {
        "format": "controlmd.comparison/2",
        "complete": all(j["status"] == "done" for j in jobs),
        "experiment": cfg["experiment"]["name"],
        "task": task.name,
        "task_settings": cfg["task"],
        "metric_name": task.metric_name,
        "higher_is_better": task.higher_is_better,
        "units": task.units,
        "budget_md_steps": comp["budget_md_steps"],
        "budget_definition": "training forward MD replica-steps per run; evaluations are "
        "counted apart (eval_md_steps) and not charged to the budget",
        "control_interval": comp["control_interval"],
        "n_pieces": comp["n_pieces"],
        "eval_replicas": comp["eval_replicas"],
        "final_replicas": comp["final_replicas"],
        "wall_cap_s": comp["wall_cap_s"],
        "seeds": [cfg["experiment"]["seed"] + j for j in range(comp["seeds"])],
        "m0": m0,
        "m0_final": m0_final,
        "m0_exact": m0_exact,
        "m_best": (max if task.higher_is_better else min)(finals) if finals else None,
        "task_extras": {k: v for k, v in extras.items() if isinstance(v, int | float | str | bool)},
        "jobs": jobs,
        "curves": curves,
        "sample_efficiency": efficiency,
        "sample_efficiency_definition": "for a baseline m beating the start by >= 3 SE: "
        "S_m = m0 + 0.9 (final_m - m0) on m's mean curve over seeds; s_m, g_m = training MD "
        "steps at which m's / the gradient method's mean curve first reaches S_m (linear "
        "interpolation); ratio = s_m / g_m (0: the gradient method never reaches S_m); CI: "
        "bootstrap over seeds, 2.5-97.5 percentiles",
        "methods": methods,
    }


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if values and len(present) == len(values) else None


def _efficiency_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "—"
    if entry["status"] != "ratio":
        return "no learning"
    return f"{entry['ratio']:.3g} [{entry['ci_low']:.3g}, {entry['ci_high']:.3g}]"


def markdown_table(result: dict[str, Any]) -> str:
    """The comparison as a markdown table (one row per method, mean over seeds)."""
    name = result["metric_name"]
    direction = "higher" if result["higher_is_better"] else "lower"
    incomplete = "" if result.get("complete", True) else " (INCOMPLETE: some runs failed)"
    lines = [
        f"Task `{result['task']}`, metric `{name}` ({direction} is better), {result['n_pieces']} "
        f"pieces of {result['control_interval']} MD steps, budget "
        f"{result['budget_md_steps']:.3g} training MD replica-steps per run (evaluations not "
        f"charged), {len(result['seeds'])} seeds{incomplete}. Start (middle of the bounds): "
        f"{result['m0']:.4g} on the {result['eval_replicas']} curve replicas, "
        f"{result['m0_final']:.4g} on the {result['final_replicas']} final ones"
        + ("." if result.get("m0_exact") is None else f", {result['m0_exact']:.4g} exact."),
        "",
        f"| method | final {name} (mean ± sd) | exact, noise-free (mean) | best seed | "
        "training MD steps | eval MD steps | grad steps | CPU s (training) | wall s | "
        "sample efficiency of gradient [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    pick = max if result["higher_is_better"] else min
    for method, data in result["methods"].items():
        s = data["summary"]
        failed = data.get("failed", 0)
        if s is None:
            lines.append(f"| {method} | failed | — | — | — | — | — | — | — | — |")
            continue
        finals = [r["final"]["metric"] for r in data["runs"]]
        e = s.get("exact_final_mean")
        note = f" ({failed} failed)" if failed else ""
        lines.append(
            f"| {method} | {s['final_mean']:.4g} ± {s['final_sd']:.2g}{note} | "
            f"{'—' if e is None else f'{e:.4g}'} | {pick(finals):.4g} | "
            f"{s['md_steps_mean']:.3g} | {s['eval_md_steps_mean']:.3g} | "
            f"{s['grad_steps_mean']:.3g} | {s['cpu_s_mean']:.0f} | {s['wall_s_mean']:.0f} | "
            f"{_efficiency_cell(result['sample_efficiency'].get(method))} |"
        )
    known = result["task_extras"].get("optimum")
    if known is not None:
        lines += ["", f"Known optimum (task extras): {known:.4g}."]
    if result["sample_efficiency"]:
        lines += [
            "",
            "Sample efficiency = s_m / g_m: training MD steps baseline m needs to reach 90% of "
            "its own final gain, over those the gradient method needs to reach the same score "
            "(> 1: the gradient method needs fewer; 0: it never reaches it).",
        ]
    failed_jobs = [j for j in result.get("jobs", []) if j["status"] != "done"]
    if failed_jobs:
        lines += ["", "Failed runs:"] + [
            f"- {j['method']}/seed{j['seed']}: {j['message']}" for j in failed_jobs
        ]
    return "\n".join(lines) + "\n"


def efficiency_lines(result: dict[str, Any]) -> list[str]:
    """``sample_efficiency.<method>`` as printed lines."""
    out = []
    for method, e in result["sample_efficiency"].items():
        if e["status"] != "ratio":
            out.append(
                f"sample_efficiency.{method}: no learning (gain {e['gain']:.3g} "
                f"< 3 SE = {3 * e['gain_se']:.3g} over the start)"
            )
            continue
        g = e["steps_gradient"]
        out.append(
            f"sample_efficiency.{method}: ratio {e['ratio']:.3g} "
            f"[{e['ci_low']:.3g}, {e['ci_high']:.3g}] (score {e['score']:.4g}: {method} at "
            f"{e['steps_baseline']:.3g} MD steps, {e['gradient_method']} at "
            f"{'never' if g is None else f'{g:.3g}'})"
        )
    return out


def plot_comparison(result: dict[str, Any], path: Path) -> None:
    """``comparison.png``: metric against training MD steps (log x), mean ± SE over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7.5, 4.5))
    for method, seeds in result["curves"].items():
        if not seeds:
            continue
        curves = [(np.array(c["md_steps"]), np.array(c["metric"])) for c in seeds.values()]
        n = min(len(x) for x, _ in curves)
        x, mean = mean_curve(curves)
        ys = np.array([y[:n] for _, y in curves], dtype=float)
        se = ys.std(axis=0, ddof=1) / math.sqrt(len(curves)) if len(curves) > 1 else 0 * mean
        keep = x > 0
        line = axis.plot(x[keep], mean[keep], marker="o", ms=3, label=method)[0]
        axis.fill_between(
            x[keep], (mean - se)[keep], (mean + se)[keep], color=line.get_color(), alpha=0.2
        )
    axis.axhline(result["m0"], color="grey", lw=0.8, ls=":", label="start")
    known = result["task_extras"].get("optimum")
    if isinstance(known, float):
        axis.axhline(known, color="black", lw=0.8, ls="--", label="analytic optimum")
    axis.set_xscale("log")
    axis.set_xlabel("training MD replica-steps (evaluations not charged)")
    direction = "higher" if result["higher_is_better"] else "lower"
    axis.set_ylabel(f"{result['metric_name']} ({direction} is better)")
    axis.legend(fontsize=8)
    axis.set_title(
        f"{result['task']}: {result['eval_replicas']} held-out replicas, mean ± SE over "
        f"{len(result['seeds'])} seeds",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, bool | int | float | str) or obj is None:
        return obj
    return str(obj)


def main_compare(
    path: str | Path | None,
    *,
    out: str | Path | None = None,
    overrides: Iterable[str] = (),
    resume: str | Path | None = None,
    progress: bool = True,
    **runner: Any,
) -> int:
    """What ``controlmd compare`` runs: load, run (or resume), report where the results went.

    :param runner: ``address``, ``backend``, ``num_cpus``, ``cpus_per_job`` of
        :func:`controlmd.runner.run_jobs`.
    :return: exit status: 0 when every run is done, 1 otherwise (``--resume`` re-runs them).
    """
    overrides = list(overrides)
    if path is None and overrides:
        raise ConfigError(
            "--set needs the experiment file; `controlmd compare --resume DIR` takes none"
        )
    cfg = load_compare_config(path, overrides) if path is not None else None
    t0 = time.perf_counter()
    run = run_comparison(cfg, out=out, resume=resume, progress=progress, **runner)
    if progress and run.result is not None:
        print((run.out_dir / "comparison.md").read_text(), file=sys.stderr)
        for line in efficiency_lines(run.result):
            print(line, file=sys.stderr)
        print(
            f"wrote {run.out_dir}/comparison.json, comparison.png, comparison.md in "
            f"{time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
        )
    return 1 if run.failed else 0
