"""Derivative-free search of an experiment's protocol by CMA-ES, written as a run folder.

Usage::

    python experiments/cmaes_search.py experiments/polymer_handmade_hairpin.toml \
        --generations 15 --popsize 12 --replicas 128 --sigma0 0.3 --seed 0 \
        --out experiments/results/polymer_search_hairpin_s0

The searched protocol is ``--n-pieces`` constant pieces per channel of the experiment's task
(:class:`controlmd.search.CMAES`: normalized values in ``[-1, 1]`` mapped to the task's
bounds, starting from their middle), with the experiment's ``[protocol] release_fraction``
(every candidate is the no-control value on the last fraction of the horizon). Each
candidate is scored by the task's exact metric on ``--replicas`` replicas of batch seed
``seed + generation`` (common random numbers within a generation). Use seeds far apart for
independent searches (batch seeds ``seed .. seed + generations - 1``), and never the seed of
the final comparison.

``OUT`` gets ``config.toml`` (the experiment with ``[protocol] init`` set to the incumbent,
``train.iterations = 0``: ``controlmd run`` on it rebuilds the protocol and scores it),
``protocol.pt`` (the incumbent, CMA-ES's distribution mean) and ``search.json`` (per
generation: forward MD steps, wall seconds, the best candidate's metric on its batch and the
incumbent's channel values), each rewritten atomically after every generation, so a killed
search leaves the last finished generation. Score the result on fresh paired replicas with
``controlmd eval OUT --replicas N --seed S --baseline SPEC``.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from controlmd.checkpoint import atomic_write_text
from controlmd.config import build_task, config_to_toml, load_config
from controlmd.protocols import PiecewiseConstant
from controlmd.search import CMAES


def piece_values(protocol: PiecewiseConstant) -> list[list[float]]:
    """The value of every channel on every piece ``[K][k]`` (physical units)."""
    with torch.no_grad():
        u = protocol.squash(protocol.values)
    return [[float(v) for v in row] for row in u]


def run_config(
    cfg: dict[str, Any], values: list[list[float]], name: str, notes: str
) -> dict[str, Any]:
    """The experiment's config holding ``values`` as its protocol, with no training."""
    out = copy.deepcopy(cfg)
    out["experiment"]["name"] = name
    out["experiment"]["notes"] = notes
    out["protocol"]["n_pieces"] = len(values)
    out["protocol"]["init"] = values
    out["train"]["iterations"] = 0
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--generations", type=int, default=15)
    parser.add_argument("--popsize", type=int, default=None)
    parser.add_argument("--replicas", type=int, default=128)
    parser.add_argument("--sigma0", type=float, default=0.3)
    parser.add_argument("--n-pieces", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    cfg = load_config(args.experiment, args.set)
    task = build_task(cfg)
    search = CMAES(
        task,
        n_pieces=args.n_pieces,
        replicas=args.replicas,
        seed=args.seed,
        sigma0=args.sigma0,
        popsize=args.popsize,
        release_fraction=cfg["protocol"].get("release_fraction", 0.0),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "experiment": str(args.experiment),
        "overrides": args.set,
        "generations": args.generations,
        "popsize": search.popsize,
        "replicas": args.replicas,
        "sigma0": args.sigma0,
        "n_pieces": args.n_pieces,
        "seed": args.seed,
        "metric_name": task.metric_name,
        "history": [],
    }
    bar = tqdm(total=args.generations, desc="cma-es", unit="gen")

    def after_generation(s: Any) -> None:
        incumbent = s.incumbent()
        values = piece_values(incumbent)
        record["history"].append(
            {
                "generation": s.generation,
                "md_steps": s.md_steps,
                "wall_s": round(s.wall_s, 1),
                "best_candidate_metric": -s.sign * s.best_score,
                "incumbent": values,
            }
        )
        name = f"{cfg['experiment']['name']}_cmaes"
        notes = (
            f"CMA-ES search of {args.experiment.name}: incumbent after {s.generation} generations"
        )
        config = run_config(cfg, values, name, notes)
        atomic_write_text(args.out / "config.toml", config_to_toml(config))
        incumbent.save(args.out / "protocol.pt")
        atomic_write_text(args.out / "search.json", json.dumps(record, indent=1) + "\n")
        bar.update(1)
        bar.set_postfix(best=f"{-s.sign * s.best_score:.3f}")

    search.learn(args.generations, after_generation)
    bar.close()


if __name__ == "__main__":
    main()
