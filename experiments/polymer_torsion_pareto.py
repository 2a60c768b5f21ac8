"""Folded fraction vs fluence on the 22-bead helix (issue 17): the hand-made native-torsion
bias ``a`` held until the release window (0.9 T, blended over 0.88-0.9 T), scanned over
``a``, beside trained torsion schedules scored on the same fresh replicas.

Scan (one JSON line per amplitude, every amplitude on the same replicas)::

    python experiments/polymer_torsion_pareto.py scan --amplitudes 0 1 2 3 4 5 6 8 \\
        --replicas 1024 --seed 8000000 > scan.jsonl

Plot the scan with trained protocols (``controlmd eval RUN --replicas N --seed 8000000
--baseline ... --json F`` files: their ``mean``, ``se``, ``fluence`` and ``n``)::

    python experiments/polymer_torsion_pareto.py plot scan.jsonl --trained F0.json F1.json \\
        --out experiments/results/polymer_torsion_pareto/pareto

Fluence ``integral |a(t)|^2 dt`` (epsilon^2 tau) by :meth:`Protocol.fluence`, the number
``controlmd eval`` reports. Units: reduced LJ (tau, epsilon); folded fraction in [0, 1].
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from controlmd.evaluation import mean_se, pareto_front
from controlmd.files import atomic_write_text
from controlmd.protocols import Tabulated
from controlmd.tasks.polymer_fold import PolymerFold


def held(task: PolymerFold, a: float, release_fraction: float = 0.1) -> Tabulated:
    """The torsion amplitude ``a`` on every torsion until the release window, then 0."""
    T = task.horizon
    return Tabulated(
        times=[0.0, T],
        values=[[a], [a]],
        interpolation="hold",
        t_final=T,
        low=0.0,
        high=task.controls.high_tensor(),
        release_fraction=release_fraction,
        release_value=[0.0],
    )


def scan(amplitudes: list[float], n: int, seed: int, n_steps: int = 2000) -> list[dict[str, Any]]:
    """Folded fraction (mean, SE) and fluence of each held amplitude on the same ``n``
    replicas of ``seed``; ``paired_vs_first``: per-replica difference from the first."""
    task = PolymerFold(target="helix", controls=["torsion"], torsion_max=10.0, n_steps=n_steps)
    rows, first = [], None
    for a in amplitudes:
        protocol = held(task, a)
        with torch.no_grad():
            folded = task.metric(task.rollout(protocol, n, seed, gradient="none"))
        first = folded if first is None else first
        mean, se = mean_se(folded)
        paired, paired_se = mean_se(folded - first)
        rows.append(
            {
                "a": a,
                "n": n,
                "seed": seed,
                "mean": mean,
                "se": se,
                "paired_vs_first": paired,
                "paired_se": paired_se,
                "first_a": amplitudes[0],
                "fluence": float(protocol.fluence().detach()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(scan_files: list[Path], trained_files: list[Path], out: Path) -> dict[str, Any]:
    """Write ``out.json`` (scan, trained points, hand-made front) and ``out.png``."""
    by_amplitude: dict[float, dict[str, Any]] = {}
    for f in scan_files:  # an amplitude scanned in several files (the pairing reference) once
        for line in f.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                by_amplitude.setdefault(row["a"], row)
    handmade = [by_amplitude[a] for a in sorted(by_amplitude)]
    trained = []
    for path in trained_files:
        e = json.loads(path.read_text())
        trained.append(
            {"label": path.stem, "mean": e["mean"], "se": e["se"], "n": e["n"],
             "fluence": e["fluence"]}
        )  # fmt: skip
    front = pareto_front(handmade, cost="fluence")
    result = {"handmade": handmade, "handmade_front": front, "trained": trained}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ax.errorbar(
        [r["fluence"] for r in handmade],
        [r["mean"] for r in handmade],
        [r["se"] for r in handmade],
        marker="o",
        label=f"hand-made a held to 0.9 T ({handmade[0]['n']} replicas)" if handmade else None,
    )
    for r in handmade:
        ax.annotate(f"a={r['a']:g}", (r["fluence"], r["mean"]), xytext=(4, 6),
                    textcoords="offset points", fontsize=7)  # fmt: skip
    for p in trained:
        ax.errorbar(p["fluence"], p["mean"], p["se"], marker="*", ms=12, ls="none",
                    label=f"{p['label']} ({p['n']} replicas)")  # fmt: skip
    ax.set_xlabel("fluence ∫ a(t)² dt (ε² τ)")
    ax.set_ylabel("folded fraction (helix)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scan")
    s.add_argument("--amplitudes", type=float, nargs="+", required=True)
    s.add_argument("--replicas", type=int, default=1024)
    s.add_argument("--seed", type=int, default=8_000_000)
    p = sub.add_parser("plot")
    p.add_argument("scan", type=Path, nargs="+", help="JSON lines written by scan")
    p.add_argument("--trained", type=Path, nargs="*", default=[])
    p.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = ap.parse_args(argv)
    if args.command == "scan":
        scan(args.amplitudes, args.replicas, args.seed)
    else:
        plot(args.scan, args.trained, args.out)


if __name__ == "__main__":
    main()
