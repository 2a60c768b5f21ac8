"""What the chains of ``polymer_fold`` end as, replica by replica, under one or more protocols.

Usage::

    python experiments/polymer_failures.py experiments/polymer_torsion.toml \
        a5=experiments/results/polymer_torsion_handmade_a5.pt [LABEL=RUN_DIR_OR_FILE ...] \
        --replicas 512 --seed 8000000 --json OUT.json [--png OUT.png] [--set task.KEY=VALUE]

Every protocol runs on replicas ``0 .. replicas-1`` of batch seed ``--seed`` (the replicas
``controlmd eval --seed`` uses: the folded fractions equal its means). Each final chain is
classified (reduced LJ units: lengths in sigma):

* ``folded``: Q >= ``q_folded`` and Kabsch RMSD < ``rmsd_folded`` (the task's metric);
* ``mirror``: Q >= ``q_folded`` but RMSD >= ``rmsd_folded`` (native distances, the other hand);
* ``misfolded``: Q < ``q_folded``.

Per chain also the mean torsion angle (degrees): its sign tells the hand when the native
torsions share one sign (the helix: phi* = 10.2 degrees, so a mirror image sits near -10
and differs from native by only ~20 degrees per torsion, below the "flipped" threshold).

Per chain the JSON keeps Q, RMSD, the class and the torsions more than 90 degrees away from
the native ones (``1 - cos(phi - phi*) > 1``) as a string over the chain (``+`` native side,
``-`` flipped), the number of flipped torsions and of flipped runs (contiguous blocks of
``-``: one block in an otherwise native chain is a locally mirrored or mis-registered
stretch). Per protocol: class fractions with standard errors, the mean number of flipped
torsions per class, the chains with one flipped run and those with a negative mean torsion. ``--png`` draws one final chain of each class per protocol (the first
replica in it), Kabsch-aligned to the target, beside the target.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from controlmd.checkpoint import atomic_write_text
from controlmd.config import build_task, load_config
from controlmd.evaluation import mean_se
from controlmd.protocols import Protocol, load_protocol
from controlmd.structures import kabsch_align, kabsch_rmsd

CLASSES = ("folded", "mirror", "misfolded")


def final_chains(
    task: Any, protocol: Protocol, replicas: int, seed: int, chunk: int
) -> torch.Tensor:
    """Final positions ``[replicas, N, 3]`` of replicas ``0 .. replicas-1`` of ``seed``."""
    parts = []
    with torch.no_grad():
        for first in range(0, replicas, chunk):
            n = min(chunk, replicas - first)
            parts.append(task.rollout(protocol, n, seed, first_replica=first, gradient="none").R)
    return torch.cat(parts)


def classify(task: Any, R: torch.Tensor) -> list[dict[str, Any]]:
    """One row per chain of ``R`` ``[B, N, 3]``: Q, RMSD, class and flipped torsions."""
    Q = task.contact_fraction(R)
    D = kabsch_rmsd(R, task.target)
    flipped = task._torsion_bias.misfit(R) > 1.0  # [B, K]
    phi = torch.rad2deg(task.torsion_angles(R)).mean(-1)
    rows = []
    for q, d, f, p in zip(Q.tolist(), D.tolist(), flipped, phi.tolist(), strict=True):
        pattern = "".join("-" if x else "+" for x in f.tolist())
        kind = (
            "misfolded" if q < task.q_folded else ("folded" if d < task.rmsd_folded else "mirror")
        )
        runs = sum(1 for block in pattern.split("+") if block)
        rows.append(
            {
                "q": q,
                "rmsd": d,
                "class": kind,
                "torsions": pattern,
                "flipped": pattern.count("-"),
                "flipped_runs": runs,
                "mean_torsion_deg": p,
            }
        )
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Class fractions (with SE) and mean flipped torsions per class."""
    n = len(rows)
    out: dict[str, Any] = {"n": n}
    for kind in CLASSES:
        members = [r for r in rows if r["class"] == kind]
        out[kind], out[f"{kind}_se"] = mean_se(
            torch.tensor([float(r["class"] == kind) for r in rows], dtype=torch.float64)
        )
        out[f"{kind}_mean_flipped"] = (
            sum(r["flipped"] for r in members) / len(members) if members else None
        )
        out[f"{kind}_one_flipped_run"] = sum(1 for r in members if r["flipped_runs"] == 1)
        out[f"{kind}_negative_mean_torsion"] = sum(1 for r in members if r["mean_torsion_deg"] < 0)
    return out


def _draw(path: Path, task: Any, examples: dict[str, dict[str, torch.Tensor | None]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(examples)
    fig = plt.figure(figsize=(3.2 * (len(CLASSES) + 1), 3.0 * len(labels)))
    for i, label in enumerate(labels):
        panels = [("target", task.target), *examples[label].items()]
        for j, (kind, X) in enumerate(panels):
            ax = fig.add_subplot(len(labels), len(panels), i * len(panels) + j + 1, projection="3d")
            ax.set_title(f"{label}: {kind}" if j else "target", fontsize=9)
            ax.set_axis_off()
            if X is None:
                ax.text2D(0.3, 0.5, "none", transform=ax.transAxes)
                continue
            x = X.numpy()
            ax.plot(x[:, 0], x[:, 1], x[:, 2], "-", color="0.5", lw=1)
            ax.scatter(x[:, 0], x[:, 1], x[:, 2], c=range(len(x)), cmap="viridis", s=18)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", type=Path, help="TOML whose [task] builds the chain")
    ap.add_argument("protocols", nargs="+", help="LABEL=PATH (protocol file or run folder)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--replicas", type=int, default=512)
    ap.add_argument("--seed", type=int, default=8_000_000)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args(argv)
    task = build_task(load_config(args.experiment, args.overrides))
    doc: dict[str, Any] = {"replicas": args.replicas, "seed": args.seed, "protocols": {}}
    examples: dict[str, dict[str, torch.Tensor | None]] = {}
    for spec in args.protocols:
        label, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"expected LABEL=PATH, got {spec!r}")
        protocol = load_protocol(path)
        task.check_protocol(protocol)
        R = final_chains(task, protocol, args.replicas, args.seed, args.chunk)
        rows = classify(task, R)
        summary = summarize(rows)
        doc["protocols"][label] = {"path": path, "summary": summary, "chains": rows}
        print(label, {k: v for k, v in summary.items() if not k.endswith("_se")}, flush=True)
        aligned = kabsch_align(R, task.target)
        examples[label] = {}
        for kind in CLASSES:
            first = next((i for i, r in enumerate(rows) if r["class"] == kind), None)
            examples[label][kind] = None if first is None else aligned[first]
    atomic_write_text(args.json, json.dumps(doc, indent=1) + "\n")
    if args.png is not None:
        _draw(args.png, task, examples)


if __name__ == "__main__":
    main()
