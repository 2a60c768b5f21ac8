"""Yield vs field cost on ``assembly`` (issue 15): the hand-made confinement schedules of a k
scan and trained fields, all scored on the same fresh replicas (common random numbers).

Inputs: the JSON lines of ``assembly_handmade_grid.py`` (one schedule each) and the JSON files
of ``controlmd eval RUN --baseline constant --json F`` of trained runs, made with the same
``--seed`` and ``--replicas``::

    python experiments/assembly_handmade_grid.py --replicas 512 --seed 303 \\
        --ks 1 2 3 5 10 20 30 50 100 --toffs 0.9 --field-cost-every 20 > pareto_handmade.jsonl
    controlmd eval RUN_DIR --replicas 512 --seed 303 --baseline constant --json trained_s0.json
    python experiments/assembly_pareto.py pareto_handmade.jsonl --trained trained_s0.json \\
        --out experiments/results/assembly_pareto

Writes ``OUT.json`` (every point, the hand-made Pareto front, and for each trained field the
hand-made yield interpolated at its field cost) and ``OUT.png``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from controlmd.evaluation import pareto_front


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("handmade", type=Path, help="JSON lines of assembly_handmade_grid.py")
    ap.add_argument("--trained", type=Path, nargs="*", default=[], help="controlmd eval JSONs")
    ap.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.handmade.read_text().splitlines() if line.strip()]
    constant = {
        "label": "constant eps = 6",
        "k": 0.0,
        "mean": rows[0]["baseline_mean"],
        "field_cost": 0.0,
    }
    handmade = [
        {
            "label": f"k = {r['k']:g}, off {r['t_off']:g} T",
            "k": r["k"],
            "t_off": r["t_off"],
            "mean": r["mean"],
            "se": r["se"],
            "paired_vs_constant": r["paired_difference"],
            "paired_se": r["paired_se"],
            "field_cost": r["field_cost"],
            "n": r["n"],
            "seed": r["seed"],
        }
        for r in rows
    ]
    scan = sorted([constant, *handmade], key=lambda p: p["field_cost"])
    costs = np.array([p["field_cost"] for p in scan])
    yields = np.array([p["mean"] for p in scan])
    trained = []
    for path in args.trained:
        e = json.loads(path.read_text())
        cost = float(e["field_cost"])
        trained.append(
            {
                "label": path.stem,
                "mean": e["mean"],
                "se": e["se"],
                "paired_vs_constant": e["paired_difference"],
                "paired_se": e["paired_se"],
                "field_cost": cost,
                "n": e["n"],
                # the hand-made scan at the same cost (linear in cost between scan points)
                "handmade_at_same_cost": float(np.interp(cost, costs, yields)),
            }
        )
    result = {
        "constant": constant,
        "handmade": handmade,
        "handmade_pareto_front": pareto_front([constant, *handmade], cost="field_cost"),
        "trained": trained,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    se = [p.get("se", 0.0) for p in scan]
    ax.errorbar(
        np.maximum(costs, 1.0), yields, yerr=se, marker="o", label="hand-made k scan (off 0.9 T)"
    )
    for p in handmade:
        ax.annotate(
            f"k={p['k']:g}",
            (max(p["field_cost"], 1.0), p["mean"]),
            xytext=(4, 6),
            textcoords="offset points",
            fontsize=7,
        )
    for j, p in enumerate(trained):
        ax.errorbar(p["field_cost"], p["mean"], yerr=p["se"], marker="*", ms=12, ls="none")
        ax.annotate(
            p["label"],
            (p["field_cost"], p["mean"]),
            xytext=(4, -14 - 9 * j),
            textcoords="offset points",
            fontsize=7,
        )
    ax.set_xscale("log")
    ax.set_xlabel("field cost ∫ mean_i |F_i|² dt (constant: drawn at 1)")
    ax.set_ylabel("heptamer yield")
    n = handmade[0]["n"] if handmade else math.nan
    ax.set_title(f"assembly: yield vs field cost ({n} paired replicas)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    for p in [constant, *handmade, *trained]:
        print(f"{p['label']:28s} yield {p['mean']:.3f}  field cost {p['field_cost']:8.1f}")


if __name__ == "__main__":
    main()
