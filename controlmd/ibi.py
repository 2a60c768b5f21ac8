"""Iterative Boltzmann inversion (IBI): the standard baseline for fitting a pair potential to
a target RDF (Reith, Pütz & Müller-Plathe, J. Comput. Chem. 24, 1624 (2003)).

Units: reduced LJ units (distances in sigma, energies in epsilon, kT an energy).

Update rule (on the knots ``r_j`` of a tabulated pair potential, the last knot being the
cutoff):

    u_0(r)     = -kT ln g*(r)                                   (potential of mean force)
    u_{n+1}(r) = u_n(r) + alpha kT ln( g_n(r) / g*(r) )

``g*`` is the target, ``g_n`` the histogram RDF sampled with ``u_n``; ``alpha`` in (0, 1]
damps the update. Three details make it work on short, noisy runs:

- *Core.* Where either RDF is below ``g_floor`` the logarithm is undefined; the update is
  applied only on knots where both exceed it. Inside the core (left of the first such knot)
  the potential is continued linearly with the slope of its first two valid knots, made at
  least ``min_core_force`` steep, so particles never tunnel into an unsampled region.
- *Noise.* The update ``alpha kT ln(g_n/g*)`` is smoothed with a (1, 2, 1)/4 kernel
  (``smooth`` passes) before it is added.
- *Cutoff.* The potential is shifted after each update so that ``u(r_c) = 0``.

Driver: :func:`run_ibi` runs IBI on the engine of the ``rdf_inverse`` task: the same box,
Nosé–Hoover dynamics, continued states and target as the gradient fit, with a
:class:`~controlmd.potentials.tabulated.TabulatedPair` (natural cubic spline) on the knots
``r_k`` = the centres of histogram bins of width ``bin_width`` up to the task's ``r_cut``,
plus ``r_cut`` (the table's cutoff). Each iteration samples
one rollout of ``n_burn + n_sample`` steps per replica (no gradient), pools the histogram
RDF over replicas and frames, and updates the table. The task counts every MD step, so
``history`` gives the RDF error against the MD replica-steps spent, comparable with a
gradient run's ``history.json``.

Experiment files (``controlmd ibi experiments/rdf_ibi.toml``)::

    [experiment]  name, seed = 0, notes = ""
    [task]        name = "rdf_inverse" + its arguments (state point, target, RDF bins,
                  rollout lengths; potential/init/learn are not used)
    [ibi]         iterations, replicas, alpha, smooth, g_floor, min_core_force, interpolation,
                  bin_width
    [eval]        replicas, frames (final pooled evaluation), final_replicas (the exact
                  metric on fresh replicas, as the trainer reports it)
    [logging]     tensorboard

The run folder ``runs/<name>/<YYYYmmdd-HHMMSS>_seed<k>/`` receives ``config.toml``,
``metrics.json`` (``method = "ibi"``), ``progress.jsonl``, ``tb/``, ``history.json``,
``potential.pt`` and the task's plots (``rdf.png``, ``u_r.png``, ``loss.png``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from controlmd._validation import check_choice, check_int, check_positive
from controlmd.checkpoint import json_safe
from controlmd.config import (
    EXPERIMENT_KEYS,
    Field,
    at_least,
    build_task,
    in_range,
    load_file,
    non_negative,
    positive,
    resolve_sections,
    resolve_task_section,
    write_config,
)
from controlmd.errors import ConfigError, ControlMDError
from controlmd.numerics import interp

Tensor = torch.Tensor

__all__ = [
    "IBIResult",
    "compare_runs",
    "ibi_initial_potential",
    "ibi_update",
    "load_ibi_config",
    "run_ibi",
    "run_ibi_experiment",
]

IBI_KEYS: dict[str, Field] = {
    "iterations": Field(int, 40, non_negative, doc="IBI updates"),
    "replicas": Field(int, 8, at_least(1), doc="replicas sampled per update"),
    "alpha": Field(float, 0.5, in_range(0.0, 1.0), doc="damping of the update"),
    "smooth": Field(int, 1, non_negative, doc="(1, 2, 1)/4 smoothing passes of the update"),
    "g_floor": Field(float, 1e-3, positive, doc="RDF values below it are not inverted"),
    "min_core_force": Field(float, 20.0, positive, doc="least slope of the core continuation"),
    "interpolation": Field(str, "cubic", choices=("cubic", "linear")),
    "bin_width": Field(float, 0.02, positive, doc="knot spacing of the table"),
}
IBI_EVAL_KEYS: dict[str, Field] = {
    "replicas": Field(int, 8, at_least(1), doc="replicas of the final pooled RDF evaluation"),
    "frames": Field(int, 200, at_least(1), doc="frames per replica of that evaluation"),
    "final_replicas": Field(int, 16, at_least(1), doc="fresh replicas of the exact metric"),
}
IBI_LOGGING_KEYS: dict[str, Field] = {"tensorboard": Field(bool, True)}
IBI_SECTIONS: dict[str, dict[str, Field]] = {
    "experiment": EXPERIMENT_KEYS,
    "ibi": IBI_KEYS,
    "eval": IBI_EVAL_KEYS,
    "logging": IBI_LOGGING_KEYS,
}


def ibi_initial_potential(
    r: Tensor, g_target: Tensor, *, kT: float, g_floor: float = 1e-3, min_core_force: float = 20.0
) -> Tensor:
    """Potential of mean force ``-kT ln g*(r)`` on the knots, core-extrapolated and shifted.

    :param r: knots ``[M]`` (sigma), uniform and increasing; ``r[-1]`` is the cutoff.
    :param g_target: target RDF on the knots ``[M]``.
    :param kT: temperature (energy).
    :param g_floor: below this g the logarithm is not taken (core region).
    :param min_core_force: smallest repulsive slope -du/dr (epsilon/sigma) of the core
        continuation.
    :return: ``u_0`` on the knots ``[M]`` (epsilon), ``u_0(r[-1]) = 0``.
    """
    _check_grid(r, g_target, "g_target")
    check_positive("kT", kT)
    valid = g_target > g_floor
    u = torch.zeros_like(r)
    u[valid] = -kT * torch.log(g_target[valid])
    return _finish(r, u, valid, min_core_force)


def ibi_update(
    r: Tensor,
    u: Tensor,
    g_sim: Tensor,
    g_target: Tensor,
    *,
    kT: float,
    alpha: float = 1.0,
    g_floor: float = 1e-3,
    smooth: int = 1,
    min_core_force: float = 20.0,
) -> Tensor:
    """One IBI step ``u + alpha kT ln(g_sim / g_target)`` (see the module docstring).

    :param r: knots ``[M]`` (sigma), uniform and increasing; ``r[-1]`` is the cutoff.
    :param u: current potential on the knots ``[M]`` (epsilon).
    :param g_sim: RDF sampled with ``u`` on the knots ``[M]``.
    :param g_target: target RDF on the knots ``[M]``.
    :param kT: temperature (energy).
    :param alpha: damping in (0, 1].
    :param g_floor: knots where either RDF is <= this are not updated (core).
    :param smooth: number of (1, 2, 1)/4 smoothing passes over the update.
    :param min_core_force: smallest repulsive slope of the core continuation.
    :return: the updated potential ``[M]``, shifted to 0 at the cutoff.
    """
    _check_grid(r, u, "u")
    _check_grid(r, g_sim, "g_sim")
    _check_grid(r, g_target, "g_target")
    check_positive("kT", kT)
    if not 0.0 < alpha <= 1.0:
        raise ControlMDError(f"alpha must be in (0, 1], got {alpha}")
    check_int("smooth", smooth, minimum=0)
    valid = (g_sim > g_floor) & (g_target > g_floor)
    du = torch.zeros_like(u)
    du[valid] = alpha * kT * torch.log(g_sim[valid] / g_target[valid])
    for _ in range(smooth):
        du = _smooth_masked(du, valid)
    return _finish(r, u + du, valid, min_core_force)


def _smooth_masked(x: Tensor, mask: Tensor) -> Tensor:
    """(1, 2, 1)/4 running mean over the masked entries (neighbours outside the mask ignored)."""
    w = mask.to(x.dtype)
    xm = x * w
    num = 2 * xm
    den = 2 * w
    num[1:] += xm[:-1]
    den[1:] += w[:-1]
    num[:-1] += xm[1:]
    den[:-1] += w[1:]
    return torch.where(mask, num / den.clamp_min(1e-300), x)


def _finish(r: Tensor, u: Tensor, valid: Tensor, min_core_force: float) -> Tensor:
    """Linear repulsive continuation left of the first valid knot, then ``u(r_c) = 0``."""
    idx = valid.nonzero().flatten()
    if idx.numel() < 2:
        raise ControlMDError(
            "IBI needs g(r) above g_floor on at least two knots; the target (or the sampled "
            "RDF) is zero almost everywhere: check the RDF range and the sampling"
        )
    i0 = int(idx[0])
    slope = (u[i0 + 1] - u[i0]) / (r[i0 + 1] - r[i0]) if bool(valid[i0 + 1]) else u.new_tensor(0.0)
    slope = torch.clamp(slope, max=-min_core_force)
    u = u.clone()
    u[:i0] = u[i0] + slope * (r[:i0] - r[i0])
    gap = ~valid
    gap[:i0] = False
    if bool(gap.any()):  # unsampled knots beyond the core: interpolate between neighbours
        ok = ~gap
        u[gap] = interp(r[gap], r[ok], u[ok])
    return u - u[-1]


def _check_grid(r: Tensor, values: Tensor, name: str) -> None:
    if r.ndim != 1 or r.numel() < 3:
        raise ControlMDError(f"r must be a 1-D grid of >= 3 knots, got shape {tuple(r.shape)}")
    if values.shape != r.shape:
        raise ControlMDError(
            f"{name} must have the grid's shape {tuple(r.shape)}, got {tuple(values.shape)}"
        )
    if not bool(torch.isfinite(values).all()):
        raise ControlMDError(f"{name} must be finite")


# --------------------------------------------------------------------------- driver


@dataclass
class IBIResult:
    """Outcome of :func:`run_ibi`.

    Attributes:
        r: table knots ``[M]`` (sigma).
        u: final table ``[M]`` (epsilon).
        u_initial: the potential of mean force it started from ``[M]``.
        history: per iteration: ``md_steps`` (cumulative replica-steps, equilibration
            included), ``rdf_mse`` (smeared RDF of that iteration's sampling vs the target)
            and ``rdf_hist_mse``.
    """

    r: Tensor
    u: Tensor
    u_initial: Tensor
    history: list[dict[str, float]]


def run_ibi(
    task: Any,
    *,
    iterations: int,
    replicas: int,
    seed: int = 0,
    alpha: float = 0.5,
    smooth: int = 1,
    g_floor: float = 1e-3,
    min_core_force: float = 20.0,
    interpolation: str = "cubic",
    bin_width: float = 0.02,
    logger: Any = None,
) -> IBIResult:
    """Iterative Boltzmann inversion on an :class:`~controlmd.tasks.rdf_inverse.RDFInverse` task.

    Replaces the task's pair potential by a table initialized with ``-kT ln g*`` and runs
    ``iterations`` sampling + update rounds (see the module docstring). The task keeps the
    final table (and records the iterate history, so its ``averaged_parameters`` and
    ``finish_run`` work as after a gradient fit).

    :param task: an ``rdf_inverse`` task.
    :param iterations: IBI updates.
    :param replicas: replicas sampled per iteration.
    :param seed: seed of the first (equilibrating) sampling.
    :param alpha, smooth, g_floor, min_core_force: see :func:`ibi_update`.
    :param interpolation: ``"cubic"`` or ``"linear"`` table interpolation.
    :param bin_width: spacing of the table knots and of the histogram RDF IBI samples
        (sigma); the knots are the histogram bin centres up to the task's ``r_cut``, plus
        ``r_cut`` itself.
    :param logger: optional :class:`controlmd.logger.Logger` (keys ``train/rdf_mse``,
        ``budget/md_steps``).
    """
    from controlmd.observables import rdf_histogram
    from controlmd.potentials.tabulated import TabulatedPair
    from controlmd.tasks.rdf_inverse import RDFInverse, make_pair_potential

    if not isinstance(task, RDFInverse):
        raise ControlMDError(f"run_ibi needs an rdf_inverse task, got {type(task).__name__}")
    check_int("iterations", iterations, minimum=0)
    check_int("replicas", replicas)
    check_choice("interpolation", interpolation, ["cubic", "linear"])
    check_positive("bin_width", bin_width)
    n_bins = math.floor(task.r_cut / bin_width + 1e-9)
    r_hist = n_bins * bin_width
    task.space.check_cutoff("IBI table range", r_hist)
    centers = (torch.arange(n_bins, dtype=torch.float64) + 0.5) * bin_width
    r = torch.cat([centers, torch.tensor([task.r_cut], dtype=torch.float64)])
    g_target = task.target_histogram(r)
    observables = {
        "ibi_hist": lambda s: rdf_histogram(s.R, task.space, r_max=r_hist, n_bins=n_bins)[1]
    }
    u = ibi_initial_potential(
        r, g_target, kT=task.kT, g_floor=g_floor, min_core_force=min_core_force
    )
    params: dict[str, Any] = {"r": r, "u": u, "interpolation": interpolation}
    spec = {
        "potential": "tabulated",
        "params": params,
        "learn": True,
        "r_cut": float(r[-1]),
        "shift": "energy",
    }
    table = make_pair_potential("tabulated", task.space, params=params, learn=True)
    if not isinstance(table, TabulatedPair):
        raise ControlMDError(f"IBI needs a tabulated pair potential, got {type(table).__name__}")
    task.set_potential(table, spec)
    u_initial = u.clone()
    for it in range(iterations):
        state = task.sample(
            replicas,
            seed + it,
            carry=True,
            n_sample=task.n_sample,
            gradient="none",
            observables=observables,
        )
        g_sim = state.aux["ibi_hist"].mean(dim=0).to(torch.float64)
        g_sim = torch.cat([g_sim, g_sim[-1:]])
        u = ibi_update(
            r,
            u,
            g_sim,
            g_target,
            kT=task.kT,
            alpha=alpha,
            g_floor=g_floor,
            smooth=smooth,
            min_core_force=min_core_force,
        )
        table.set_table(u)
        if logger is not None:
            last = task.history[-1]
            logger.record("train/rdf_mse", last["rdf_mse"])
            logger.record("train/rdf_hist_mse", last["rdf_hist_mse"])
            logger.record("budget/md_steps", last["md_steps"])
            logger.dump(it)
    return IBIResult(r, u, u_initial, list(task.history))


def load_ibi_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Read and validate an IBI experiment file (see the module docstring) through the
    common config path (:func:`controlmd.config.load_file`).

    :param overrides: ``section.key=value`` strings (TOML values), applied in order.
    :raises ConfigError: naming the file, section, key and value at fault.
    """
    return load_file(path, resolve_ibi_config, overrides, sections=(*IBI_SECTIONS, "task"))


def resolve_ibi_config(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Validate an IBI config dict and fill in the defaults; builds the task once."""
    cfg = resolve_sections(
        raw, IBI_SECTIONS, required=("experiment", "task", "ibi"), open_sections=("task",)
    )
    task = resolve_task_section(raw["task"])
    if task["name"] != "rdf_inverse":
        raise ConfigError(f"[task] name must be 'rdf_inverse' for IBI, got {task['name']!r}")
    cfg["task"] = task
    build_task(cfg)
    return cfg


def run_ibi_experiment(
    cfg: dict[str, dict[str, Any]], *, out: str | Path | None = None, runs_root: str | Path = "runs"
) -> tuple[Path, dict[str, Any]]:
    """Run an IBI experiment (a config from :func:`load_ibi_config`) into a run folder.

    :return: the run folder and the contents of its ``metrics.json``.
    """
    from controlmd.checkpoint import atomic_write_json
    from controlmd.evaluation import evaluate
    from controlmd.logger import JSONLinesSink, Logger, TensorBoardSink
    from controlmd.protocols import make_protocol
    from controlmd.rng import FINAL_SEED_OFFSET
    from controlmd.tasks.rdf_inverse import RDFInverse

    seed = cfg["experiment"]["seed"]
    torch.manual_seed(seed)
    task = build_task(cfg)
    if not isinstance(task, RDFInverse):
        raise ConfigError(f"[task] name must be 'rdf_inverse' for IBI, got {task.name!r}")
    if out is not None:
        run_dir = Path(out)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(runs_root) / cfg["experiment"]["name"] / f"{stamp}_seed{seed}"
    if (run_dir / "metrics.json").exists():
        raise ConfigError(f"{run_dir} already holds a run")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, run_dir / "config.toml")
    sinks: list[Any] = [JSONLinesSink(run_dir / "progress.jsonl")]
    if cfg["logging"]["tensorboard"]:
        sinks.append(TensorBoardSink(run_dir / "tb"))
    logger = Logger(sinks)
    t0 = time.perf_counter()
    ibi = cfg["ibi"]
    result = run_ibi(
        task,
        iterations=ibi["iterations"],
        replicas=ibi["replicas"],
        seed=seed,
        alpha=ibi["alpha"],
        smooth=ibi["smooth"],
        g_floor=ibi["g_floor"],
        min_core_force=ibi["min_core_force"],
        interpolation=ibi["interpolation"],
        bin_width=ibi["bin_width"],
        logger=logger,
    )
    train_steps = task.budget["train"] + task.budget["equilibrate"]
    ev = cfg["eval"]
    # the exact metric as the trainer reports it (fresh replicas, eval_steps sampled), same seeds
    no_control = make_protocol("none", t_final=task.horizon)
    initial = _with_table(
        task,
        result.u_initial,
        lambda: evaluate(task, no_control, ev["final_replicas"], seed + FINAL_SEED_OFFSET),
    )
    final = evaluate(task, no_control, ev["final_replicas"], seed + FINAL_SEED_OFFSET)
    final_eval = task.finish_run(run_dir, logger, step=ibi["iterations"])
    metrics = {
        **task.extras(),
        "experiment": cfg["experiment"]["name"],
        "task": task.name,
        "method": "ibi",
        "metric_name": task.metric_name,
        "higher_is_better": task.higher_is_better,
        "units": task.units,
        "metric_initial": initial.mean,
        "metric_initial_se": initial.se,
        "metric_final": final.mean,
        "metric_final_se": final.se,
        "eval_replicas": final.n,
        "md_steps": train_steps,
        "grad_steps": 0,
        "wall_s": time.perf_counter() - t0,
        "seed": seed,
        "iterations": ibi["iterations"],
        "replicas": ibi["replicas"],
        "final_evaluation": final_eval,
    }
    logger.record("outcome/metric", final.mean)
    logger.dump(ibi["iterations"])
    logger.close()
    atomic_write_json(run_dir / "metrics.json", json_safe(metrics))
    return run_dir, metrics


def _with_table(task: Any, u: Tensor, fn: Any) -> Any:
    """Call ``fn()`` with the task's table temporarily set to ``u``."""
    table = task.pair
    saved = table.values.detach().clone()
    table.set_table(u)
    try:
        return fn()
    finally:
        table.set_table(saved)


def compare_runs(
    run_dirs: Sequence[str | Path],
    *,
    levels: Sequence[float] = (1e-3, 3e-4),
    window: int = 5,
    png: str | Path | None = None,
) -> list[dict[str, Any]]:
    """RDF error against MD steps for finished ``rdf_inverse`` runs (gradient or IBI).

    Reads each run's ``history.json`` (per training rollout or IBI round: cumulative MD
    replica-steps, equilibration included, and the smeared-RDF MSE of that rollout's own
    sampling; the same replicas and frames per rollout give both methods the same noise
    floor) and ``metrics.json``. The error is smoothed by a running mean over ``window``
    rollouts (a mean, not a median: an optimizer that alternates between a good and a bad
    iterate must not be credited with the good one alone). Returns one summary per run:
    method, MD steps at which the smoothed error first falls below each of ``levels``, the
    smoothed error at the end, the final pooled error (``final_evaluation``), total MD
    steps and wall time. Writes a log-log figure of the smoothed curves to ``png``.
    """
    check_int("window", window)
    out: list[dict[str, Any]] = []
    curves = []
    for d in map(Path, run_dirs):
        history = json.loads((d / "history.json").read_text(encoding="utf-8"))
        m = json.loads((d / "metrics.json").read_text(encoding="utf-8"))
        steps = [h["md_steps"] for h in history]
        raw = torch.tensor([h["rdf_mse"] for h in history], dtype=torch.float64)
        smooth = [float(raw[max(0, i - window + 1) : i + 1].mean()) for i in range(raw.numel())]
        row: dict[str, Any] = {
            "run": str(d),
            "method": m.get("method"),
            "experiment": m.get("experiment"),
            "md_steps": steps[-1] if steps else 0,
            "wall_s": m.get("wall_s"),
            "smoothed_rdf_mse_end": smooth[-1] if smooth else None,
            "final_rdf_mse": (m.get("final_evaluation") or {}).get("rdf_mse"),
        }
        for level in levels:
            row[f"md_steps_to_{level:g}"] = next(
                (st for st, e in zip(steps, smooth) if e <= level), None
            )
        out.append(row)
        curves.append((f"{m.get('experiment')} ({m.get('method')}, {d.name})", steps, smooth))
    if png is not None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.5, 4.2), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for label, steps, err in curves:
            ax.loglog(steps, err, label=label)
        ax.set_xlabel("MD replica-steps (training, equilibration included)")
        ax.set_ylabel(f"smeared RDF MSE per rollout (running mean of {window})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="x-small")
        fig.savefig(png, dpi=120)
    return out
