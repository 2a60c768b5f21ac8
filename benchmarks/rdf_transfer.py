"""Transfer check of learned pair potentials: fit at one density, RDF error at others.

Units: reduced LJ units (sigma, epsilon, tau); densities in sigma^-3.

For each density (the fit's own first, then ``--densities``) the reference LJ fluid is
simulated to make a target RDF (``--target-frames`` frames), then every fitted potential
(``potential.pt`` of a run folder of ``controlmd run experiments/rdf_*.toml`` or
``python -m controlmd.ibi experiments/rdf_ibi.toml``) is simulated in the same box and
its pooled RDF compared with the target: ``rdf_mse`` (Gaussian-smeared RDF, the training
loss's measure) and ``rdf_hist_mse`` (histogram RDF). The reference potential itself,
simulated from another seed, gives the sampling-noise floor of these numbers.

Usage::

    python benchmarks/rdf_transfer.py --fit runs/rdf_lj/RUN --fit runs/rdf_nn/RUN \\
        --fit runs/rdf_ibi/RUN --densities 0.7 0.9 --json transfer.json --png transfer.png

Prints one line per (density, potential) and writes the table as JSON and a figure of
the RDFs.
"""

from __future__ import annotations

import argparse
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

from controlmd.checkpoint import atomic_write_json
from controlmd.tasks.rdf_inverse import RDFInverse, load_pair_potential


def _fit_info(run_dir: Path) -> tuple[str, dict[str, Any]]:
    cfg = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    label = f"{cfg['experiment']['name']} ({run_dir.name})"
    return label, cfg["task"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--fit", action="append", required=True, type=Path, help="run folder holding potential.pt"
    )
    parser.add_argument("--densities", type=float, nargs="+", default=[0.7, 0.9])
    parser.add_argument("--n-particles", type=int, default=256)
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument(
        "--frames", type=int, default=200, help="frames per replica of each evaluation"
    )
    parser.add_argument("--target-frames", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args()

    fits = [(*_fit_info(d), d) for d in args.fit]
    base = fits[0][1]
    kT = float(base.get("kT", 1.0))
    densities = [float(base.get("density", 0.83)), *args.densities]
    rows: list[dict[str, Any]] = []
    curves: dict[float, dict[str, torch.Tensor]] = {}
    for density in densities:
        t0 = time.perf_counter()
        task = RDFInverse(
            n_particles=args.n_particles,
            density=density,
            kT=kT,
            r_max=float(base.get("r_max", 2.3)),
            n_bins=int(base.get("n_bins", 46)),
            smearing=base.get("smearing"),
            target_frames=args.target_frames,
            record_every=10,
            final_replicas=args.replicas,
            final_frames=args.frames,
        )
        curves[density] = {"r": task.centers, "target": task.targets.smeared}
        entries = [("reference LJ (noise floor)", task.reference)]
        entries += [
            (label, load_pair_potential(run / "potential.pt", task.space)) for label, _, run in fits
        ]
        for label, pair in entries:
            sample = task.sample_rdf(
                pair, n_replicas=args.replicas, n_frames=args.frames, every=10, seed=args.seed
            )
            mse = float(((sample["smeared"] - task.targets.smeared) ** 2).mean())
            hist = float(((sample["hist"] - task.targets.hist) ** 2).mean())
            rows.append(
                {"density": density, "potential": label, "rdf_mse": mse, "rdf_hist_mse": hist}
            )
            curves[density][label] = sample["smeared"]
            print(
                f"density {density:5.3f}  {label:45s} rdf_mse {mse:.3e}  hist {hist:.3e}",
                flush=True,
            )
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json is not None:
        atomic_write_json(args.json, {"n_particles": args.n_particles, "kT": kT, "rows": rows})
    if args.png is not None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5.0 * len(densities), 3.8), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(densities), squeeze=False)[0]
        for ax, density in zip(axes, densities):
            data = curves[density]
            r = data.pop("r").numpy()
            for i, (label, g) in enumerate(data.items()):
                ax.plot(r, g.numpy(), ("-", "--", ":", "-.")[i % 4], label=label.split(" (")[0])
            ax.set_title(f"density {density:g}" + (" (fit)" if density == densities[0] else ""))
            ax.set_xlabel("r [sigma]")
            ax.set_ylabel("g(r) (smeared)")
        axes[0].legend(fontsize="small")
        fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
