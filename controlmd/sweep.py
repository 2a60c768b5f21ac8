"""Sweeps: independent (setting, seed) training jobs, on Ray when it is installed.

::

    controlmd sweep EXPERIMENT.toml --grid train.lr=0.003,0.01,0.03 --grid task.kT=0.5,1.0 \\
        [--seeds 3] [--set section.key=value ...] [--out DIR] [--address auto] [--num-cpus N]
    controlmd sweep --resume DIR

The grid is the Cartesian product of the ``--grid`` keys (in the order given) times
``--seeds`` seeds (``experiment.seed + j``). Every job is a complete ``controlmd run`` of
its own resolved config and writes its own run directory; nothing is shared between jobs,
so they can run anywhere and in any order. The sweep folder (default
``runs/<experiment>/sweep-<YYYYmmdd-HHMMSS>/``) holds::

    sweep.json      the plan: base config (after --set), grid, seeds, job names and settings
    jobs/<name>/    each job's run directory (config.toml, metrics.json, checkpoint.pt, tb/, ...)
    summary.json    assembled from the jobs' metrics.json: per job, and per setting over seeds
    summary.md      the same as a markdown table

A job is done when its ``metrics.json`` exists (the trainer writes it atomically, last but
for the final checkpoint). ``--resume DIR`` re-runs only the jobs that are not done: a job
with a ``checkpoint.pt`` continues from it (the trainer's exact resume), any other partial
folder is removed and the job starts over. The summary is rebuilt from the run
directories each time and written atomically.

Where jobs run is the job runner's business (:mod:`controlmd.runner`, shared with
``controlmd compare`` and ``controlmd run --seeds``): with ``ray`` installed (the ``dist``
extra) each job is a Ray task with ``cpus_per_job`` CPUs; ``--address auto`` (or
``host:port``, ``ray://...``) joins a running cluster, the default starts a local one sized
to the machine (or to ``--num-cpus``). Without ``ray``, or with ``--local``, jobs run one
after another in this process. Results do not depend on where a job ran: each is seeded by
its config alone. A failed job's traceback is written to ``jobs/<name>/error.txt``.

Everything is validated before the sweep folder is created: grid keys must be keys of the
experiment schema (``[train]``/``[eval]``/``[logging]`` fields, or arguments of the task /
protocol), every job's config must resolve, and a Ray address must be reachable.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from controlmd._validation import check_int
from controlmd.checkpoint import atomic_write_json, atomic_write_text
from controlmd.errors import ConfigError
from controlmd.runner import (
    Job,
    JobResult,
    add_runner_arguments,
    job_reporter,
    new_output_dir,
    ray_available,
    ray_session,
    read_result,
    run_folder_jobs,
    run_jobs,
    runner_options,
    runner_session,
)

__all__ = [
    "Job",
    "JobResult",
    "SweepResult",
    "add_runner_arguments",
    "job_reporter",
    "new_output_dir",
    "parse_grid",
    "ray_available",
    "ray_session",
    "read_result",
    "run_jobs",
    "run_sweep",
    "runner_options",
    "runner_session",
    "summarize_sweep",
]

RUNNER_BACKENDS = ("auto", "ray", "local")
SPEC_FILE = "sweep.json"
SPEC_FORMAT = "controlmd.sweep/1"
_RESERVED_GRID_KEYS = {
    "experiment.name": "all jobs of a sweep belong to one experiment",
    "experiment.seed": "use --seeds N (seeds experiment.seed + 0 ... N-1)",
}
_SUMMARY_KEYS = (
    "metric_final",
    "metric_final_se",
    "metric_initial",
    "md_steps",
    "grad_steps",
    "wall_s",
    "iterations",
)


# ---------------------------------------------------------------------- sweep plan


@dataclass(frozen=True)
class _SweepJob:
    name: str
    setting: dict[str, Any]
    seed: int


@dataclass
class SweepResult:
    """Outcome of :func:`run_sweep`: the sweep folder, its summary, and the jobs not done."""

    sweep_dir: Path
    summary: dict[str, Any]
    failed: list[str]


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """``["train.lr=0.01,0.1", "train.optimizer=adam,sgd"]`` -> ``{"train.lr": [0.01, 0.1], ...}``.

    Values are TOML (``0.01``, ``true``, ``"x"``, ``[64, 64]``); bare words are strings.
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        lhs, sep, rhs = item.partition("=")
        key = lhs.strip()
        section, dot, name = key.partition(".")
        if not sep or not dot or not section or not name or "." in name or not rhs.strip():
            raise ConfigError(
                f"--grid expects section.key=v1,v2,... (e.g. train.lr=0.01,0.1), got {item!r}"
            )
        if key in grid:
            raise ConfigError(
                f"--grid {key} is given twice; list all its values once: {key}=v1,v2,..."
            )
        if key in _RESERVED_GRID_KEYS:
            raise ConfigError(f"--grid {key}: not a sweep axis ({_RESERVED_GRID_KEYS[key]})")
        values = _parse_values(rhs.strip())
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ConfigError(f"--grid {key} repeats a value: {rhs.strip()}")
        grid[key] = values
    return grid


def _parse_values(text: str) -> list[Any]:
    try:
        values = tomllib.loads(f"v = [{text}]")["v"]
    except tomllib.TOMLDecodeError:
        values = []
        for part in text.split(","):
            part = part.strip()
            try:
                values.append(tomllib.loads(f"v = {part}")["v"])
            except tomllib.TOMLDecodeError:
                values.append(part)
    if not values or any(v == "" for v in values):
        raise ConfigError(f"--grid values must be non-empty, got {text!r}")
    return values


def _plan(base: dict[str, Any], grid: dict[str, list[Any]], seeds: int) -> list[_SweepJob]:
    base_seed = int(base.get("experiment", {}).get("seed", 0))
    keys = list(grid)
    jobs: list[_SweepJob] = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        setting = dict(zip(keys, combo))
        for j in range(seeds):
            index = len(jobs)
            label = "_".join(f"{k}={_label(v)}" for k, v in setting.items())
            name = (
                f"{index:03d}_{label}_seed{base_seed + j}"
                if label
                else f"{index:03d}_seed{base_seed + j}"
            )
            jobs.append(_SweepJob(_safe_name(name), setting, base_seed + j))
    return jobs


def _label(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", name)[:120]


def _job_raw(base: dict[str, Any], job: _SweepJob) -> dict[str, Any]:
    raw = json.loads(json.dumps(base))
    for key, value in job.setting.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    raw.setdefault("experiment", {})["seed"] = job.seed
    return raw


def _resolve_jobs(
    base: dict[str, Any], grid: dict[str, list[Any]], jobs: list[_SweepJob]
) -> dict[str, Any]:
    """Resolve every job's config (the trainer's checks), naming the grid key or job at fault."""
    from controlmd.config import SECTIONS, resolve_config

    for key, values in grid.items():
        section, name = key.split(".")
        if section not in SECTIONS:
            raise ConfigError(
                f"--grid {key}: unknown section [{section}]; expected one of: {', '.join(SECTIONS)}"
            )
        probe = json.loads(json.dumps(base))
        probe.setdefault(section, {})[name] = values[0]
        try:
            resolve_config(probe)
        except ConfigError as exc:
            raise ConfigError(f"--grid {key}: {exc}") from None
    configs = {}
    for job in jobs:
        try:
            configs[job.name] = resolve_config(_job_raw(base, job))
        except ConfigError as exc:
            shown = (
                ", ".join(f"{k}={_label(v)}" for k, v in job.setting.items()) or "the base config"
            )
            raise ConfigError(f"--grid setting {shown} (seed {job.seed}): {exc}") from None
    return configs


# ---------------------------------------------------------------------- one job


def run_sweep_job(cfg: dict[str, dict[str, Any]], job_dir: str) -> dict[str, Any]:
    """Train one job into ``job_dir``; returns its ``metrics.json`` contents.

    Continues from ``job_dir/checkpoint.pt`` when a killed attempt left one; a partial
    folder without a checkpoint is removed first (it holds nothing reusable).
    """
    from controlmd.experiment import run_experiment

    path = Path(job_dir)
    done = read_result(path)
    if done is not None:
        return done
    if (path / "checkpoint.pt").is_file() and (path / "config.toml").is_file():
        return run_experiment(cfg, resume=path, progress=False).metrics
    if path.exists():
        shutil.rmtree(path)
    return run_experiment(cfg, out=path, progress=False).metrics


# ---------------------------------------------------------------------- the sweep


def run_sweep(
    experiment: str | Path | None = None,
    grid: Iterable[str] = (),
    *,
    seeds: int | None = None,
    overrides: Iterable[str] = (),
    out: str | Path | None = None,
    resume: str | Path | None = None,
    runs_root: str | Path = "runs",
    address: str | None = None,
    backend: str = "auto",
    num_cpus: int | None = None,
    cpus_per_job: int = 1,
    echo: Callable[[str], None] | None = print,
) -> SweepResult:
    """Run (or resume) a sweep; see the module docstring.

    :param experiment: the experiment TOML file (not needed with ``resume``).
    :param grid: ``"section.key=v1,v2,..."`` strings.
    :param seeds: seeds per setting (``experiment.seed + j``; default 1).
    :param overrides: ``"section.key=value"`` applied to the base config before the grid.
    :param out: the sweep folder (default ``runs_root/<experiment>/sweep-<time>/``).
    :param resume: an existing sweep folder: re-run its jobs that are not done. An
        ``experiment``, ``grid``, ``seeds`` or ``overrides`` given too must match its plan.
    :param address, backend, num_cpus, cpus_per_job: where jobs run (:func:`run_jobs`).
    :param echo: progress lines (``None``: silent).
    :return: the folder, the summary and the names of the jobs still not done.
    :raises ConfigError: bad experiment file, grid key or value, or resume folder; nothing
        is written then.
    """
    if seeds is not None:
        check_int("seeds", seeds)
    grid_items, override_items = list(grid), list(overrides)
    if resume is not None:
        sweep_dir = Path(resume)
        spec = _read_spec(sweep_dir)
        if experiment is not None or grid_items or override_items or seeds is not None:
            asked = (
                _new_spec(experiment, grid_items, seeds or 1, override_items)
                if experiment is not None
                else None
            )
            plan = ("base", "grid", "seeds")
            if asked is None or {k: asked[k] for k in plan} != {k: spec[k] for k in plan}:
                raise ConfigError(
                    f"--resume {sweep_dir}: the experiment, --grid, --seeds and --set given differ from "
                    f"the sweep's plan in {SPEC_FILE}; resume with `controlmd sweep --resume {sweep_dir}` alone"
                )
    else:
        if experiment is None:
            raise ConfigError("give an experiment file (and --grid), or --resume DIR")
        spec = _new_spec(experiment, grid_items, seeds or 1, override_items)
    jobs = [_SweepJob(j["name"], j["setting"], j["seed"]) for j in spec["jobs"]]
    configs = _resolve_jobs(spec["base"], spec["grid"], jobs)
    if resume is None:
        sweep_dir = _new_sweep_dir(spec, out, runs_root)
    say = echo or (lambda _line: None)
    work = [
        Job(
            f"jobs/{job.name}",
            run_sweep_job,
            (configs[job.name], str((sweep_dir / "jobs" / job.name).resolve())),
        )
        for job in jobs
    ]

    def create() -> None:
        sweep_dir.mkdir(parents=True, exist_ok=False)
        atomic_write_json(sweep_dir / SPEC_FILE, spec)

    errors: dict[str, str] = {}
    try:
        run = run_folder_jobs(
            sweep_dir,
            work,
            result_file="metrics.json",
            describe=lambda r: (
                f"{r.value['metric_name']} = {r.value['metric_final']:.6g} ({r.wall_s:.1f} s)"
            ),
            say=say,
            what="sweep",
            create=create if resume is None else None,
            address=address,
            backend=backend,
            num_cpus=num_cpus,
            cpus_per_job=cpus_per_job,
        )
        errors = {name.removeprefix("jobs/"): e for name, e in run.errors.items()}
    finally:
        if sweep_dir.exists():
            summary = summarize_sweep(sweep_dir, errors=errors)
    failed = [j["name"] for j in summary["jobs"] if j["status"] != "done"]
    say(f"summary: {sweep_dir / 'summary.json'}, {sweep_dir / 'summary.md'}")
    if failed:
        say(
            f"{len(failed)} of {len(jobs)} jobs not done; re-run them with: controlmd sweep --resume {sweep_dir}"
        )
    return SweepResult(sweep_dir, summary, failed)


def _new_spec(
    experiment: str | Path, grid_items: list[str], seeds: int, overrides: list[str]
) -> dict[str, Any]:
    from controlmd.config import apply_overrides, read_toml

    path = Path(experiment)
    base = apply_overrides(read_toml(path), overrides)
    grid = parse_grid(grid_items)
    base = json.loads(json.dumps(base))  # the plan must survive a JSON round trip
    jobs = _plan(base, grid, seeds)
    return {
        "format": SPEC_FORMAT,
        "experiment_file": str(path),
        "base": base,
        "grid": grid,
        "seeds": seeds,
        "jobs": [{"name": j.name, "setting": j.setting, "seed": j.seed} for j in jobs],
    }


def _read_spec(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / SPEC_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"--resume {sweep_dir}: not a sweep folder (it has no {SPEC_FILE})"
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--resume {sweep_dir}: {SPEC_FILE} is not valid JSON: {exc}") from None
    if spec.get("format") != SPEC_FORMAT:
        raise ConfigError(
            f"--resume {sweep_dir}: {SPEC_FILE} has format {spec.get('format')!r}, expected {SPEC_FORMAT!r}"
        )
    return spec


def _new_sweep_dir(spec: dict[str, Any], out: str | Path | None, runs_root: str | Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return new_output_dir(
        out,
        Path(runs_root) / spec["base"]["experiment"]["name"] / f"sweep-{stamp}",
        plan_file=SPEC_FILE,
    )


# ---------------------------------------------------------------------- summary


def summarize_sweep(
    sweep_dir: str | Path, *, errors: dict[str, str] | None = None
) -> dict[str, Any]:
    """Assemble ``summary.json`` and ``summary.md`` from the jobs' run directories.

    Per job: its setting, seed, status (``done``: ``metrics.json`` present; ``incomplete``:
    a folder without it; ``missing``: no folder), the metrics of ``metrics.json`` and, for
    jobs that failed in this invocation, the last line of their error. Per setting: the
    number of seeds done and the mean, and standard error over seeds, of each metric.
    Both files are written atomically.

    :param errors: job name -> error text of jobs that failed in this invocation.
    """
    sweep_dir = Path(sweep_dir)
    spec = _read_spec(sweep_dir)
    errors = errors or {}
    rows = []
    meta: dict[str, Any] = {}
    for job in spec["jobs"]:
        job_dir = sweep_dir / "jobs" / job["name"]
        metrics = read_result(job_dir)
        row: dict[str, Any] = {
            "name": job["name"],
            "setting": job["setting"],
            "seed": job["seed"],
            "run_dir": str(Path("jobs") / job["name"]),
        }
        if metrics is not None:
            row["status"] = "done"
            row.update({k: metrics.get(k) for k in _SUMMARY_KEYS})
            meta = meta or {
                k: metrics.get(k) for k in ("task", "metric_name", "higher_is_better", "units")
            }
        else:
            row["status"] = "incomplete" if job_dir.exists() else "missing"
        if job["name"] in errors:
            row["error"] = errors[job["name"]].strip().splitlines()[-1]
        rows.append(row)
    settings = []
    for key in dict.fromkeys(json.dumps(r["setting"], sort_keys=True) for r in rows):
        group = [r for r in rows if json.dumps(r["setting"], sort_keys=True) == key]
        done = [r for r in group if r["status"] == "done"]
        entry: dict[str, Any] = {
            "setting": group[0]["setting"],
            "seeds": len(group),
            "done": len(done),
        }
        for k in _SUMMARY_KEYS:
            values = [float(r[k]) for r in done if isinstance(r.get(k), int | float)]
            if values:
                mean = sum(values) / len(values)
                entry[k] = mean
                if len(values) > 1:
                    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
                    entry[f"{k}_seed_se"] = math.sqrt(var / len(values))
        settings.append(entry)
    summary = {
        "format": SPEC_FORMAT,
        "experiment": spec["base"].get("experiment", {}).get("name"),
        **meta,
        "grid": spec["grid"],
        "seeds": spec["seeds"],
        "jobs_total": len(rows),
        "jobs_done": sum(r["status"] == "done" for r in rows),
        "settings": settings,
        "jobs": rows,
    }
    atomic_write_json(sweep_dir / "summary.json", summary)
    atomic_write_text(sweep_dir / "summary.md", _markdown(summary))
    return summary


def _markdown(summary: dict[str, Any]) -> str:
    metric = summary.get("metric_name") or "metric"
    direction = ""
    if summary.get("higher_is_better") is not None:
        direction = " (higher is better)" if summary["higher_is_better"] else " (lower is better)"
    lines = [
        f"# sweep of {summary['experiment']}: {summary['jobs_done']}/{summary['jobs_total']} jobs done",
        "",
        f"{metric}{direction}: mean over seeds +- standard error over seeds; budget per job.",
        "",
        f"| setting | seeds done | {metric} final | {metric} initial | md_steps | wall_s |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary["settings"]:
        shown = ", ".join(f"{k}={_label(v)}" for k, v in s["setting"].items()) or "(base)"
        final = _fmt(s.get("metric_final"))
        if "metric_final_seed_se" in s:
            final += f" +- {s['metric_final_seed_se']:.2g}"
        lines.append(
            f"| {shown} | {s['done']}/{s['seeds']} | {final} | {_fmt(s.get('metric_initial'))} | "
            f"{_fmt(s.get('md_steps'), '.4g')} | {_fmt(s.get('wall_s'), '.3g')} |"
        )
    missing = [j for j in summary["jobs"] if j["status"] != "done"]
    if missing:
        lines += ["", "Not done (re-run with `controlmd sweep --resume DIR`):", ""]
        for j in missing:
            lines.append(
                f"- {j['name']}: {j['status']}" + (f" ({j['error']})" if "error" in j else "")
            )
    return "\n".join(lines) + "\n"


def _fmt(value: Any, spec: str = ".6g") -> str:
    return "-" if value is None else format(value, spec)


# ---------------------------------------------------------------------- command line
