"""Cost of the non-finite check in :func:`controlmd.simulate.simulate` (``check_every``).

A simulation checks positions and momenta for NaN/inf every ``check_every`` steps and at
the end (docs/reliability.md). This measures forward replica-steps per second of the
assembly system (7 Morse disks, 2-D periodic box, Brownian) and the polymer chain
(22 beads, Langevin) at several ``check_every``, interleaved, median of ``--repeats``.

    python benchmarks/check_every.py --replicas 512 --steps 400 --repeats 3 --json FILE
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from controlmd.protocols import Tabulated
from controlmd.simulate import simulate
from controlmd.tasks import get_task

WORKLOADS = {"assembly": {"name": "assembly"}, "polymer": {"name": "polymer_fold"}}


def _setup(workload: str, replicas: int) -> tuple[object, object]:
    task = get_task(WORKLOADS[workload]["name"])
    u0 = task.default_control()
    protocol = Tabulated(times=[0.0, task.horizon], values=torch.stack([u0, u0]))
    integrator = task.integrator(protocol)
    state = task.initial_state(replicas, seed=0)
    return integrator, state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=512)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 10, 100, 1_000_000])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, float]] = {}
    for workload in args.workloads:
        integrator, state = _setup(workload, args.replicas)
        rates: dict[int, list[float]] = {k: [] for k in args.every}
        with torch.no_grad():
            simulate(integrator, state, 20, gradient="none")  # warm-up
            for _ in range(args.repeats):
                for k in args.every:
                    t0 = time.process_time()
                    simulate(integrator, state, args.steps, gradient="none", check_every=k)
                    rates[k].append(args.replicas * args.steps / (time.process_time() - t0))
        med = {str(k): statistics.median(v) for k, v in rates.items()}
        results[workload] = med
        base = med[str(max(args.every))]
        for k in args.every:
            print(
                f"{workload:9s} check_every={k:>8d}: {med[str(k)]:10.0f} replica-steps/CPU-s "
                f"({100 * (med[str(k)] / base - 1):+5.1f} % vs no check)",
                flush=True,
            )
    out = {
        "replicas": args.replicas,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "replica_steps_per_cpu_s": results,
        "load_average": os.getloadavg(),
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
