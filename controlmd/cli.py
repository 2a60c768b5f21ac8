"""The ``controlmd`` command.

::

    controlmd run EXPERIMENT.toml [--set section.key=value ...] [--out DIR] [--resume DIR] [--seed N]
    controlmd eval RUN_DIR [--seeds N] [--replicas M]
    controlmd sweep EXPERIMENT.toml --grid section.key=v1,v2,... [--seeds N] [--address auto] [--resume DIR]
    torchrun --nproc_per_node N --no-python controlmd run EXPERIMENT.toml   (replicas sharded over N ranks)
    controlmd compare EXPERIMENT.toml [--out DIR] [--set section.key=value ...] [--address auto] [--resume DIR]
                                                                                    (extra "rl")

Subcommands live in one registry: a new one is a function ``handler(args) -> int``
decorated with ``@command(name, help=..., arguments=add_arguments)``, where
``add_arguments(parser)`` declares its options. Errors of controlmd (bad config, bad run
folder) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from controlmd.errors import ControlMDError

__all__ = ["command", "main"]

Handler = Callable[[argparse.Namespace], int]
Arguments = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class _Command:
    handler: Handler
    help: str
    arguments: Arguments | None


_COMMANDS: dict[str, _Command] = {}


def command(
    name: str, *, help: str, arguments: Arguments | None = None
) -> Callable[[Handler], Handler]:
    """Register ``handler(args) -> exit status`` as the subcommand ``name``."""

    def register(handler: Handler) -> Handler:
        _COMMANDS[name] = _Command(handler, help, arguments)
        return handler

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controlmd",
        description="Design control protocols by differentiating through molecular simulations.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in _COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if cmd.arguments is not None:
            cmd.arguments(p)
        p.set_defaults(_handler=cmd.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``controlmd`` script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args._handler(args)
    except ControlMDError as exc:
        print(f"controlmd {args.command}: error: {exc}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------- run


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "experiment",
        nargs="?",
        type=Path,
        help="experiment TOML file (optional with --resume: the run's config.toml is used)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set train.lr=0.01 (repeatable)",
    )
    p.add_argument(
        "--out", type=Path, help="run folder (default: runs/<experiment>/<time>_seed<k>/)"
    )
    p.add_argument(
        "--resume", type=Path, metavar="DIR", help="continue the run in DIR from its checkpoint"
    )
    p.add_argument("--seed", type=int, help="replace [experiment] seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@command("run", help="train a protocol from an experiment file", arguments=_run_arguments)
def _run(args: argparse.Namespace) -> int:
    from controlmd.config import load_config
    from controlmd.distributed import init_distributed
    from controlmd.errors import ConfigError
    from controlmd.experiment import run_experiment

    if args.experiment is None and args.resume is None:
        raise ConfigError("give an experiment file, or --resume DIR")
    if args.resume is not None and args.out is not None:
        raise ConfigError("--resume continues a run in its own folder; drop --out")
    source = args.experiment if args.experiment is not None else args.resume / "config.toml"
    cfg = load_config(source, args.overrides, seed=args.seed)
    dist_ctx = (
        init_distributed()
    )  # scale-out: under torchrun, this rank of WORLD_SIZE; else one process
    try:
        result = run_experiment(
            cfg,
            out=args.out,
            resume=args.resume,
            progress=False if args.quiet else None,
            distributed=dist_ctx,
        )
    finally:
        dist_ctx.close()
    if not dist_ctx.is_main:
        return 0
    m = result.metrics
    better = "higher" if m["higher_is_better"] else "lower"
    print(f"{m['metric_name']} ({better} is better), {m['eval_replicas']} fresh replicas:")
    print(f"  before: {m['metric_initial']:.6g} +- {m['metric_initial_se']:.2g}")
    print(f"  after:  {m['metric_final']:.6g} +- {m['metric_final_se']:.2g}")
    if "metric_exact_final" in m:
        print(f"  exact:  {m['metric_exact_initial']:.6g} -> {m['metric_exact_final']:.6g}")
    if "optimum" in m:
        print(f"  known optimum: {m['optimum']:.6g}")
    print(
        f"budget: {m['md_steps']} MD replica-steps, {m['grad_steps']} differentiated, {m['wall_s']:.1f} s"
    )
    print(f"run folder: {result.run_dir}")
    print(f"view it:    tensorboard --logdir {result.run_dir / 'tb'}")
    return 0


# ---------------------------------------------------------------------- eval


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run folder written by `controlmd run`")
    p.add_argument("--seeds", type=int, default=1, help="number of fresh seeds (default 1)")
    p.add_argument(
        "--replicas", type=int, help="replicas per seed (default: [eval] final_replicas)"
    )
    p.add_argument("--protocol", default="protocol.pt", help="protocol file in the run folder")


@command("eval", help="re-score a trained protocol on fresh seeds", arguments=_eval_arguments)
def _eval(args: argparse.Namespace) -> int:
    import math

    from controlmd._validation import check_int
    from controlmd.checkpoint import atomic_write_json
    from controlmd.config import build_task, read_run_config
    from controlmd.errors import ConfigError
    from controlmd.evaluation import evaluate
    from controlmd.protocols import load_protocol
    from controlmd.rng import RESCORE_SEED_OFFSET

    check_int("--seeds", args.seeds)
    cfg = read_run_config(args.run_dir)
    path = args.run_dir / args.protocol
    if not path.is_file():
        raise ConfigError(
            f"{args.run_dir} has no trained protocol {args.protocol!r} (did the run finish?)"
        )
    replicas = cfg["eval"]["final_replicas"] if args.replicas is None else args.replicas
    check_int("--replicas", replicas)
    task = build_task(cfg)
    protocol = load_protocol(path)
    base = cfg["experiment"]["seed"] + RESCORE_SEED_OFFSET
    rows = []
    for j in range(args.seeds):
        result = evaluate(task, protocol, replicas, base + j, chunk=cfg["eval"]["chunk"])
        rows.append({"seed": base + j, "mean": result.mean, "se": result.se, "replicas": result.n})
        print(
            f"seed {base + j}: {task.metric_name} = {result.mean:.6g} +- {result.se:.2g} ({result.n} replicas)"
        )
    mean = sum(r["mean"] for r in rows) / len(rows)
    se = math.sqrt(sum(r["se"] ** 2 for r in rows)) / len(rows)
    summary = {
        "task": task.name,
        "metric_name": task.metric_name,
        "higher_is_better": task.higher_is_better,
        "mean": mean,
        "se": se,
        "seeds": rows,
        "protocol": args.protocol,
    }
    if (value := task.exact_metric(protocol)) is not None:
        summary["exact"] = value
        print(f"exact {task.metric_name}: {value:.6g}")
    print(f"all seeds: {task.metric_name} = {mean:.6g} +- {se:.2g}")
    atomic_write_json(args.run_dir / "eval.json", summary)
    return 0


# ---------------------------------------------------------------------- compare


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    from controlmd.sweep import add_runner_arguments

    p.add_argument(
        "experiment",
        nargs="?",
        type=Path,
        help="comparison TOML file, e.g. experiments/trap_drag_compare.toml (not with --resume)",
    )
    p.add_argument(
        "--out", type=Path, help="output folder (default: runs/<experiment>/<YYYYmmdd-HHMMSS>/)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set compare.seeds=2 (repeatable)",
    )
    p.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="re-run the runs of the comparison in DIR not done",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_runner_arguments(p)


@command(
    "compare",
    help="gradient vs PPO, SAC, CMA-ES and random search at equal MD-step budget",
    arguments=_compare_arguments,
)
def _compare(args: argparse.Namespace) -> int:
    # gymnasium / stable-baselines3 are imported here only: the core never needs them.
    try:
        from controlmd_envs.compare import main_compare
    except ImportError as exc:
        raise ControlMDError(
            f"controlmd compare needs the RL extra (pip install 'controlmd[rl]'): {exc}"
        ) from None
    from controlmd.sweep import runner_options

    return main_compare(
        args.experiment,
        out=args.out,
        overrides=args.overrides,
        resume=args.resume,
        progress=not args.quiet,
        **runner_options(args),
    )


# ---------------------------------------------------------------------- sweep (scale-out)


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    from controlmd.sweep import add_sweep_arguments

    add_sweep_arguments(p)


@command(
    "sweep",
    help="train a grid of settings x seeds as independent jobs (Ray when installed)",
    arguments=_sweep_arguments,
)
def _sweep(args: argparse.Namespace) -> int:
    from controlmd.sweep import sweep_command

    return sweep_command(args)


if __name__ == "__main__":
    sys.exit(main())
