"""``controlmd eval``: re-score a trained protocol on fresh replicas.

::

    controlmd eval RUN_DIR [--seeds N] [--replicas M] [--protocol FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "re-score a trained protocol on fresh seeds"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run folder written by `controlmd run`")
    p.add_argument("--seeds", type=int, default=1, help="number of fresh seeds (default 1)")
    p.add_argument(
        "--replicas", type=int, help="replicas per seed (default: [eval] final_replicas)"
    )
    p.add_argument("--protocol", default="protocol.pt", help="protocol file in the run folder")


def run(args: argparse.Namespace) -> int:
    import math

    from controlmd._validation import check_int
    from controlmd.checkpoint import atomic_write_json
    from controlmd.config import build_task, read_run_config
    from controlmd.errors import ConfigError
    from controlmd.evaluation import evaluate
    from controlmd.protocols import load_protocol
    from controlmd.rng import RESCORE_SEED_OFFSET, use_rng

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
        with use_rng(cfg["experiment"]["rng"]):  # the run's noise streams
            result = evaluate(task, protocol, replicas, base + j, chunk=cfg["eval"]["chunk"])
        rows.append({"seed": base + j, "mean": result.mean, "se": result.se, "replicas": result.n})
        print(
            f"seed {base + j}: {task.metric_name} = {result.mean:.6g} +- {result.se:.2g} "
            f"({result.n} replicas)"
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
