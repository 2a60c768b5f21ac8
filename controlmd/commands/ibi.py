"""``controlmd ibi``: iterative Boltzmann inversion on the ``rdf_inverse`` task, and the
comparison of IBI with gradient fits.

::

    controlmd ibi EXPERIMENT.toml [--set section.key=value ...] [--out DIR] [--seed N]
    controlmd ibi compare RUN_DIR ... [--levels 1e-3 3e-4] [--window 5] [--png FILE]
"""

from __future__ import annotations

import argparse
import json

from controlmd.commands._common import add_set_option

HELP = "iterative Boltzmann inversion (rdf_inverse), or `ibi compare RUN...` of finished fits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "experiment", help="IBI experiment TOML file, or the word 'compare' followed by runs"
    )
    p.add_argument("runs", nargs="*", help="with 'compare': the run folders to compare")
    add_set_option(p, "ibi.alpha=0.3")
    p.add_argument("--out", default=None, help="run folder")
    p.add_argument("--seed", type=int, default=None, help="replace [experiment] seed")
    p.add_argument("--levels", type=float, nargs="+", default=[1e-3, 3e-4])
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--png", default=None)


def run(args: argparse.Namespace) -> int:
    from controlmd.ibi import compare_runs, load_ibi_config, run_ibi_experiment

    if args.experiment == "compare":
        result = compare_runs(args.runs, levels=args.levels, window=args.window, png=args.png)
        print(json.dumps(result, indent=1))
        return 0
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"experiment.seed={args.seed}")
    cfg = load_ibi_config(args.experiment, overrides)
    run_dir, metrics = run_ibi_experiment(cfg, out=args.out)
    fe = metrics.get("final_evaluation") or {}
    nan = float("nan")
    print(
        f"IBI: rdf_mse {fe.get('rdf_mse_initial', nan):.3g} -> {fe.get('rdf_mse', nan):.3g} "
        f"(smeared, pooled), metric {metrics['metric_initial']:.3g} -> "
        f"{metrics['metric_final']:.3g}, {metrics['md_steps']} MD replica-steps, "
        f"{metrics['wall_s']:.0f} s"
    )
    print(f"run folder: {run_dir}")
    return 0
