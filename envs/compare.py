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

import json
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from controlmd.checkpoint import atomic_write_json, atomic_write_text
from controlmd.config import write_config
from controlmd.errors import ConfigError, ControlMDError
from controlmd.evaluation import Evaluation, evaluate
from controlmd.files import json_safe
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
    BudgetTracker,
    run_gradient,
    run_logger,
    run_sb3,
    run_search,
)
from controlmd_envs.compare_config import (
    COMPARE_KEYS,
    SEARCH_KEYS,
    Config,
    load_compare_config,
    resolve_compare_config,
)
from controlmd_envs.compare_summary import (
    efficiency_lines,
    first_reach,
    markdown_table,
    mean_curve,
    plot_comparison,
    sample_efficiency,
    summarize,
)
from controlmd_envs.start_value import start_value

__all__ = [
    "COMPARE_KEYS",
    "ComparisonRun",
    "efficiency_lines",
    "first_reach",
    "load_compare_config",
    "main_compare",
    "markdown_table",
    "mean_curve",
    "resolve_compare_config",
    "run_compare_job",
    "run_comparison",
    "sample_efficiency",
    "summarize",
    "summarize_folder",
]

# ---------------------------------------------------------------------------------- running


_RUN_ONLY_KEYS = ("task", "metric_name", "settings")
"""Keys of a run's ``metrics.json`` that ``comparison.json`` keeps once, not per run."""
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
    record = json_safe(
        {
            "method": method,
            "algo": spec["algo"],
            "seed": seed,
            **tracker.summary(),
            "exact_final": _exact_metric(task, final),
            "task": task.name,
            "metric_name": task.metric_name,
            "settings": spec,
        },
        fallback=str,
    )
    atomic_write_json(path / RESULT_FILE, record)  # last: marks the run done
    return record


def _plain(cfg: Config) -> Config:
    return json.loads(json.dumps(json_safe(cfg, fallback=str)))


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
        "start_value": start_value(task).as_dict(),
        "initial": asdict(initial),
    }
    atomic_write_json(out_dir / "start.json", start)
    return start


def _write_outputs(out_dir: Path, result: dict[str, Any]) -> None:
    atomic_write_json(out_dir / "comparison.json", json_safe(result, fallback=str))
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
        start=start.get("start_value"),
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
