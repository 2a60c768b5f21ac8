"""Options and the error convention shared by the subcommands."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from controlmd.errors import ControlMDError


def add_set_option(p: argparse.ArgumentParser, example: str = "train.lr=0.01") -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable) into ``args.overrides``."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable)",
    )


def execute(command: ModuleType, name: str, args: argparse.Namespace) -> int:
    """Run a subcommand module on parsed ``args``: its exit status, or 2 with one line on
    stderr for an error of controlmd (bad config, bad run folder)."""
    try:
        return int(command.run(args))
    except ControlMDError as exc:
        print(f"controlmd {name}: error: {exc}", file=sys.stderr)
        return 2
