"""Time per training iteration against the number of torch.distributed processes.

For each process count ``n`` in ``--nproc``, the script launches
``torchrun --standalone --nproc_per_node n`` on itself; every rank builds the trainer of
the experiment (``--config`` plus ``--set`` overrides, ``--replicas`` total replicas
sharded over the ranks, ``--steps`` MD steps per rollout) and runs ``--warmup`` untimed
iterations, then ``--iterations`` timed ones (one iteration = sharded rollout, backward
pass, all-reduce of loss and gradient, optimizer step; no evaluation). Rank 0 reports the
median and minimum time per iteration and the throughput in replica-steps per second
(forward + backward), and the CPU time of the busiest rank per iteration (which shows the
work per rank shrinking even when the cores are oversubscribed). Each rank runs ``--threads`` torch threads (OMP_NUM_THREADS).

The replica count is held fixed (strong scaling), so the ideal is time / n. The machine
this runs on may be shared: the script records the load average before each launch.

Usage::

    python benchmarks/scaling.py --nproc 1 2 --json
    python benchmarks/scaling.py --config experiments/trap_drag.toml --replicas 4096 --steps 100 --nproc 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "experiments" / "polymer_fold_quick.toml"


def _worker(args: argparse.Namespace) -> None:
    import torch

    from controlmd.config import build_protocol, build_task, load_config
    from controlmd.distributed import init_distributed
    from controlmd.trainer import Trainer

    overrides = [
        *args.set,
        f"train.replicas={args.replicas}",
        f"task.n_steps={args.steps}",
        "train.variance_every=0",
    ]
    cfg = load_config(args.config, overrides)
    torch.manual_seed(cfg["experiment"]["seed"])
    ctx = init_distributed()
    task = build_task(cfg)
    trainer = Trainer.from_config(cfg, task, build_protocol(cfg, task), distributed=ctx)
    for _ in range(args.warmup):
        trainer.train_step()
    times, cpu = [], []
    for _ in range(args.iterations):
        ctx.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    # an iteration ends when its slowest rank ends
    per_rank = ctx.all_gather(
        torch.tensor([times, cpu], dtype=torch.float64)[None]
    )  # [W, 2, iterations]
    worst = per_rank[:, 0].max(dim=0).values.tolist()
    worst_cpu = per_rank[:, 1].max(dim=0).values.tolist()
    if ctx.is_main:
        median = statistics.median(worst)
        print(
            json.dumps(
                {
                    "nproc": ctx.world_size,
                    "replicas": args.replicas,
                    "replicas_per_rank": trainer.shard.count,
                    "md_steps_per_rollout": task.n_steps,
                    "task": task.name,
                    "threads_per_rank": torch.get_num_threads(),
                    "s_per_iteration_median": median,
                    "s_per_iteration_min": min(worst),
                    "replica_steps_per_s": args.replicas * task.n_steps / median,
                    "iterations": args.iterations,
                    "cpu_s_per_iteration_per_rank_median": statistics.median(worst_cpu),
                }
            ),
            flush=True,
        )
    ctx.close()


def _launch(args: argparse.Namespace, nproc: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        __file__,
        "--worker",
        "--config",
        str(args.config),
        "--replicas",
        str(args.replicas),
        "--steps",
        str(args.steps),
        "--iterations",
        str(args.iterations),
        "--warmup",
        str(args.warmup),
    ]
    for item in args.set:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"torchrun with {nproc} processes failed:\n{proc.stderr[-4000:]}")
    line = [s for s in proc.stdout.splitlines() if s.startswith("{")][-1]
    return {**json.loads(line), "load_average_1min_before": load}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="experiment TOML (default: polymer_fold_quick)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override"
    )
    p.add_argument(
        "--replicas", type=int, default=32, help="total replicas (sharded over the processes)"
    )
    p.add_argument("--steps", type=int, default=400, help="MD steps per rollout (task.n_steps)")
    p.add_argument("--iterations", type=int, default=5, help="timed iterations")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    import torch

    rows = [_launch(args, n) for n in args.nproc]
    base = rows[0]["s_per_iteration_median"] * rows[0]["nproc"]
    for row in rows:
        row["speedup_vs_first"] = rows[0]["s_per_iteration_median"] / row["s_per_iteration_median"]
        row["efficiency"] = base / (row["s_per_iteration_median"] * row["nproc"])
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "backend": "gloo",
        "config": str(args.config),
        "overrides": args.set,
    }
    if args.json:
        print(json.dumps({"meta": meta, "results": rows}, indent=2))
        return
    print(f"{meta}")
    print(
        "nproc  replicas/rank  s/iteration (median, min)  CPU s/iteration/rank  replica-steps/s  speedup  "
        "efficiency  load"
    )
    for r in rows:
        print(
            f"{r['nproc']:>5}  {r['replicas_per_rank']:>13}  {r['s_per_iteration_median']:>9.3f}, "
            f"{r['s_per_iteration_min']:.3f}        {r['cpu_s_per_iteration_per_rank_median']:>20.3f}  "
            f"{r['replica_steps_per_s']:>15.4g}  {r['speedup_vs_first']:>7.2f}  "
            f"{r['efficiency']:>10.2f}  {r['load_average_1min_before']:.1f}"
        )


if __name__ == "__main__":
    main()
