"""Folded and mirror-image fractions of two polymer_fold protocols on the same fresh replicas.

Usage::

    python experiments/polymer_torsion_mirror.py RUN_DIR BASELINE.pt --replicas 512 \
        --seed 8000000 --json OUT.json

Rolls out the run's ``protocol.pt`` and the baseline protocol file on replicas
``0 .. replicas-1`` of batch seed ``--seed`` (the replicas ``controlmd eval --seed`` uses, so
the folded fractions equal its ``mean`` / ``baseline_mean`` for the same count) and counts,
per protocol, the folded chains (Q >= 0.8 and Kabsch RMSD < 1 sigma) and the mirror images
(Q >= 0.8 but RMSD >= 1 sigma: the native distances, the wrong handedness). Writes fractions,
their standard errors and the paired differences (protocol minus baseline) to ``--json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from controlmd.config import build_task, load_config
from controlmd.evaluation import mean_se
from controlmd.protocols import load_protocol
from controlmd.structures import kabsch_rmsd


def main() -> None:
    """Score both protocols and write the JSON file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("baseline", type=Path)
    ap.add_argument("--replicas", type=int, default=512)
    ap.add_argument("--seed", type=int, default=8_000_000)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    task = build_task(load_config(args.run_dir / "config.toml"))
    out: dict[str, object] = {"replicas": args.replicas, "seed": args.seed}
    rows: dict[str, dict[str, torch.Tensor]] = {}
    for label, path in (("trained", args.run_dir), ("baseline", args.baseline)):
        protocol = load_protocol(path)
        q, rmsd = [], []
        for first in range(0, args.replicas, args.chunk):
            n = min(args.chunk, args.replicas - first)
            with torch.no_grad():
                R = task.rollout(protocol, n, args.seed, first_replica=first, gradient="none").R
            q.append(task.contact_fraction(R))
            rmsd.append(kabsch_rmsd(R, task.target))
        Q, D = torch.cat(q), torch.cat(rmsd)
        native = Q >= task.q_folded
        rows[label] = {
            "folded": (native & (D < task.rmsd_folded)).double(),
            "mirror": (native & (D >= task.rmsd_folded)).double(),
        }
        for kind, x in rows[label].items():
            out[f"{label}_{kind}"], out[f"{label}_{kind}_se"] = mean_se(x)
        print(label, {k: round(float(v.mean()), 4) for k, v in rows[label].items()}, flush=True)
    for kind in ("folded", "mirror"):
        d = rows["trained"][kind] - rows["baseline"][kind]
        out[f"paired_{kind}_difference"], out[f"paired_{kind}_se"] = mean_se(d)
    args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
