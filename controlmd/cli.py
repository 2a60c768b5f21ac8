"""The ``controlmd`` command.

::

    controlmd run EXPERIMENT.toml [--set section.key=value ...] [--out DIR] [--resume DIR] [--seed N]
    controlmd run EXPERIMENT.toml --seeds K                  (K seeds as independent jobs)
    controlmd eval RUN_DIR [--seeds N] [--replicas M] [--seed S] [--baseline SPEC] [--json FILE]
    controlmd sweep EXPERIMENT.toml --grid section.key=v1,v2,... [--seeds N] [--resume DIR]
    controlmd compare EXPERIMENT.toml [--out DIR] [--set ...] [--resume DIR]     (extra "rl")
    controlmd ibi EXPERIMENT.toml | controlmd ibi compare RUN_DIR ...
    controlmd report RUN_DIR                                  (task-specific figures of a run)
    torchrun --nproc_per_node N --no-python controlmd run EXPERIMENT.toml   (replicas sharded)

Before torch loads, the command sets ``MKL_CBWR=AUTO`` (unless ``MKL_CBWR`` is set already):
MKL's CPU kernels otherwise pick code paths by memory alignment, so two processes computing
the same thing can differ in the last bits, and a resumed run is a new process
(docs/reliability.md). ``AUTO`` (conditional numerical reproducibility with MKL's normal
dispatch) is alignment-independent and 1.5x faster than ``COMPATIBLE`` for
matrix-vector-bound runs (the isomerization task). ``CONTROLMD_MKL_CBWR=off`` leaves MKL's
default.

The subcommands are declared in :data:`COMMANDS`: each is a module with ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``, imported by name when the parser is
built (no module registers a command by being imported). Errors of controlmd (bad config,
bad run folder) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from controlmd.commands._common import execute

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: dict[str, str] = {
    "run": "controlmd.commands.run",
    "eval": "controlmd.commands.evaluate",
    "sweep": "controlmd.commands.sweep",
    "compare": "controlmd.commands.compare",
    "ibi": "controlmd.commands.ibi",
    "report": "controlmd.commands.report",
    "isomerization-report": "controlmd.commands.report",  # the report's former name
}
"""Subcommand name -> the module that implements it."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controlmd",
        description="Design control protocols by differentiating through molecular simulations.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``controlmd`` script; returns the exit status."""
    if os.environ.get("CONTROLMD_MKL_CBWR", "").lower() != "off":
        os.environ.setdefault("MKL_CBWR", "AUTO")  # read when torch loads MKL
    args = build_parser().parse_args(argv)
    return execute(args._module, args.command, args)


if __name__ == "__main__":
    sys.exit(main())
