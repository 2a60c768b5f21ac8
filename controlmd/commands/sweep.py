"""``controlmd sweep``: a grid of settings x seeds as independent jobs (Ray when installed).

::

    controlmd sweep EXPERIMENT.toml --grid train.lr=0.003,0.01 [--seeds 3] [--address auto]
    controlmd sweep --resume DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from controlmd.commands._common import add_set_option
from controlmd.runner import add_runner_arguments

HELP = "train a grid of settings x seeds as independent jobs (Ray when installed)"


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    add_set_option(p)
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


def run(args: argparse.Namespace) -> int:
    """Exit status 0 when every job is done, 1 otherwise."""
    from controlmd.runner import runner_options
    from controlmd.sweep import run_sweep

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
