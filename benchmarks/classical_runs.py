"""Train one experiment over several seeds, export artifacts and test the claim against the
best constant control.

Usage::

    python benchmarks/classical_runs.py experiments/assembly.toml --seeds 0 1 2 \
        --sweep experiments/results/assembly_sweep.json [--jobs 2] [--set train.iterations=5] \
        [--out runs/assembly_study] [--table experiments/results/assembly_trained.md]

For each seed it runs ``controlmd run EXPERIMENT --seed s --out OUT/seed<s>`` (in-process,
``--jobs`` at a time, one torch thread each); the task's ``finish_run`` hook writes the
extended XYZ of fresh final replicas and a snapshot figure into each run folder. It writes ``OUT/summary.json``, ``OUT/metric_vs_iteration.png`` (held-out metric vs
iteration and vs MD steps, every seed), ``OUT/protocols.png`` (trained u(t) of every seed
with the best constant) and a markdown table (``--table``).

Paired change: every seed scores its initial and its final protocol on the same fresh
replicas, so ``mean_s(m_s - m0_s)`` with its standard error over seeds measures what training
changed (the gain over the best constant when the protocol starts there).

Claim test: with ``m_s`` the final metric of seed ``s`` (each scored on the experiment's
``final_replicas`` fresh replicas) and ``c +- se_c`` the best constant of the sweep, the
difference ``mean_s(m_s) - c`` is divided by ``sqrt(se_seeds^2 + se_c^2)`` where
``se_seeds`` is the standard error over seeds (or the pooled evaluation error when it is
larger).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any


def _train(args: tuple[str, list[str], int, str]) -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from controlmd.config import load_config
    from controlmd.experiment import run_experiment

    path, overrides, seed, out = args
    cfg = load_config(path, overrides, seed=seed)
    t0, c0 = time.perf_counter(), time.process_time()
    result = run_experiment(cfg, out=out, progress=False)
    # the task's finish_run hook wrote these during run_experiment
    artifacts = [
        str(p)
        for p in (Path(out) / "final_replicas.xyz", Path(out) / "final_snapshots.png")
        if p.exists()
    ]
    return {
        "seed": seed,
        "run_dir": str(result.run_dir),
        "metrics": result.metrics,
        "artifacts": artifacts,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "load_avg": os.getloadavg(),
    }


def _finished(run_dir: str) -> dict[str, Any]:
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    artifacts = [
        str(p)
        for p in (Path(run_dir) / "final_replicas.xyz", Path(run_dir) / "final_snapshots.png")
        if p.exists()
    ]
    return {
        "seed": metrics["seed"],
        "run_dir": run_dir,
        "metrics": metrics,
        "artifacts": artifacts,
        "wall_s": metrics["wall_s"],
        "cpu_s": float("nan"),
        "load_avg": None,
    }


def _progress(run_dir: str) -> list[dict[str, Any]]:
    path = Path(run_dir) / "progress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    parser.add_argument(
        "--sweep", help="JSON written by benchmarks/constant_sweep.py (best constant)"
    )
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", help="folder of the seed runs (default: runs/<experiment>_study)")
    parser.add_argument("--table", help="markdown table to write (default: OUT/summary.md)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="summarize seeds whose OUT/seed<s>/metrics.json exists instead of retraining them",
    )
    args = parser.parse_args(argv)

    from controlmd.config import load_config

    cfg = load_config(args.experiment, args.overrides)
    name = cfg["experiment"]["name"]
    out = Path(args.out) if args.out else Path("runs") / f"{name}_study"
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(args.experiment, args.overrides, s, str(out / f"seed{s}")) for s in args.seeds]
    done = {
        j[2]: _finished(j[3]) for j in jobs if args.reuse and (Path(j[3]) / "metrics.json").exists()
    }
    todo = [j for j in jobs if j[2] not in done]
    t0 = time.perf_counter()
    if args.jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            fresh = list(pool.map(_train, todo))
    else:
        fresh = [_train(j) for j in todo]
    runs = sorted([*done.values(), *fresh], key=lambda r: r["seed"])
    wall = time.perf_counter() - t0 if fresh else float("nan")

    finals = [r["metrics"]["metric_final"] for r in runs]
    eval_se = [r["metrics"]["metric_final_se"] for r in runs]
    n = len(finals)
    mean = sum(finals) / n
    se_seeds = (
        math.sqrt(sum((f - mean) ** 2 for f in finals) / (n - 1) / n) if n > 1 else float("nan")
    )
    se_pooled = math.sqrt(sum(s * s for s in eval_se)) / n
    se = max(se_seeds, se_pooled) if n > 1 else se_pooled
    summary: dict[str, Any] = {
        "experiment": name,
        "task": runs[0]["metrics"]["task"],
        "metric_name": runs[0]["metrics"]["metric_name"],
        "protocol_kind": runs[0]["metrics"]["protocol_kind"],
        "estimator": runs[0]["metrics"]["estimator"],
        "seeds": args.seeds,
        "metric_final_mean": mean,
        "metric_final_se": se,
        "se_over_seeds": se_seeds,
        "se_pooled_eval": se_pooled,
        "metric_initial_mean": sum(r["metrics"]["metric_initial"] for r in runs) / n,
        "md_steps_per_seed": [r["metrics"]["md_steps"] for r in runs],
        "wall_s_per_seed": [r["metrics"]["wall_s"] for r in runs],
        "wall_s_total": wall,
        "jobs": args.jobs,
        "runs": [
            {k: r[k] for k in ("seed", "run_dir", "artifacts")}
            | {
                "metric_initial": r["metrics"]["metric_initial"],
                "metric_final": r["metrics"]["metric_final"],
                "metric_final_se": r["metrics"]["metric_final_se"],
                "md_steps": r["metrics"]["md_steps"],
                "wall_s": r["metrics"]["wall_s"],
                "cpu_s": r["cpu_s"],
                "load_avg_after": r["load_avg"],
            }
            for r in runs
        ],
        "command": "python benchmarks/classical_runs.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "load_avg_end": list(os.getloadavg()),
    }
    # Paired test: the initial and the final protocol of a seed are scored on the same
    # fresh replicas (common random numbers), so final - initial is a low-noise estimate of
    # what training changed (the gain over the best constant when training starts there).
    gains = [r["metrics"]["metric_final"] - r["metrics"]["metric_initial"] for r in runs]
    gain = sum(gains) / n
    gain_se = (
        math.sqrt(sum((g - gain) ** 2 for g in gains) / (n - 1) / n) if n > 1 else float("nan")
    )
    summary["paired_gain_mean"] = gain
    summary["paired_gain_se"] = gain_se
    summary["paired_gain_z"] = gain / gain_se if gain_se > 0 else float("nan")
    if args.sweep and not Path(args.sweep).exists():
        print(f"warning: --sweep {args.sweep} does not exist; no comparison with the best constant")
    elif args.sweep:
        sweep = json.loads(Path(args.sweep).read_text())
        best = sweep["baselines"]["best_constant"]
        z = (mean - best["mean"]) / math.hypot(se, best["se"])
        summary["best_constant"] = {"value": best["value"], "mean": best["mean"], "se": best["se"]}
        summary["z_vs_best_constant"] = z
        summary["beats_best_constant_by_3se"] = bool(z >= 3)
        summary["ratio_to_best_constant"] = mean / best["mean"] if best["mean"] > 0 else None
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = Path(args.table) if args.table else out / "summary.md"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(_markdown(summary))
    _plot_progress(runs, out / "metric_vs_iteration.png", summary)
    _plot_protocols(runs, out / "protocols.png", summary, cfg)
    print(_markdown(summary))
    return 0


def _markdown(s: dict[str, Any]) -> str:
    lines = [
        f"{s['task']}: {s['protocol_kind']} protocol, estimator {s['estimator']}, seeds {s['seeds']}",
        "",
        "| seed | metric before | metric after | SE | MD steps | wall s | CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in s["runs"]:
        lines.append(
            f"| {r['seed']} | {r['metric_initial']:.4f} | {r['metric_final']:.4f} | "
            f"{r['metric_final_se']:.4f} | {r['md_steps']:.3g} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |"
        )
    lines += [
        "",
        f"Mean over seeds: {s['metric_final_mean']:.4f} +- {s['metric_final_se']:.4f} "
        f"(SE over seeds {s['se_over_seeds']:.4f}, pooled evaluation SE {s['se_pooled_eval']:.4f}).",
    ]
    lines.append(
        f"Paired change final - initial (same replicas per seed): {s['paired_gain_mean']:+.4f} "
        f"+- {s['paired_gain_se']:.4f} over seeds ({s['paired_gain_z']:+.1f} SE)."
    )
    if "best_constant" in s:
        b = s["best_constant"]
        lines.append(
            f"Best constant ({b['value']:.4g}): {b['mean']:.4f} +- {b['se']:.4f}; difference "
            f"{s['z_vs_best_constant']:.1f} SE (claim >= 3 SE: {s['beats_best_constant_by_3se']}); "
            f"ratio {s['ratio_to_best_constant']:.2f}."
        )
    lines += [
        "",
        f"Command: `{s['command']}` (total wall {s['wall_s_total']:.0f} s, "
        f"{s['jobs']} job(s); load average at the end {s['load_avg_end'][0]:.1f}, "
        f"{s['load_avg_end'][1]:.1f}, {s['load_avg_end'][2]:.1f} on 2 cores)",
        "",
    ]
    return "\n".join(lines)


def _plot_progress(runs: list[dict[str, Any]], path: Path, s: dict[str, Any]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_it, ax_md = fig.subplots(1, 2)
    for r in runs:
        rows = [row for row in _progress(r["run_dir"]) if "outcome/metric" in row]
        it = [row["step"] for row in rows]
        m = [row["outcome/metric"] for row in rows]
        e = [row.get("outcome/metric_se", 0.0) for row in rows]
        md = [row["budget/md_steps"] for row in rows]
        ax_it.errorbar(it, m, yerr=e, fmt="o-", ms=3, capsize=2, label=f"seed {r['seed']}")
        ax_md.plot(md, m, "o-", ms=3, label=f"seed {r['seed']}")
    if "best_constant" in s:
        b = s["best_constant"]
        for ax in (ax_it, ax_md):
            ax.axhspan(b["mean"] - b["se"], b["mean"] + b["se"], color="0.85")
            ax.axhline(b["mean"], color="0.4", ls="--", label="best constant")
    ax_it.set_xlabel("iteration")
    ax_md.set_xlabel("MD replica-steps")
    ax_md.set_xscale("log")
    for ax in (ax_it, ax_md):
        ax.set_ylabel(f"{s['metric_name']} (held-out)")
        ax.grid(alpha=0.3)
    ax_it.legend(fontsize="small")
    fig.suptitle(f"{s['task']}: {s['protocol_kind']} ({s['estimator']})", fontsize=9)
    fig.savefig(path, dpi=120)


def _plot_protocols(
    runs: list[dict[str, Any]], path: Path, s: dict[str, Any], cfg: dict[str, Any]
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from controlmd.protocols import load_protocol

    protocols = [load_protocol(Path(r["run_dir"]) / "protocol.pt") for r in runs]
    k = protocols[0].dim
    fig = Figure(figsize=(5.5, 2.4 * k + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(k, 1, squeeze=False)[:, 0]
    for r, p in zip(runs, protocols):
        t, u = p.sample(400)
        for j, ax in enumerate(axes):
            ax.plot(t.numpy(), u[:, j].numpy(), label=f"seed {r['seed']}")
    if "best_constant" in s and k == 1:
        axes[0].axhline(s["best_constant"]["value"], color="0.4", ls="--", label="best constant")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    axes[-1].set_xlabel("t")
    fig.suptitle(f"{s['task']}: trained protocols", fontsize=9)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
