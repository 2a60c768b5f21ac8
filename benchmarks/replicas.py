"""Throughput versus replica count B: batching makes many small replicas cheap.

System (reduced LJ units): B independent replicas of N = 64 LJ particles at density 0.8
(box 4.31), LJ cut at 1.5 and energy-shifted (the box is too small for 2.5), all pairs
(dense selection; ``--skin s`` uses a batched neighbor list instead), NVE with dt = 0.005, momenta at kT = 1 drawn per
replica. One batched tensor ``[B, N, 3]`` is advanced by ``simulate(..., gradient="none")``;
the figure of merit is replica-steps per second (``B * steps / wall time``), best of
``--repeats``. With ``--grad`` also the forward+gradient rate (gradient of the mean final
potential energy per particle with respect to epsilon, direct backprop).

Usage::

    python benchmarks/replicas.py --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from controlmd.dynamics.nve import NVE
from controlmd.lattice import lattice
from controlmd.neighbors import NeighborList
from controlmd.potentials.pair import LennardJones
from controlmd.rng import ReplicaRNG
from controlmd.simulate import simulate
from controlmd.space import periodic


def _system(
    n: int, r_cut: float, skin: float, B: int, dtype: torch.dtype, device: str, learnable: bool
):
    R0, box = lattice("fcc", n, density=0.8)
    space = periodic(box)
    nl = NeighborList(space, r_cut, skin=skin) if skin > 0 else None
    lj = LennardJones(
        space, r_cut=r_cut, neighbor_list=nl, learnable=("epsilon",) if learnable else False
    )
    nve = NVE(lj, dt=0.005, space=space).to(device)
    R = R0.to(device, dtype).expand(B, n, 3).contiguous()
    return nve, nve.init(R, kT=1.0, rng=ReplicaRNG(0, B, device=device))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--r-cut", type=float, default=1.5)
    p.add_argument(
        "--skin", type=float, default=0.0, help="neighbor-list skin; 0: all pairs (dense)"
    )
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--grad", action="store_true", help="also time forward + gradient")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = []
    for B in args.replicas:
        nve, state = _system(args.n, args.r_cut, args.skin, B, dtype, args.device, learnable=False)
        with torch.no_grad():
            state = simulate(nve, state, 20, gradient="none").final  # melt, warm up
            best = math.inf
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                simulate(nve, state, args.steps, gradient="none")
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
        row = {
            "B": B,
            "n": args.n,
            "steps": args.steps,
            "dtype": args.dtype,
            "threads": args.threads,
            "skin": args.skin,
            "replica_steps_per_s": B * args.steps / best,
            "steps_per_s": args.steps / best,
            "load_average": os.getloadavg(),
        }
        if args.grad:
            nve_g, _ = _system(args.n, args.r_cut, args.skin, B, dtype, args.device, learnable=True)
            best = math.inf
            for _ in range(args.repeats):
                nve_g.zero_grad()
                t0 = time.perf_counter()
                final = simulate(nve_g, state, args.steps, gradient="direct").final
                (nve_g.potential.energy(final.R).mean() / args.n).backward()
                best = min(best, time.perf_counter() - t0)
            row["grad_replica_steps_per_s"] = B * args.steps / best
        rows.append(row)
        print(json.dumps(row) if args.json else row, flush=True)
    return rows


if __name__ == "__main__":
    main()
