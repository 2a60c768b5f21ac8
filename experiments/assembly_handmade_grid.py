"""Hand-made compress-and-release grid on ``assembly`` (issue 15): eps = 6, a centred
harmonic confinement k in {3, 10, 30, 100} switched off at t_off in {0.5, 0.8, 0.9} T
(release window: the last 10 % of the horizon), each scored against the constant eps = 6
on the same fresh replicas (common random numbers). Prints one JSON line per schedule:

    python experiments/assembly_handmade_grid.py --replicas 64 --seed 101 > grid.jsonl

Select the best on one seed, then compare it on another (``--only K,TOFF --seed S``). The
yield-vs-field-cost curve of issue 15 scans k at one switch-off time::

    python experiments/assembly_handmade_grid.py --replicas 512 --seed 303 \
        --ks 1 2 3 5 10 20 30 50 100 --toffs 0.9 --field-cost-every 20 > pareto_handmade.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from controlmd.evaluation import constant_protocol
from controlmd.protocols import Tabulated
from controlmd.tasks.assembly import Assembly


def schedule(task: Assembly, k: float, t_off: float) -> Tabulated:
    """k from 0 to t_off T, then 0; the release window switches it off from 0.88 T anyway."""
    T = task.horizon
    times, values = (
        ([0.0, 0.9 * T], [[k], [k]]) if t_off >= 0.9 else ([0.0, t_off * T], [[k], [0.0]])
    )
    return Tabulated(
        times=times,
        values=values,
        interpolation="hold",
        t_final=T,
        low=0.0,
        high=task.confinement_max,
        release_fraction=0.1,
        release_value=[0.0],
    )


def per_replica(task: Assembly, protocol, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        state = task.rollout(protocol, n, seed, gradient="none")
    cost = state.aux.get("field_cost", torch.zeros(n, dtype=torch.float64))
    return task.metric(state), cost


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--seed", type=int, default=101)
    ap.add_argument("--only", help="K,TOFF: score one schedule")
    ap.add_argument("--ks", type=float, nargs="+", default=[3.0, 10.0, 30.0, 100.0])
    ap.add_argument("--toffs", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    ap.add_argument(
        "--field-cost-every", type=int, default=10, help="steps between field-cost frames"
    )
    args = ap.parse_args()
    task = Assembly(
        controls=["confinement"], confinement_max=100.0, field_cost_every=args.field_cost_every
    )
    t0 = time.time()
    base, _ = per_replica(task, constant_protocol(task), args.replicas, args.seed)
    grid = [(k, t) for k in args.ks for t in args.toffs]
    if args.only:
        k, t = (float(x) for x in args.only.split(","))
        grid = [(k, t)]
    n = args.replicas
    for k, t_off in grid:
        y, cost = per_replica(task, schedule(task, k, t_off), n, args.seed)
        d = y - base
        print(
            json.dumps(
                {
                    "k": k,
                    "t_off": t_off,
                    "seed": args.seed,
                    "n": n,
                    "mean": float(y.mean()),
                    "se": float(y.std() / math.sqrt(n)),
                    "baseline_mean": float(base.mean()),
                    "paired_difference": float(d.mean()),
                    "paired_se": float(d.std() / math.sqrt(n)),
                    "field_cost": float(cost.mean()),
                    "wall_s": round(time.time() - t0, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
