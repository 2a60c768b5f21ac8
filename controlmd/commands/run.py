"""``controlmd run``: train a protocol from an experiment file (or resume a run).

::

    controlmd run EXPERIMENT.toml [--set section.key=value ...] [--out DIR] [--seed N] [--quiet]
    controlmd run EXPERIMENT.toml --seeds K [--out DIR] [--local | --address auto ...]
    controlmd run --resume DIR
    torchrun --nproc_per_node N --no-python controlmd run EXPERIMENT.toml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from controlmd.commands._common import add_set_option
from controlmd.runner import add_runner_arguments

HELP = "train a protocol from an experiment file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "experiment",
        nargs="?",
        type=Path,
        help="experiment TOML file (optional with --resume: the run's config.toml is used)",
    )
    add_set_option(p)
    p.add_argument(
        "--out",
        type=Path,
        help="run folder (default: runs/<experiment>/<time>_seed<k>/; with --seeds, the "
        "folder of the seed runs)",
    )
    p.add_argument(
        "--resume", type=Path, metavar="DIR", help="continue the run in DIR from its checkpoint"
    )
    p.add_argument("--seed", type=int, help="replace [experiment] seed")
    p.add_argument(
        "--seeds",
        type=int,
        metavar="K",
        help="train K seeds (experiment.seed + 0 ... K-1) as independent jobs (see `sweep`)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_runner_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Create (or lock) the run folder and write the requested config before torch and the
    heavy modules load, then validate, train and report (see :mod:`controlmd.runfolder`)."""
    import os

    from controlmd.errors import ConfigError
    from controlmd.runfolder import RunFolder, default_run_dir
    from controlmd.tomlfile import apply_overrides, check_run_name, dumps, read_toml

    if args.experiment is None and args.resume is None:
        raise ConfigError("give an experiment file, or --resume DIR")
    if args.resume is not None and args.out is not None:
        raise ConfigError("--resume continues a run in its own folder; drop --out")
    if args.seeds is not None:
        return _run_seeds(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: rank 0 makes the folder later
        return _run_distributed(args)
    if args.resume is not None:
        if args.seed is not None:
            raise ConfigError("--resume keeps the run's seed; drop --seed")
        _check_resume_overrides(args.overrides)
        folder = RunFolder.existing(args.resume)
    else:
        raw = apply_overrides(read_toml(args.experiment), args.overrides)
        if args.seed is not None:
            raw.setdefault("experiment", {})["seed"] = args.seed
        section = raw.get("experiment")
        experiment: dict[str, Any] = section if isinstance(section, dict) else {}
        name = check_run_name(experiment.get("name"), "[experiment] name")
        seed = experiment.get("seed", 0)
        target = args.out or default_run_dir("runs", name, seed if isinstance(seed, int) else 0)
        folder = RunFolder.new(target)
        folder.write_config(dumps(raw))  # the requested config; resolved below
    try:
        return _run_in(folder, args)
    finally:
        folder.release()


def _check_resume_overrides(overrides: list[str]) -> None:
    from controlmd.errors import ConfigError
    from controlmd.tomlfile import parse_override

    for item in overrides:
        section, key, _ = parse_override(item)
        if (section, key) != ("train", "iterations"):
            raise ConfigError(
                f"--resume accepts no --set except train.iterations (a resumed run keeps its "
                f"config); got {section}.{key}"
            )


def _run_in(folder: Any, args: argparse.Namespace) -> int:
    from controlmd.config import load_config
    from controlmd.errors import ConfigError, RunInterrupted
    from controlmd.experiment import run_experiment

    fresh = args.resume is None
    # resuming: the experiment file, if given, must match the run's config (checked below)
    source = folder.config if fresh or args.experiment is None else args.experiment
    try:
        cfg = load_config(
            source,
            args.overrides if not fresh else (),
            name=args.experiment if fresh and args.experiment is not None else None,
        )
    except ConfigError:
        if fresh:
            folder.remove()  # an invalid config leaves no folder behind
        raise
    try:
        result = run_experiment(
            cfg,
            resume=None if fresh else folder.path,
            progress=False if args.quiet else None,
            folder=folder,
        )
    except RunInterrupted as exc:
        print(f"controlmd run: {exc}", file=sys.stderr)
        return exc.exit_code
    if result.already_finished:
        done = result.metrics["iterations"]
        print(f"run {result.run_dir} is finished ({done} iterations; metrics.json): nothing to do")
        return 0
    _print_result(result)
    return 0


def _run_distributed(args: argparse.Namespace) -> int:
    """Under torchrun: every rank loads the config; rank 0 creates the folder."""
    from controlmd.config import load_config
    from controlmd.distributed import init_distributed
    from controlmd.experiment import run_experiment

    source = args.experiment if args.experiment is not None else args.resume / "config.toml"
    cfg = load_config(source, args.overrides, seed=args.seed)
    dist_ctx = init_distributed()
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
    if dist_ctx.is_main:
        _print_result(result)
    return 0


def _print_result(result: Any) -> None:
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
        f"budget: {m['md_steps']} MD replica-steps, {m['grad_steps']} differentiated, "
        f"{m['wall_s']:.1f} s"
    )
    print(f"run folder: {result.run_dir}")
    if (result.run_dir / "tb").is_dir():  # [logging] tensorboard = false writes none
        print(f"view it:    tensorboard --logdir {result.run_dir / 'tb'}")


def _run_seeds(args: argparse.Namespace) -> int:
    """``--seeds K``: a sweep with no grid axis (one job per seed, resumable with
    ``controlmd sweep --resume DIR``)."""
    from controlmd.errors import ConfigError
    from controlmd.runner import runner_options
    from controlmd.sweep import run_sweep

    if args.resume is not None or args.experiment is None:
        raise ConfigError(
            "--seeds needs an experiment file; resume with controlmd sweep --resume DIR"
        )
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"experiment.seed={args.seed}")
    result = run_sweep(
        args.experiment,
        (),
        seeds=args.seeds,
        overrides=overrides,
        out=args.out,
        **runner_options(args),
    )
    return 0 if not result.failed else 1
