"""Running independent jobs: locally or on Ray, into a folder of job folders, with resume.

Every multi-job command (``controlmd sweep``, ``controlmd compare``, ``controlmd run
--seeds K``) goes through this module:

* :func:`run_jobs` runs a list of :class:`Job` (a module-level function and picklable
  arguments) as Ray tasks when Ray is installed (a local instance, or ``--address`` to join
  a cluster), else one after another in this process; a job that raises, or whose worker
  dies, is reported as failed and the others go on.
* :func:`run_folder_jobs` runs jobs that each own a folder ``out_dir/<name>/`` and are done
  when their result file exists (written atomically, last): a resumed command runs only
  the jobs not done; a failed job's traceback is written to ``<name>/error.txt`` (removed
  when the job later succeeds).
* :func:`add_runner_arguments` / :func:`runner_options`: the CLI options of both.

Results never depend on where a job ran: each job is seeded by its own arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlmd._validation import check_choice, check_int
from controlmd.errors import ConfigError, ControlMDError
from controlmd.files import atomic_write_text

__all__ = [
    "ERROR_FILE",
    "RUNNER_BACKENDS",
    "FolderRun",
    "Job",
    "JobResult",
    "add_runner_arguments",
    "job_reporter",
    "new_output_dir",
    "ray_available",
    "ray_session",
    "read_result",
    "run_folder_jobs",
    "run_jobs",
    "runner_options",
    "runner_session",
]

RUNNER_BACKENDS = ("auto", "ray", "local")
ERROR_FILE = "error.txt"
"""Written into a failed job's folder: the traceback that ended it."""


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


def read_result(job_dir: Path, name: str = "metrics.json") -> dict[str, Any] | None:
    """A job's result file (written atomically, last), or ``None`` while the job is not done."""
    try:
        return json.loads((job_dir / name).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@dataclass(frozen=True)
class FolderRun:
    """What :func:`run_folder_jobs` did: the jobs done (now or before), the ones not done,
    and the error text of those that failed this time."""

    done: list[str]
    missing: list[str]
    errors: dict[str, str]


def run_folder_jobs(
    out_dir: Path,
    jobs: Sequence[Job],
    *,
    result_file: str,
    describe: Callable[[JobResult], str],
    say: Callable[[str], None],
    what: str,
    create: Callable[[], None] | None = None,
    prepare: Callable[[], None] | None = None,
    address: str | None = None,
    backend: str = "auto",
    num_cpus: int | None = None,
    cpus_per_job: int = 1,
) -> FolderRun:
    """Run the jobs of ``out_dir`` whose folder ``out_dir/<job.name>`` has no ``result_file``.

    The runner options are validated (and Ray connected) before anything is written; then
    ``create()`` (a new command writes its plan files; ``None`` on resume) and ``prepare()``
    (work shared by the jobs, e.g. a common start evaluation) run, and the jobs not done
    are run. A failed job's traceback goes to ``<name>/error.txt``; a job that succeeds
    removes an old one. Interrupting (Ctrl-C) stops the remaining jobs.

    :param jobs: every job of the command (done ones are skipped); names are folder names
        relative to ``out_dir``.
    :param result_file: the file whose presence marks a job done.
    :param describe: one-line summary of a job that succeeded (progress lines).
    :param say: where progress lines go.
    :param what: the command's noun for its output, e.g. ``"sweep"`` (progress lines).
    """
    todo = [job for job in jobs if read_result(out_dir / job.name, result_file) is None]
    errors: dict[str, str] = {}
    base_report = job_reporter(len(jobs), len(jobs) - len(todo), say, describe, errors)

    def report(result: JobResult) -> None:
        error_path = out_dir / result.name / ERROR_FILE
        if result.ok:
            error_path.unlink(missing_ok=True)
        else:
            atomic_write_text(error_path, result.error or "failed\n")
        base_report(result)

    with runner_session(
        address=address,
        backend=backend,
        num_cpus=num_cpus,
        cpus_per_job=cpus_per_job,
        needed=bool(todo),
    ) as use_ray:
        if create is not None:
            create()
        if prepare is not None:
            prepare()
        where = "on Ray" if use_ray else "in this process"
        say(
            f"{what} {out_dir}: {len(jobs)} jobs, {len(jobs) - len(todo)} done, "
            f"{len(todo)} to run {where}"
        )
        if todo:
            run_jobs(
                todo,
                address=address,
                backend=backend,
                num_cpus=num_cpus,
                cpus_per_job=cpus_per_job,
                on_result=report,
            )
    done = [j.name for j in jobs if read_result(out_dir / j.name, result_file) is not None]
    missing = [j.name for j in jobs if j.name not in set(done)]
    return FolderRun(done, missing, errors)
