"""Equal-budget comparison of gradient-designed protocols with RL and derivative-free baselines.

``controlmd compare EXPERIMENT.toml [--out DIR] [--address auto] [--local]`` runs every
method of ``[compare] methods`` for ``seeds`` seeds on one task, each under the same total
budget of forward MD replica-steps (training and evaluation alike) and a wall cap. Every
(method, seed) run is an independent job (:func:`run_compare_job`) run by
:func:`controlmd.runner.run_jobs`: a Ray task when Ray is installed (a local instance, or
the cluster at ``--address``), else one after another in this process; results are the
same either way. ``controlmd compare --resume DIR`` re-runs only the runs without a
``metrics.json`` (killed, failed or never started). It writes to ``DIR`` (default
``runs/<experiment>/<YYYYmmdd-HHMMSS>/``):

* ``comparison.json``: per method and seed the metric curve against MD steps and wall
  time, the final metric, the MD steps and wall time to reach ``target_progress`` (0.9)
  of the normalized progress ``(m - m0) / (m_best - m0)`` (``m0``: the common starting
  protocol on the same evaluation replicas; ``m_best``: the best final metric of all
  runs; works for minimized metrics too), gradient steps; per method the summary over
  seeds. The starting protocol's scheduled evaluation is every run's first point (and
  charged to each run's budget; it is computed once, so it takes no wall time).
* ``comparison.png``: metric against MD steps and against wall time (log x), mean over
  seeds and min-max band.
* ``comparison.md``: the markdown table.
* ``compare_config.json`` (the resolved config: the plan ``--resume`` reads),
  ``config.toml``, ``start.json`` (the common start's evaluations).
* ``<method>/seed<k>/``: the run folder of each run (``tb/`` TensorBoard events,
  ``progress.jsonl``, ``metrics.json``, ``protocol.pt`` / ``protocol.csv``, SB3's
  ``model.zip``), as the trainer's run folders; ``metrics.json`` is written last and marks
  the run done. The comparison files are assembled from these folders
  (:func:`summarize_folder`) after the runs, also when some failed or were interrupted.

Experiment file::

    [experiment]   name, seed = 0, notes = ""
    [task]         name + the task's arguments (as for `controlmd run`)
    [compare]      methods, seeds, budget_md_steps, control_interval, eval_replicas,
                   final_replicas, eval_points, eval_chunk, wall_cap_s, target_progress
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
import warnings
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
from controlmd.runner import Job, JobResult, new_output_dir, read_result, run_folder_jobs
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
    "load_compare_config",
    "run_compare_job",
    "run_comparison",
    "summarize",
    "summarize_folder",
]

Config = dict[str, Any]

COMPARE_KEYS: dict[str, tuple[type, Any, str]] = {
    "methods": (list, list(ALGOS), "methods to run (section names)"),
    "seeds": (int, 3, "runs per method (seeds experiment.seed + j)"),
    "budget_md_steps": (int, 1_000_000, "forward replica-steps per run, evaluations included"),
    "control_interval": (
        int,
        0,
        "MD steps per piece / action (0: smallest divisor giving <= 20 pieces)",
    ),
    "eval_replicas": (int, 256, "replicas of each scheduled evaluation"),
    "final_replicas": (int, 2048, "replicas of the final evaluation"),
    "eval_points": (int, 10, "scheduled evaluations, log-spaced in spent MD steps (>= 2)"),
    "eval_chunk": (int, 1024, "replicas simulated at once during evaluations"),
    "wall_cap_s": (float, 1800.0, "wall-time cap of each run (s)"),
    "target_progress": (float, 0.9, "normalized progress whose MD-step cost is reported"),
}
_MINIMUM = {
    "seeds": 1,
    "budget_md_steps": 1,
    "control_interval": 0,
    "eval_replicas": 2,
    "final_replicas": 2,
    "eval_points": 2,
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
    costs = (compare["eval_replicas"] + compare["final_replicas"]) * task.n_steps
    if compare["budget_md_steps"] <= costs:
        raise ConfigError(
            f"[compare] budget_md_steps = {compare['budget_md_steps']} must exceed the evaluation costs "
            f"(eval_replicas + final_replicas) x n_steps = {costs}"
        )
    cfg["compare"]["n_pieces"] = n_pieces
    return cfg


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
    if not 0 < out["target_progress"] <= 1:
        raise ConfigError(
            f"[compare] target_progress must be in (0, 1], got {out['target_progress']}"
        )
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
    accepted = [
        n for n in inspect.signature(cls.__init__).parameters if n not in ("self", *_SB3_RESERVED)
    ]
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
    """Outcome of :func:`run_comparison`: the folder, ``comparison.json`` (``None`` while no
    run has finished) and the ``<method>/seed<k>`` runs not done."""

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
            f"{r['md_steps']:.3g} MD steps, {r['wall_s']:.1f} s ({r['stop_reason']})"
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
    finally:  # also after Ctrl-C: summarize the runs finished so far
        if out_dir.exists():
            missing = [j.name for j in jobs if read_result(out_dir / j.name, RESULT_FILE) is None]
            result = summarize_folder(out_dir) if len(missing) < len(runs) else None
    if missing:
        say(
            f"{len(missing)} of {len(runs)} runs not done ({', '.join(missing)}); re-run them with: "
            f"controlmd compare --resume {out_dir}"
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

    :param initial: the common starting protocol's scheduled evaluation (fields of
        :class:`controlmd.evaluation.Evaluation`): charged to the run, not recomputed (RL
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
        eval_points=comp["eval_points"],
        wall_cap_s=comp["wall_cap_s"],
        chunk=comp["eval_chunk"],
        initial=None if spec["algo"] in ("ppo", "sac") else Evaluation(**initial),
        logger=logger,
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
    """``start.json``: the common starting protocol on the scheduled- and final-evaluation
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
    (``<method>/seed<k>/metrics.json``; of an interrupted comparison, the runs finished)."""
    from controlmd.config import build_task
    from controlmd.protocols import load_protocol

    out_dir = Path(out_dir)
    cfg = _read_plan(out_dir)
    task = build_task(cfg)
    comp = cfg["compare"]
    runs: dict[str, list[dict[str, Any]]] = {}
    for method in cfg["methods"]:
        records = [
            json.loads(p.read_text())
            for p in sorted((out_dir / method).glob(f"seed*/{RESULT_FILE}"))
        ]
        if records:
            runs[method] = sorted(
                ({k: v for k, v in r.items() if k not in _RUN_ONLY_KEYS} for r in records),
                key=lambda r: r["seed"],
            )
    if not runs:
        raise ConfigError(f"{out_dir}: no finished run (no <method>/seed<k>/{RESULT_FILE})")
    for method, records in runs.items():
        for r in records:
            path = out_dir / method / f"seed{r['seed']}" / "protocol.pt"
            if "exact_final" not in r and path.exists():
                r["exact_final"] = _exact_metric(task, load_protocol(path))
    start = _start_evaluations(cfg, out_dir)
    cfg = {**cfg, "methods": {m: cfg["methods"][m] for m in runs}}
    complete = all(len(rs) == comp["seeds"] for rs in runs.values()) and len(runs) == len(
        comp["methods"]
    )
    result = summarize(
        cfg, task, runs, m0=start["m0"], m0_final=start["m0_final"], complete=complete
    )
    _write_outputs(out_dir, result)
    return result


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
        )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ControlMDError):
            raise
        raise ConfigError(f"[{method}] (algo = {algo!r}): {exc}") from exc


# ---------------------------------------------------------------------------------- summary


def summarize(
    cfg: Config,
    task: Task,
    runs: dict[str, list[dict[str, Any]]],
    *,
    m0: float,
    m0_final: float,
    complete: bool = True,
) -> dict[str, Any]:
    """The content of ``comparison.json``: runs with their progress, summaries per method.

    :param m0: the starting protocol's metric on the scheduled-evaluation replicas.
    :param m0_final: the same on the final-evaluation replicas (a reference, charged to no run).
    """
    comp = cfg["compare"]
    finals = [r["final"]["metric"] for rs in runs.values() for r in rs if r["final"] is not None]
    better = max if task.higher_is_better else min
    m_best = better(finals) if finals else math.nan
    target = comp["target_progress"]
    methods: dict[str, Any] = {}
    for method, rs in runs.items():
        for r in rs:
            r["progress"] = [_progress(p["metric"], m0, m_best) for p in r["curve"]]
            r["final"]["progress"] = _progress(r["final"]["metric"], m0_final, m_best)
            reached = [
                p
                for p, g in zip([*r["curve"], r["final"]], [*r["progress"], r["final"]["progress"]])
                if g is not None and g >= target
            ]
            r["md_steps_to_target"] = reached[0]["md_steps"] if reached else None
            r["wall_s_to_target"] = reached[0]["wall_s"] if reached else None
        f = np.array([r["final"]["metric"] for r in rs])
        hit = [r["md_steps_to_target"] for r in rs if r["md_steps_to_target"] is not None]
        methods[method] = {
            "algo": cfg["methods"][method]["algo"],
            "settings": cfg["methods"][method],
            "runs": rs,
            "summary": {
                "final_mean": float(f.mean()),
                "final_sd": float(f.std(ddof=1)) if f.size > 1 else 0.0,
                "final_min": float(f.min()),
                "final_max": float(f.max()),
                "exact_final_mean": _mean_or_none([r.get("exact_final") for r in rs]),
                "reached_target": len(hit),
                "md_steps_to_target_median": float(np.median(hit)) if hit else None,
                "md_steps_mean": float(np.mean([r["md_steps"] for r in rs])),
                "grad_steps_mean": float(np.mean([r["grad_steps"] for r in rs])),
                "wall_s_mean": float(np.mean([r["wall_s"] for r in rs])),
                "stop_reasons": sorted({r["stop_reason"] for r in rs}),
            },
        }
    extras = task.extras()
    return {
        "format": "controlmd.comparison/1",
        "complete": complete,
        "experiment": cfg["experiment"]["name"],
        "task": task.name,
        "task_settings": cfg["task"],
        "metric_name": task.metric_name,
        "higher_is_better": task.higher_is_better,
        "units": task.units,
        "budget_md_steps": comp["budget_md_steps"],
        "control_interval": comp["control_interval"],
        "n_pieces": comp["n_pieces"],
        "eval_replicas": comp["eval_replicas"],
        "final_replicas": comp["final_replicas"],
        "wall_cap_s": comp["wall_cap_s"],
        "seeds": [cfg["experiment"]["seed"] + j for j in range(comp["seeds"])],
        "target_progress": target,
        "m0": m0,
        "m0_final": m0_final,
        "m_best": m_best,
        "progress_definition": "(m - m0) / (m_best - m0); m0: the common starting protocol (middle of the "
        "bounds) on the same replicas as m (m0 for the scheduled evaluations, m0_final "
        "for the final ones); m_best: the best final metric of all runs",
        "task_extras": {k: v for k, v in extras.items() if isinstance(v, int | float | str | bool)},
        "methods": methods,
    }


def _mean_or_none(values: list[float | None]) -> float | None:
    return float(np.mean(values)) if values and all(v is not None for v in values) else None


def _progress(m: float, m0: float, m_best: float) -> float | None:
    if not math.isfinite(m_best) or m_best == m0:
        return None
    return (m - m0) / (m_best - m0)


def markdown_table(result: dict[str, Any]) -> str:
    """The comparison as a markdown table (one row per method, mean over seeds)."""
    name = result["metric_name"]
    direction = "higher" if result["higher_is_better"] else "lower"
    pct = round(100 * result["target_progress"])
    lines = [
        f"Task `{result['task']}`, metric `{name}` ({direction} is better), {result['n_pieces']} pieces of "
        f"{result['control_interval']} MD steps, budget {result['budget_md_steps']:.3g} MD replica-steps per run, "
        f"{len(result['seeds'])} seeds{'' if result.get('complete', True) else ' (INCOMPLETE: runs so far)'}. "
        f"Start (middle of the bounds): {result['m0_final']:.4g}; best final: "
        f"{result['m_best']:.4g}.",
        "",
        f"| method | final {name} (mean ± sd) | best seed | MD steps to {pct}% (median) | reached | "
        "MD steps used | grad steps | wall s (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pick = max if result["higher_is_better"] else min
    exact = any(
        d["summary"].get("exact_final_mean") is not None for d in result["methods"].values()
    )
    if exact:
        lines[2] = lines[2].replace(" | best seed |", " | exact, noise-free (mean) | best seed |")
        lines[3] += "---|"
    for method, data in result["methods"].items():
        s = data["summary"]
        finals = [r["final"]["metric"] for r in data["runs"]]
        to = s["md_steps_to_target_median"]
        e = s.get("exact_final_mean")
        exact_cell = ("—" if e is None else f"{e:.4g}") + " | " if exact else ""
        lines.append(
            f"| {method} | {s['final_mean']:.4g} ± {s['final_sd']:.2g} | {exact_cell}{pick(finals):.4g} | "
            f"{'—' if to is None else f'{to:.3g}'} | {s['reached_target']}/{len(finals)} | "
            f"{s['md_steps_mean']:.3g} | {s['grad_steps_mean']:.3g} | {s['wall_s_mean']:.0f} |"
        )
    known = result["task_extras"].get("optimum")
    if known is not None:
        lines += ["", f"Known optimum (task extras): {known:.4g}."]
    return "\n".join(lines) + "\n"


def plot_comparison(result: dict[str, Any], path: Path) -> None:
    """``comparison.png``: metric against MD steps and wall time, mean and min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, key, label in (
        (axes[0], "md_steps", "MD replica-steps spent"),
        (axes[1], "wall_s", "wall time (s)"),
    ):
        for method, data in result["methods"].items():
            curves = [([*r["curve"], r["final"]]) for r in data["runs"]]
            xs = [np.array([p[key] for p in c], dtype=float) for c in curves]
            lo = min(x[1] if x.size > 1 else x[0] for x in xs) / 2.0
            hi = max(x[-1] for x in xs)
            grid = np.geomspace(lo, hi, 200)
            held = np.full((len(curves), grid.size), np.nan)
            for i, (c, x) in enumerate(zip(curves, xs)):
                idx = np.searchsorted(x, grid, side="right") - 1
                ok = (idx >= 0) & (grid <= x[-1])
                held[i, ok] = np.array([p["metric"] for p in c])[idx[ok]]
            with warnings.catch_warnings():  # grid points before a run's first evaluation are NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, low, high = (
                    np.nanmean(held, axis=0),
                    np.nanmin(held, axis=0),
                    np.nanmax(held, axis=0),
                )
            line = axis.plot(grid, mean, label=method)[0]
            axis.fill_between(grid, low, high, color=line.get_color(), alpha=0.2)
        axis.axhline(result["m0"], color="grey", lw=0.8, ls=":", label="start")
        known = result["task_extras"].get("optimum")
        if isinstance(known, float):
            axis.axhline(known, color="black", lw=0.8, ls="--", label="known optimum")
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel(
            f"{result['metric_name']} ({'higher' if result['higher_is_better'] else 'lower'} is better)"
        )
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{result['task']}: equal budget {result['budget_md_steps']:.3g} MD steps, "
        f"{len(result['seeds'])} seeds (mean, min-max)"
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
        print(
            f"wrote {run.out_dir}/comparison.json, comparison.png, comparison.md in "
            f"{time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
        )
    return 1 if run.failed else 0
