"""Write a target RDF (histogram CSV, the format of controlmd/tasks/rdf_inverse.py) by
simulating the reference Lennard-Jones fluid with controlmd's engine.

The shipped targets were made with::

    python experiments/data/make_target.py --density 0.83 --kT 1.0 --out experiments/data/lj_rho0.83_kT1.0.csv
    python experiments/data/make_target.py --density 0.3 --kT 1.2 --out experiments/data/lj_rho0.30_kT1.2.csv

(108 particles, 16 replicas x 2500 frames 10 steps apart after 1000 equilibration steps,
dt = 0.005, Nosé–Hoover chain, LJ epsilon = sigma = 1 cut at 2.5 with energy shift,
histogram bins of 0.005 sigma up to half the box; seed 2024).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from controlmd.tasks.rdf_inverse import make_target


def main(argv: Sequence[str] | None = None) -> None:
    """Command line of :func:`make_target` (``python experiments/data/make_target.py --help``)."""
    parser = argparse.ArgumentParser(
        description="Write a target RDF (histogram CSV) by simulating reference LJ."
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-particles", type=int, default=108)
    parser.add_argument("--density", type=float, default=0.83)
    parser.add_argument("--kT", type=float, default=1.0)
    parser.add_argument("--frames", type=int, default=40000)
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--bin-width", type=float, default=0.005)
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--sigma", type=float, default=1.0)
    args = parser.parse_args(argv)
    target = make_target(
        args.out,
        n_particles=args.n_particles,
        density=args.density,
        kT=args.kT,
        frames=args.frames,
        replicas=args.replicas,
        every=args.every,
        seed=args.seed,
        bin_width=args.bin_width,
        reference={"potential": "lj", "epsilon": args.epsilon, "sigma": args.sigma},
    )
    peak = int(torch.argmax(target.g))
    print(
        f"wrote {args.out}: {target.r.numel()} bins up to r = {float(target.r[-1]):.3f}, "
        f"first peak g({float(target.r[peak]):.3f}) = {float(target.g[peak]):.3f}"
    )


if __name__ == "__main__":
    main()
