"""Replica ensembles over torch.distributed: a run on 2 gloo processes equals the run on one.

The equivalence tests launch ``torchrun --standalone --nproc_per_node 2`` (float64, CPU,
gloo) and compare with the same experiment trained in this process: protocol parameters,
per-iteration losses, gradient norms and variances, and evaluated metrics agree to 1e-10
(they differ only by the order of floating-point sums).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from controlmd.config import resolve_config
from controlmd.distributed import DistributedContext, Shard, local_groups
from controlmd.errors import ConfigError, ControlMDError
from controlmd.protocols import load_protocol, make_protocol
from controlmd.tasks import get_task, task_names
from controlmd.tasks.trap_drag import TrapDrag
from controlmd.train import Trainer, run_experiment

TOL = 1e-10

# Trap dragging (overdamped Langevin, per-replica noise) with an MLP protocol, float64. Every
# iteration estimates the gradient variance over 3 replica groups (groups straddle the ranks)
# and evaluates 15 held-out replicas (an odd count: unequal evaluation shards).
TINY = {
    "experiment": {"name": "dist", "seed": 11},
    "task": {"name": "trap_drag", "n_steps": 12},
    "protocol": {"kind": "mlp", "hidden": [8, 8], "n_frequencies": 2, "init": [0.0, 5.0]},
    "train": {
        "optimizer": "adam",
        "lr": 0.02,
        "iterations": 4,
        "replicas": 12,
        "grad_groups": 3,
        "variance_every": 1,
        "clip": 50.0,
    },
    "eval": {"replicas": 15, "every": 1, "final_replicas": 63},
    "logging": {
        "tensorboard": False,
        "plots": False,
        "checkpoint_every": 2,
        "histogram_every": 0,
        "progress": False,
    },
}


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# Per-parameter gradient SNRs (|mean| / sd over replica groups) divide group sums in which
# per-replica gradients largely cancel, so a reassociated sum (shards reduced across ranks)
# moves them far more than anything else: measured worst relative change over this run,
# one vs two processes, 7e-11 with MKL_CBWR=COMPATIBLE and 1e-9 with AUTO, while every
# other logged quantity moved by <= 7e-13 (grad_norm) in both.
SNR_TOL = 1e-8


def _close(a: float, b: float, key: str = "") -> bool:
    tol = SNR_TOL if "grad_snr/" in key else TOL
    return abs(a - b) <= tol * max(1.0, abs(a))


# ---------------------------------------------------------------------- sharding rule


def test_shard_refuses_world_size_not_dividing_replicas() -> None:
    two = [DistributedContext(r, 2, backend="gloo") for r in range(2)]
    assert [c.shard(8) for c in two] == [Shard(0, 4, 8), Shard(4, 4, 8)]
    with pytest.raises(
        ConfigError, match=r"replicas = 7 cannot be split over 2 processes.*e\.g\. 6 or 8"
    ):
        two[1].shard(7)
    three = DistributedContext(0, 3, backend="gloo")
    with pytest.raises(
        ConfigError, match=r"replicas = 2 cannot be split over 3 processes.*e\.g\. 3"
    ):
        three.shard(2)
    # Evaluations take any count: contiguous blocks, the first n % W ranks hold one more.
    assert [DistributedContext(r, 3, backend="gloo").split(8) for r in range(3)] == [
        Shard(0, 3, 8),
        Shard(3, 3, 8),
        Shard(6, 2, 8),
    ]


def test_run_with_a_world_size_not_dividing_replicas_writes_nothing(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 controlmd run` of 13 replicas: refused before the run
    folder exists (rank 1's view; the trainer fails before its first collective)."""
    cfg = resolve_config({**TINY, "train": {**TINY["train"], "replicas": 13}})
    out = tmp_path / "run"
    with pytest.raises(
        ConfigError, match=r"replicas = 13 cannot be split over 2 processes.*e\.g\. 12 or 14"
    ):
        run_experiment(cfg, out=out, distributed=DistributedContext(1, 2, backend="gloo"))
    assert not out.exists()


def test_local_groups_partition_the_global_groups() -> None:
    n, G, W = 12, 5, 3
    shards = [DistributedContext(r, W, backend="gloo").shard(n) for r in range(W)]
    per_rank = [local_groups(s, G) for s in shards]
    for g in range(G):
        members = sorted(i + s.first for s, groups in zip(shards, per_rank) for i in groups[g][0])
        assert members == list(range(g, n, G))
        assert sum(groups[g][1] for groups in per_rank) == pytest.approx(1.0, abs=1e-15)
    single = local_groups(Shard(0, n, n), G)
    assert single == [(list(range(g, n, G)), 1.0) for g in range(G)]


def test_trainer_refuses_before_any_collective() -> None:
    """Bad sharding is refused in the constructor, before the first collective (no group exists here)."""
    task = TrapDrag(n_steps=12)
    protocol = make_protocol(
        "chebyshev", dim=1, t_final=task.horizon, degree=2, low=-10.0, high=15.0
    )
    two = DistributedContext(1, 2, backend="gloo")
    with pytest.raises(ConfigError, match="replicas = 7 cannot be split over 2 processes"):
        Trainer(task, protocol, replicas=7, distributed=two)

    class EnsembleLoss(TrapDrag):  # a loss of the ensemble mean: not a mean of per-replica terms
        replica_mean_loss = False

    with pytest.raises(ControlMDError, match="couples replicas"):
        Trainer(EnsembleLoss(n_steps=12), protocol, replicas=8, distributed=two)
    assert Trainer(EnsembleLoss(n_steps=12), protocol, replicas=7).shard == Shard(
        0, 7, 7
    )  # one process: fine


@pytest.mark.parametrize("name", task_names())
def test_task_replicas_do_not_depend_on_the_shard(name: str) -> None:
    """Replica i gets the same start and noise whether it runs in one batch or in shards."""
    task = get_task(name)
    low, high = task.controls.low, task.controls.high
    protocol = (
        None
        if task.controls.dim == 0
        else make_protocol(  # no channels: H0 is learned instead
            "chebyshev",
            dim=task.controls.dim,
            t_final=task.horizon,
            degree=1,
            low=list(low),
            high=list(high),
        )
    )
    with torch.no_grad():
        whole = task.advance(task.initial_state(4, 5), protocol, 3, gradient="none")
        parts = [
            task.advance(task.initial_state(2, 5, first_replica=f), protocol, 3, gradient="none")
            for f in (0, 2)
        ]
    for field in dataclasses.fields(whole):
        value = getattr(whole, field.name)
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == 4:
            torch.testing.assert_close(
                torch.cat([getattr(p, field.name) for p in parts]),
                value,
                rtol=0,
                atol=1e-12,
                msg=f"{name}: {field.name}",
            )
    for key, value in whole.aux.items():
        if value.ndim > 0 and value.shape[0] == 4:
            torch.testing.assert_close(
                torch.cat([p.aux[key] for p in parts]),
                value,
                rtol=0,
                atol=1e-12,
                msg=f"{name}: aux[{key!r}]",
            )


# ---------------------------------------------------------------------- 1 vs 2 processes


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    from controlmd.config import write_config

    cfg = resolve_config(json.loads(json.dumps(TINY)))
    path = tmp_path / "dist.toml"
    write_config(cfg, path)
    one = run_experiment(cfg, out=tmp_path / "one", progress=False)
    proc = _torchrun(
        ["-m", "controlmd.cli", "run", str(path), "--out", str(tmp_path / "two"), "--quiet"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1  # only rank 0 reports

    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (one.metrics["world_size"], two["world_size"]) == (1, 2)
    for key, value in one.metrics.items():
        if key in ("wall_s", "cpu_s", "world_size"):
            continue
        if isinstance(value, float):
            assert _close(value, two[key], key), (key, value, two[key])
        else:
            assert value == two[key], key

    p1, p2 = (
        load_protocol(tmp_path / "one" / "protocol.pt"),
        load_protocol(tmp_path / "two" / "protocol.pt"),
    )
    s1, s2 = p1.state_dict(), p2.state_dict()
    assert s1.keys() == s2.keys()
    for key in s1:
        assert s1[key].dtype == torch.float64
        torch.testing.assert_close(s2[key], s1[key], rtol=TOL, atol=TOL, msg=key)
    initial = load_protocol(tmp_path / "one" / "protocol_initial.pt").state_dict()
    assert any(not torch.equal(s1[key], initial[key]) for key in s1)  # training moved the protocol

    rows1 = [
        json.loads(line) for line in (tmp_path / "one" / "progress.jsonl").read_text().splitlines()
    ]
    rows2 = [
        json.loads(line) for line in (tmp_path / "two" / "progress.jsonl").read_text().splitlines()
    ]
    assert len(rows1) == len(rows2)  # one writer: no duplicated rows
    checked = set()
    for r1, r2 in zip(rows1, rows2):
        assert r1.keys() == r2.keys()
        for key, value in r1.items():
            if key.startswith("time/"):
                continue
            checked.add(key)
            assert _close(value, r2[key], key), (key, value, r2[key])
    assert {"train/loss", "train/grad_norm", "train/grad_var", "outcome/metric"} <= checked


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_for_every_estimator(tmp_path: Path) -> None:
    """Score-function (all-gathered leave-one-out baseline), forward-mode and L-BFGS paths."""
    variants = {
        "score": {"estimator": "score", "optimizer": "adam"},
        "forward": {"estimator": "forward", "optimizer": "sgd", "lr": 0.001},
        "lbfgs": {"estimator": "pathwise", "optimizer": "lbfgs", "lr": 0.5, "lbfgs_max_iter": 3},
    }
    script = tmp_path / "train_variants.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, sys
        from controlmd.config import build_protocol, build_task, resolve_config
        from controlmd.distributed import init_distributed
        from controlmd.train import Trainer

        base, variants = json.loads({json.dumps(json.dumps(TINY))}), json.loads({json.dumps(json.dumps(variants))})
        base["protocol"] = {{"kind": "chebyshev", "degree": 3, "init": [0.0, 5.0]}}
        ctx = init_distributed()
        out = {{}}
        for name, train in variants.items():
            raw = json.loads(json.dumps(base))
            raw["train"].update(train, iterations=3)
            cfg = resolve_config(raw)
            task = build_task(cfg)
            trainer = Trainer.from_config(cfg, task, build_protocol(cfg, task), distributed=ctx)
            losses = [trainer.train_step() for _ in range(3)]
            out[name] = {{"params": [p.detach().flatten().tolist() for p in trainer.parameters()],
                         "info": losses, "eval": trainer.evaluate(15).mean}}
        if ctx.is_main:
            json.dump(out, open(sys.argv[1], "w"))
        ctx.close()
    """)
    )
    proc = _torchrun([str(script), str(tmp_path / "two.json")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one.json")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    for name in variants:
        a, b = one[name], two[name]
        for pa, pb in zip(a["params"], b["params"]):
            assert all(_close(x, y) for x, y in zip(pa, pb)), (name, pa, pb)
        for ia, ib in zip(a["info"], b["info"]):
            for key in ia:
                assert _close(ia[key], ib[key]), (name, key, ia[key], ib[key])
        assert _close(a["eval"], b["eval"]), name
