"""``controlmd eval``: re-score a trained protocol on fresh replicas, alone or paired with a
baseline on common random numbers.

::

    controlmd eval RUN_DIR [--seeds N] [--replicas M] [--protocol FILE] [--seed S] [--json FILE]
    controlmd eval RUN_DIR --baseline SPEC [--replicas M] [--seed S] [--json FILE]
    controlmd eval RUN_DIR ... --fused-steps K    # FusedSteps, K steps per compiled call

``--baseline SPEC`` scores the run's protocol and a baseline on the same fresh replicas
(batch seed ``S``: identical initial states and noise). ``SPEC`` is a run folder (its
``protocol.pt``), a protocol file, or ``constant`` (the task's no-control value from the
run's config). The JSON then holds ``metric_name``, ``mean``, ``se``, ``baseline_mean``,
``baseline_se``, ``paired_difference``, ``paired_se``, ``n``, ``fluence``, ``field_cost``,
``baseline_fluence``, ``baseline_field_cost``, ``release_fraction`` and ``max_field``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from controlmd.protocols import Protocol
    from controlmd.tasks import Task

HELP = "re-score a trained protocol on fresh seeds (optionally paired with a baseline)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run folder written by `controlmd run`")
    p.add_argument("--seeds", type=int, default=1, help="number of fresh seeds (default 1)")
    p.add_argument(
        "--replicas", type=int, help="replicas per seed (default: [eval] final_replicas)"
    )
    p.add_argument("--protocol", default="protocol.pt", help="protocol file in the run folder")
    p.add_argument(
        "--seed",
        type=int,
        help="batch seed of the fresh replicas (default: the run's seed + the re-score offset)",
    )
    p.add_argument(
        "--baseline",
        help="score a baseline on the same replicas: a run folder, a protocol file or 'constant'",
    )
    p.add_argument(
        "--json", type=Path, help="where to write the result (default: RUN_DIR/eval.json)"
    )
    p.add_argument(
        "--fused-steps",
        type=int,
        metavar="K",
        help="advance the particles by FusedSteps, K steps per compiled call (0: the "
        "engine's simulate; default: the run's [experiment] fused_steps; needs its rng = "
        "'philox')",
    )


def run(args: argparse.Namespace) -> int:
    from controlmd._validation import check_int
    from controlmd.config import build_task, read_run_config
    from controlmd.dynamics.fused import use_fused_steps
    from controlmd.errors import ConfigError
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
    if args.seed is not None and args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    task = build_task(cfg)
    protocol = load_protocol(path)
    seed = cfg["experiment"]["seed"] + RESCORE_SEED_OFFSET if args.seed is None else args.seed
    out = args.json if args.json is not None else args.run_dir / "eval.json"
    fused = (
        cfg["experiment"].get("fused_steps", 0) if args.fused_steps is None else args.fused_steps
    )
    check_int("--fused-steps", fused, minimum=0)
    if args.baseline is not None:
        if args.seeds != 1:
            raise ConfigError(
                f"--baseline scores one batch seed (--seed); got --seeds {args.seeds}"
            )
        baseline = _baseline(args.baseline, task, protocol)
        with use_rng(cfg["experiment"]["rng"]), use_fused_steps(fused):  # the run's engine
            return _paired(task, protocol, baseline, replicas, seed, cfg, args, out)
    with use_rng(cfg["experiment"]["rng"]), use_fused_steps(fused):
        return _unpaired(task, protocol, replicas, seed, cfg, args, out)


def _baseline(spec: str, task: Task[Any], protocol: Protocol) -> Protocol:
    """The protocol a ``--baseline`` spec names (see the module docstring)."""
    from controlmd.errors import ConfigError, ControlMDError
    from controlmd.evaluation import constant_protocol
    from controlmd.protocols import load_protocol

    if spec == "constant":
        try:
            return constant_protocol(task)
        except ControlMDError as exc:
            raise ConfigError(f"--baseline constant: {exc}") from None
    path = Path(spec)
    if not (path.is_file() or (path / "protocol.pt").is_file()):
        raise ConfigError(
            f"--baseline {spec!r} names nothing: expected a run folder (with protocol.pt), a "
            "protocol file or 'constant'"
        )
    baseline = load_protocol(path)
    if baseline.dim != protocol.dim or abs(baseline.t_final - task.horizon) > 1e-9 * task.horizon:
        raise ConfigError(
            f"--baseline {spec!r}: its protocol has dim = {baseline.dim}, t_final = "
            f"{baseline.t_final}, but task {task.name!r} has {protocol.dim} channel(s) and "
            f"horizon {task.horizon}"
        )
    return baseline


def _paired(
    task: Task[Any],
    protocol: Protocol,
    baseline: Protocol,
    replicas: int,
    seed: int,
    cfg: dict[str, Any],
    args: argparse.Namespace,
    out: Path,
) -> int:
    from controlmd.checkpoint import atomic_write_json
    from controlmd.evaluation import evaluate_paired

    r = evaluate_paired(task, protocol, baseline, replicas, seed, chunk=cfg["eval"]["chunk"])
    field_cost, baseline_cost = r.field_cost, r.baseline_field_cost
    if field_cost is not None and baseline_cost is None:
        baseline_cost = 0.0  # the baseline drives no field
    summary = {
        "task": task.name,
        "metric_name": task.metric_name,
        "higher_is_better": task.higher_is_better,
        "mean": r.mean,
        "se": r.se,
        "baseline_mean": r.baseline_mean,
        "baseline_se": r.baseline_se,
        "paired_difference": r.paired_difference,
        "paired_se": r.paired_se,
        "n": r.n,
        "seed": seed,
        "fluence": float(protocol.fluence().detach()),
        "field_cost": field_cost,
        "baseline_fluence": float(baseline.fluence().detach()),
        "baseline_field_cost": baseline_cost,
        "release_fraction": protocol.release_fraction,
        "max_field": task.max_field(protocol),
        "protocol": args.protocol,
        "baseline": args.baseline,
        "md_steps": r.md_steps,
    }
    print(
        f"seed {seed}, {r.n} paired replicas: {task.metric_name} = {r.mean:.6g} +- {r.se:.2g}, "
        f"baseline {r.baseline_mean:.6g} +- {r.baseline_se:.2g}, difference "
        f"{r.paired_difference:+.6g} +- {r.paired_se:.2g}"
    )
    atomic_write_json(out, summary)
    return 0


def _unpaired(
    task: Task[Any],
    protocol: Protocol,
    replicas: int,
    base: int,
    cfg: dict[str, Any],
    args: argparse.Namespace,
    out: Path,
) -> int:
    import math

    from controlmd.checkpoint import atomic_write_json
    from controlmd.evaluation import evaluate

    rows: list[dict[str, Any]] = []
    for j in range(args.seeds):
        result = evaluate(task, protocol, replicas, base + j, chunk=cfg["eval"]["chunk"])
        rows.append(
            {
                "seed": base + j,
                "mean": result.mean,
                "se": result.se,
                "replicas": result.n,
                "field_cost": result.field_cost,
            }
        )
        print(
            f"seed {base + j}: {task.metric_name} = {result.mean:.6g} +- {result.se:.2g} "
            f"({result.n} replicas)"
        )
    mean = sum(r["mean"] for r in rows) / len(rows)
    se = math.sqrt(sum(r["se"] ** 2 for r in rows)) / len(rows)
    summary: dict[str, Any] = {
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
    atomic_write_json(out, summary)
    return 0
