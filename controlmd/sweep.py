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

Where jobs run (:func:`run_jobs`): with ``ray`` installed (the ``dist`` extra) each job is
a Ray task with ``cpus_per_job`` CPUs; ``--address auto`` (or ``host:port``, ``ray://...``)
joins a running cluster, the default starts a local one sized to the machine (or to
``--num-cpus``). Without ``ray``, or with ``--local``, jobs run one after another in this
process. Results do not depend on where a job ran: each is seeded by its config alone.
``controlmd compare`` (:mod:`controlmd_envs.compare`) runs its (method, seed) runs through
the same :func:`run_jobs`, :func:`runner_session`, :func:`read_result` and
:func:`new_output_dir`.

Everything is validated before the sweep folder is created: grid keys must be keys of the
experiment schema (``[train]``/``[eval]``/``[logging]`` fields, or arguments of the task /
protocol), every job's config must resolve, and a Ray address must be reachable.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import re
import shutil
import socket
import sys
import time
import tomllib
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from controlmd._validation import check_choice, check_int
from controlmd.checkpoint import atomic_write_json, atomic_write_text
from controlmd.errors import ConfigError, ControlMDError

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


# ---------------------------------------------------------------------- generic job runner


@dataclass(frozen=True)
class Job:
    """One independent unit of work: ``fn(*args, **kwargs)``.

    :param name: unique label (reported back in :class:`JobResult`).
    :param fn: a module-level function (Ray pickles it by reference; workers import it).
    :param args: positional arguments (picklable).
    :param kwargs: keyword arguments (picklable).
    """

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobResult:
    """What became of a :class:`Job`: its return value, or the error that ended it.

    ``error`` is the job's traceback when it raised, or a line saying its worker process
    died (killed, out of memory); ``wall_s`` is measured where the job ran (``nan`` when
    its worker died).
    """

    name: str
    ok: bool
    value: Any = None
    error: str | None = None
    wall_s: float = math.nan


def ray_available() -> bool:
    """Whether ``ray`` can be imported (``pip install 'controlmd[dist]'``)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def run_jobs(
    jobs: Sequence[Job],
    *,
    address: str | None = None,
    backend: str = "auto",
    num_cpus: int | None = None,
    cpus_per_job: int = 1,
    on_result: Callable[[JobResult], None] | None = None,
) -> list[JobResult]:
    """Run independent jobs as Ray tasks, or one after another in this process.

    A job that raises, or whose worker dies, is reported as failed; the others go on.
    Ray does not retry failed tasks here (``max_retries=0``): re-running is the caller's
    decision (``controlmd sweep --resume``).

    :param jobs: the jobs (unique names).
    :param address: Ray cluster to join: ``"auto"`` (the cluster started by ``ray start`` on
        this machine), ``"host:port"`` or ``"ray://host:port"``. ``None``: start a local Ray
        instance for these jobs (and shut it down afterwards), unless this process is
        already connected to one.
    :param backend: ``"auto"`` (Ray when installed, else local), ``"ray"`` (error if Ray is
        missing) or ``"local"`` (sequential, in this process; ``address`` must be ``None``).
    :param num_cpus: CPUs of the local Ray instance (default: all of this machine's).
    :param cpus_per_job: CPUs reserved per Ray task (also its torch thread count).
    :param on_result: called with each :class:`JobResult` as it arrives (progress reports).
    :return: results in the order of ``jobs``.
    :raises ControlMDError: bad arguments, Ray missing for ``backend="ray"`` or an
        ``address``, or a Ray cluster that cannot be reached (nothing has run then).
    """
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ControlMDError(f"job names must be unique; repeated: {', '.join(dup)}")
    use_ray = _check_runner(
        address=address, backend=backend, num_cpus=num_cpus, cpus_per_job=cpus_per_job
    )
    if not use_ray:
        return _run_local(jobs, on_result)
    with ray_session(address, num_cpus):
        return _run_ray(jobs, cpus_per_job=cpus_per_job, on_result=on_result)


def _check_runner(
    *, address: str | None, backend: str, num_cpus: int | None, cpus_per_job: int
) -> bool:
    """Validate :func:`run_jobs`' placement options; returns whether jobs go to Ray."""
    check_choice("backend", backend, RUNNER_BACKENDS)
    check_int("cpus_per_job", cpus_per_job)
    if num_cpus is not None:
        check_int("num_cpus", num_cpus)
    if backend == "local":
        if address is not None:
            raise ControlMDError(
                f"address {address!r} needs Ray; backend 'local' runs in this process"
            )
        return False
    if not ray_available():
        if backend == "ray" or address is not None:
            why = f"address {address!r}" if address is not None else "backend 'ray'"
            raise ControlMDError(
                f"{why} needs Ray, which is not installed: pip install 'controlmd[dist]'"
            )
        return False
    if address is not None and num_cpus is not None:
        raise ControlMDError(
            f"num_cpus sizes a local Ray instance; the cluster at {address!r} has its own CPUs"
        )
    return True


@contextmanager
def runner_session(
    *,
    address: str | None,
    backend: str,
    num_cpus: int | None,
    cpus_per_job: int,
    needed: bool = True,
) -> Iterator[bool]:
    """Validate :func:`run_jobs`' options and, for Ray, connect before the block runs.

    A command that writes an output folder creates it inside this block, so a bad option or
    an unreachable cluster fails before anything is written. Yields whether jobs go to Ray.

    :param needed: whether there are jobs to run (no Ray session is started otherwise).
    """
    use_ray = _check_runner(
        address=address, backend=backend, num_cpus=num_cpus, cpus_per_job=cpus_per_job
    )
    with ray_session(address, num_cpus) if use_ray and needed else nullcontext():
        yield use_ray


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Connect to a Ray cluster (or start a local instance) for the duration of the block.

    Does nothing if this process is already connected; otherwise disconnects (and stops
    the local instance it started) on exit. Ray must be installed.

    :raises ControlMDError: an address that cannot be reached, or Ray failing to start.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if address is not None and address != "auto":
        _check_reachable(address)
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:
        options["include_dashboard"] = False
        if num_cpus is not None:
            options["num_cpus"] = num_cpus
    else:
        options["address"] = address
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = "a local Ray instance" if address is None else f"the Ray cluster at {address!r}"
        hint = (
            " (start one with `ray start --head`, or drop --address to start a local one)"
            if address
            else ""
        )
        raise ControlMDError(f"cannot connect to {where}: {exc}{hint}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _call(job: Job) -> tuple[bool, Any, str | None, float]:
    t0 = time.perf_counter()
    try:
        value = job.fn(*job.args, **job.kwargs)
    except Exception:
        return False, None, traceback.format_exc(), time.perf_counter() - t0
    return True, value, None, time.perf_counter() - t0


def _run_local(
    jobs: Sequence[Job], on_result: Callable[[JobResult], None] | None
) -> list[JobResult]:
    results = []
    for job in jobs:
        ok, value, error, wall = _call(job)
        result = JobResult(job.name, ok, value, error, wall)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _ray_call(job: Job, threads: int) -> tuple[bool, Any, str | None, float]:
    import torch

    torch.set_num_threads(threads)
    return _call(job)


def _run_ray(
    jobs: Sequence[Job], *, cpus_per_job: int, on_result: Callable[[JobResult], None] | None
) -> list[JobResult]:
    import ray

    remote = ray.remote(num_cpus=cpus_per_job, max_retries=0)(_ray_call)
    pending = {remote.remote(job, cpus_per_job): job for job in jobs}
    done: dict[str, JobResult] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            job = pending.pop(ref)
            try:
                ok, value, error, wall = ray.get(ref)
                result = JobResult(job.name, ok, value, error, wall)
            except ray.exceptions.RayError as exc:
                result = JobResult(
                    job.name, False, None, f"Ray worker died: {type(exc).__name__}: {exc}"
                )
            done[job.name] = result
            if on_result is not None:
                on_result(result)
    finally:
        for ref in pending:  # interrupted: do not leave tasks running on a shared cluster
            ray.cancel(ref, force=True)
    return [done[job.name] for job in jobs]


def job_reporter(
    total: int,
    done: int,
    say: Callable[[str], None],
    describe: Callable[[JobResult], str],
    errors: dict[str, str] | None = None,
) -> Callable[[JobResult], None]:
    """An ``on_result`` callback for :func:`run_jobs`: one line ``[k/total] name: ...`` per job.

    :param total: jobs in all (done before included); :param done: jobs already done.
    :param say: where the lines go.
    :param describe: the text after the name for a job that succeeded.
    :param errors: filled with name -> traceback of the jobs that failed.
    """
    count = [done]

    def report(result: JobResult) -> None:
        count[0] += 1
        if result.ok:
            say(f"[{count[0]}/{total}] {result.name}: {describe(result)}")
            return
        if errors is not None:
            errors[result.name] = result.error or "failed"
        last = (result.error or "failed").strip().splitlines()[-1]
        say(f"[{count[0]}/{total}] {result.name}: FAILED: {last}")

    return report


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a ``host:port`` nobody listens on (``ray.init`` would wait for minutes)."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ControlMDError(
            f"Ray address must be 'auto', 'host:port' or 'ray://host:port', got {address!r}"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ControlMDError(
            f"cannot reach the Ray cluster at {address!r}: {exc.strerror or exc} "
            "(is `ray start --head` running there, and is the port open?)"
        ) from None


def add_runner_arguments(p: argparse.ArgumentParser) -> None:
    """The options of :func:`run_jobs` for a subcommand (``sweep``, ``compare``)."""
    p.add_argument(
        "--address",
        metavar="ADDR",
        help="join a Ray cluster: 'auto' (the one `ray start` runs here), host:port or "
        "ray://host:port (default: start a local Ray instance)",
    )
    p.add_argument(
        "--num-cpus",
        type=int,
        metavar="N",
        help="CPUs of the local Ray instance (default: all of this machine's)",
    )
    p.add_argument(
        "--cpus-per-job", type=int, default=1, metavar="N", help="CPUs per job (default 1)"
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="run the jobs one after another in this process, even if Ray is installed",
    )


def runner_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`run_jobs` from :func:`add_runner_arguments`' options."""
    if args.local and args.address is not None:
        raise ConfigError("--local runs in this process; it cannot be combined with --address")
    return {
        "address": args.address,
        "backend": "local" if args.local else "auto",
        "num_cpus": args.num_cpus,
        "cpus_per_job": args.cpus_per_job,
    }


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
    jobs = []
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


def read_result(job_dir: Path, name: str = "metrics.json") -> dict[str, Any] | None:
    """A job's result file (written atomically, last), or ``None`` while the job is not done."""
    try:
        return json.loads((job_dir / name).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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
    todo = [job for job in jobs if read_result(sweep_dir / "jobs" / job.name) is None]
    say = echo or (lambda _line: None)
    errors: dict[str, str] = {}
    report = job_reporter(
        len(jobs),
        len(jobs) - len(todo),
        say,
        lambda r: f"{r.value['metric_name']} = {r.value['metric_final']:.6g} ({r.wall_s:.1f} s)",
        errors,
    )

    # Connect to Ray before the first file is written: an unreachable cluster leaves nothing behind.
    with runner_session(
        address=address,
        backend=backend,
        num_cpus=num_cpus,
        cpus_per_job=cpus_per_job,
        needed=bool(todo),
    ) as use_ray:
        if resume is None:
            sweep_dir.mkdir(parents=True, exist_ok=False)
            atomic_write_json(sweep_dir / SPEC_FILE, spec)
        where = "on Ray" if use_ray else "in this process"
        say(
            f"sweep {sweep_dir}: {len(jobs)} jobs, {len(jobs) - len(todo)} done, {len(todo)} to run {where}"
        )
        work = [
            Job(
                job.name,
                run_sweep_job,
                (configs[job.name], str((sweep_dir / "jobs" / job.name).resolve())),
            )
            for job in todo
        ]
        try:
            if work:
                run_jobs(
                    work,
                    address=address,
                    backend=backend,
                    num_cpus=num_cpus,
                    cpus_per_job=cpus_per_job,
                    on_result=report,
                )
        finally:
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


def new_output_dir(out: str | Path | None, default: Path, *, plan_file: str) -> Path:
    """The folder a new multi-job command writes to (not created here).

    :param out: the ``--out`` folder: it may exist only if empty.
    :param default: the folder used without ``--out`` (``_2``, ``_3``, ... appended if taken).
    :param plan_file: the file that marks a folder of this command (the error then hints at
        ``--resume``).
    :raises ConfigError: ``out`` exists and is not empty.
    """
    if out is not None:
        path = Path(out)
        if path.exists() and any(path.iterdir()):
            hint = f"; continue it with --resume {path}" if (path / plan_file).exists() else ""
            raise ConfigError(f"--out {path} exists and is not empty{hint}")
        if path.exists():
            path.rmdir()
        return path
    path, n = default, 1
    while path.exists():
        n += 1
        path = default.with_name(f"{default.name}_{n}")
    return path


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


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``controlmd sweep``."""
    p.add_argument(
        "experiment", nargs="?", type=Path, help="experiment TOML file (not needed with --resume)"
    )
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="SECTION.KEY=V1,V2,...",
        help="a sweep axis, e.g. --grid train.lr=0.003,0.01 (repeatable: Cartesian product)",
    )
    p.add_argument(
        "--seeds", type=int, help="seeds per setting: experiment.seed + 0 ... N-1 (default 1)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a value of the base config (repeatable)",
    )
    p.add_argument(
        "--out", type=Path, help="sweep folder (default: runs/<experiment>/sweep-<time>/)"
    )
    p.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="re-run the jobs of the sweep in DIR that are not done",
    )
    add_runner_arguments(p)


def sweep_command(args: argparse.Namespace) -> int:
    """``controlmd sweep``: exit status 0 when every job is done, 1 otherwise."""
    result = run_sweep(
        args.experiment,
        args.grid,
        seeds=args.seeds,
        overrides=args.overrides,
        out=args.out,
        resume=args.resume,
        **runner_options(args),
    )
    return 0 if not result.failed else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m controlmd.sweep ...`` (the same as ``controlmd sweep ...``)."""
    parser = argparse.ArgumentParser(
        prog="controlmd sweep", description="run a grid of experiments"
    )
    add_sweep_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return sweep_command(args)
    except ControlMDError as exc:
        print(f"controlmd sweep: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
