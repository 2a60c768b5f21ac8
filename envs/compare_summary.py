"""Learning curves, the sample-efficiency ratio and the reports (table, plot) of a
comparison; see :mod:`controlmd_envs.compare` for the outputs they fill."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from controlmd.tasks.base import Task
from controlmd_envs.compare_config import Config

__all__ = [
    "BOOTSTRAP_SAMPLES",
    "TARGET_FRACTION",
    "Curve",
    "efficiency_lines",
    "first_reach",
    "markdown_table",
    "mean_curve",
    "plot_comparison",
    "sample_efficiency",
    "summarize",
]

TARGET_FRACTION = 0.9
"""A baseline's score ``S_m``: the start plus this fraction of its own final gain."""
BOOTSTRAP_SAMPLES = 1000
"""Resamples of the seeds in the sample-efficiency confidence interval."""

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


def _start_value_text(start: dict[str, Any] | None) -> str:
    if start is None:
        return ""
    return (
        f" The task's start value (docs, env info): {start['mean']:.4g} ± {start['se']:.2g} on "
        f"{start['replicas']} replicas seeded {start['seed']}."
    )


def summarize(
    cfg: Config,
    task: Task,
    runs: dict[str, list[dict[str, Any]]],
    *,
    m0: float,
    m0_final: float,
    m0_exact: float | None = None,
    start: dict[str, Any] | None = None,
    jobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The content of ``comparison.json``: jobs, learning curves, runs, summaries per
    method and the sample efficiency of the gradient method against each baseline.

    :param runs: per method the finished runs (``metrics.json`` records; may be empty).
    :param m0: the starting protocol's metric on the curve-evaluation replicas.
    :param m0_final: the same on the final-evaluation replicas.
    :param m0_exact: its noise-free metric, where the task has ``exact_metric``.
    :param start: the task's documented start value
        (:meth:`~controlmd_envs.start_value.StartValue.as_dict`; the envs' final-step
        ``info["start_value"]``).
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
        "start_value": start,
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
        + ("." if result.get("m0_exact") is None else f", {result['m0_exact']:.4g} exact.")
        + _start_value_text(result.get("start_value")),
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
