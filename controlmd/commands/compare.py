"""``controlmd compare``: gradient vs PPO, SAC, CMA-ES and random search at equal MD-step
budget (gymnasium and SB3 are imported when it runs, never by the core).

::

    controlmd compare EXPERIMENT.toml [--out DIR] [--set section.key=value ...] [--resume DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from controlmd.commands._common import add_set_option
from controlmd.runner import add_runner_arguments

HELP = "gradient vs PPO, SAC, CMA-ES and random search at equal MD-step budget"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "experiment",
        nargs="?",
        type=Path,
        help="comparison TOML file, e.g. experiments/trap_drag_compare.toml (not with --resume)",
    )
    p.add_argument(
        "--out", type=Path, help="output folder (default: runs/<experiment>/<YYYYmmdd-HHMMSS>/)"
    )
    add_set_option(p, "compare.seeds=2")
    p.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="re-run the failed and unfinished runs of the comparison in DIR",
    )
    p.add_argument(
        "--quiet", action="store_true", help="no progress lines (failed runs are still reported)"
    )
    add_runner_arguments(p)


def run(args: argparse.Namespace) -> int:
    from controlmd.errors import ControlMDError
    from controlmd.runner import runner_options

    try:
        from controlmd_envs.compare import main_compare
    except ImportError as exc:
        raise ControlMDError(
            f"controlmd compare needs the RL extra (pip install 'controlmd[rl]'): {exc}"
        ) from None
    return main_compare(
        args.experiment,
        out=args.out,
        overrides=args.overrides,
        resume=args.resume,
        progress=not args.quiet,
        **runner_options(args),
    )
