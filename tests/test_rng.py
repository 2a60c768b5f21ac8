"""Per-replica random streams: the counter-based ``"philox"`` kind against its reference
(Random123's known-answer vector), its statistics, reproducibility and independence of the
batch it is drawn in; the default ``"mt19937"`` kind unchanged."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from controlmd.config import load_config
from controlmd.dynamics.brownian import Brownian
from controlmd.dynamics.langevin import Langevin
from controlmd.errors import ConfigError, ControlMDError
from controlmd.experiment import run_experiment
from controlmd.potentials.external import HarmonicTrap
from controlmd.protocols import make_protocol
from controlmd.rng import (
    SEED_STRIDE,
    ReplicaRNG,
    _philox_words,
    _uniform_pairs,
    _uniform_pairs_words,
    compile_philox,
    default_rng_kind,
    philox4x32,
    replica_seed,
    use_rng,
)
from controlmd.simulate import simulate
from controlmd.tasks import get_task

F64 = torch.float64


def test_philox_known_answer() -> None:
    """Random123 kat_vectors, philox4x32-10 with the pi key: counter -> output words."""
    counter = [torch.tensor([w]) for w in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)]
    out = [int(w) for w in philox4x32(*counter)]
    assert out == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_default_kind_is_mt19937_and_unchanged() -> None:
    """Without a kind, streams are the per-replica mt19937 generators of earlier versions."""
    assert default_rng_kind() == "mt19937"
    rng = ReplicaRNG(5, 3)
    assert rng.kind == "mt19937"
    x = rng.randn(4, 2)
    for i in range(3):
        g = torch.Generator().manual_seed(replica_seed(5, i))
        assert torch.equal(x[i], torch.randn((4, 2), generator=g, dtype=F64))


def test_use_rng_sets_the_default_in_a_block() -> None:
    with use_rng("philox"):
        assert ReplicaRNG(0, 2).kind == "philox"
        assert ReplicaRNG(0, 2, kind="mt19937").kind == "mt19937"
    assert ReplicaRNG(0, 2).kind == "mt19937"
    with pytest.raises(ControlMDError, match="rng 'pcg'"):
        with use_rng("pcg"):
            pass
    with pytest.raises(ControlMDError, match="kind 'pcg'"):
        ReplicaRNG(0, 2, kind="pcg")
    with pytest.raises(ControlMDError, match="seed=-1"):
        ReplicaRNG(-1, 2, kind="philox")


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_philox_replica_independent_of_batch(seed: int) -> None:
    """Replica i of a batch seeded s = a one-replica run seeded replica_seed(s, i) = the
    same replica held by another shard, whatever B, for mixed draws of several shapes."""
    big = ReplicaRNG(seed, 9, kind="philox")
    shard = ReplicaRNG(seed, 4, first_replica=5, kind="philox")
    draws_big = [big.randn(3, 2), big.rand(5), big.randn(1), big.randn(1), big.randn(7)]
    draws_shard = [shard.randn(3, 2), shard.rand(5), shard.randn(1), shard.randn(1), shard.randn(7)]
    for i in (0, 4, 6, 8):
        one = ReplicaRNG(replica_seed(seed, i), 1, kind="philox")
        draws_one = [one.randn(3, 2), one.rand(5), one.randn(1), one.randn(1), one.randn(7)]
        for a, b in zip(draws_big, draws_one):
            assert torch.equal(a[i], b[0])
        if i >= 5:
            for a, b in zip(draws_big, draws_shard):
                assert torch.equal(a[i], b[i - 5])


def test_philox_stream_is_independent_of_draw_shapes() -> None:
    """A replica's stream is one sequence of slots: how it is cut into draws does not
    matter, the float32 noise is the float64 noise rounded, and a state replays."""
    a = ReplicaRNG(11, 4, kind="philox")
    parts = torch.cat([a.randn(3), a.randn(1), a.randn(2, 2).flatten(1), a.randn(5)], dim=1)
    b = ReplicaRNG(11, 4, kind="philox")
    assert torch.equal(parts, b.randn(13))
    c = ReplicaRNG(11, 4, kind="philox")
    assert torch.equal(c.randn(13, dtype=torch.float32), parts.float())
    state = c.get_state()
    after = c.randn(6)
    replay = c.restored(state)
    assert torch.equal(replay.randn(6), after)
    c.set_state(state)
    assert torch.equal(c.randn(6), after)


def test_philox_statistics() -> None:
    """Normals: mean 0, variance 1, the fraction below 1 equals Phi(1); uniforms: mean 1/2,
    variance 1/12; no correlation between neighbouring replicas nor between consecutive
    draws of one replica; all within 5 standard errors."""
    n = 200_000
    rng = ReplicaRNG(3, n, kind="philox")
    z = rng.randn(3)  # [n, 3]
    x = z.flatten()
    m = x.numel()
    assert abs(x.mean().item()) < 5 / math.sqrt(m)
    assert abs(x.var().item() - 1.0) < 5 * math.sqrt(2 / m)
    p = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    assert abs((x < 1.0).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / m)
    assert abs((x**4).mean().item() - 3.0) < 5 * math.sqrt(96 / m)
    tol = 5 / math.sqrt(n)
    assert abs((z[1:, 0] * z[:-1, 0]).mean().item()) < tol  # neighbouring replicas
    assert abs((z[:, 0] * z[:, 1]).mean().item()) < tol  # consecutive slots (one block)
    assert abs((z[:, 1] * z[:, 2]).mean().item()) < tol  # across blocks
    u = rng.rand(2)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / u.numel())
    assert abs((u[:, 0] - 0.5).mul(u[:, 1] - 0.5).mean().item()) < 5 / 12 / math.sqrt(n)
    # different batch seeds: uncorrelated streams
    w = ReplicaRNG(4, n, kind="philox").randn(1)[:, 0]
    assert abs((w * z[:, 0]).mean().item()) < tol


def test_philox_streams_distinct_beyond_32_bit_seeds() -> None:
    """Seeds equal modulo 2**32 (same mt19937 stream) give different philox streams."""
    a = ReplicaRNG(5, 1, kind="philox").randn(8)
    b = ReplicaRNG(5 + 2**32, 1, kind="philox").randn(8)
    assert not torch.allclose(a, b)
    assert SEED_STRIDE > 1


@pytest.mark.parametrize("integrator", ["brownian", "langevin"])
def test_philox_trajectory_reproducible_and_batch_independent(integrator: str) -> None:
    """A trajectory with philox noise repeats exactly, and replica i of a batch of 6 is the
    one-replica run seeded replica_seed(s, i)."""
    trap = HarmonicTrap(2.0)

    def run(seed: int, B: int) -> torch.Tensor:
        if integrator == "brownian":
            md = Brownian(trap, dt=0.01, kT=0.7, gamma=1.5)
        else:
            md = Langevin(trap, dt=0.01, kT=0.7, gamma=1.5)
        R0 = torch.full((B, 2, 3), 0.3, dtype=F64)
        state = md.init(R0, rng=ReplicaRNG(seed, B, kind="philox"))
        return simulate(md, state, 30).final.R

    batch = run(13, 6)
    assert torch.equal(batch, run(13, 6))
    for i in (0, 3, 5):
        assert torch.equal(batch[i], run(replica_seed(13, i), 1)[0])


def test_philox_ou_stationary_variance() -> None:
    """Exact OU steps with philox noise sample the trap's Boltzmann variance kT/k."""
    k, kT, B = 3.0, 0.5, 20_000
    bd = Brownian(HarmonicTrap(k), dt=0.05, kT=kT, gamma=1.0, method="exact_ou")
    state = bd.init(torch.zeros(B, 1, 1, dtype=F64), rng=ReplicaRNG(21, B, kind="philox"))
    x = simulate(bd, state, 60).final.R.flatten()  # 60 steps: relaxed to e^-9
    assert abs(x.var().item() - kT / k) < 5 * (kT / k) * math.sqrt(2 / B)
    assert abs(x.mean().item()) < 5 * math.sqrt(kT / k / B)


_TINY = """
[experiment]
name = "tiny"
{extra}

[task]
name = "trap_drag"
n_steps = 10

[protocol]
kind = "chebyshev"
degree = 2

[train]
iterations = 1
replicas = 8
{train}

[eval]
final_replicas = 16

[logging]
tensorboard = false
plots = false
"""


def test_experiment_rng_key(tmp_path: Path) -> None:
    """``[experiment] rng``: absent (old run folders) reads as mt19937; philox is taken
    (also with checkpointed windows); a bad value raises naming the key."""
    path = tmp_path / "exp.toml"
    path.write_text(_TINY.format(extra="", train=""))
    assert load_config(path)["experiment"]["rng"] == "mt19937"
    path.write_text(_TINY.format(extra='rng = "philox"', train=""))
    assert load_config(path)["experiment"]["rng"] == "philox"
    path.write_text(_TINY.format(extra='rng = "pcg"', train=""))
    with pytest.raises(ConfigError, match="rng"):
        load_config(path)
    path.write_text(
        _TINY.format(extra='rng = "philox"', train='gradient = "checkpoint"\nwindow = 5')
    )
    assert load_config(path)["train"]["gradient"] == "checkpoint"


@pytest.mark.parametrize("kind", ["mt19937", "philox"])
def test_checkpointed_windows_replay_the_streams(kind: str) -> None:
    """A checkpointed gradient recomputes each window from its start with the streams
    restored there: the same gradient as direct backprop, for either kind of stream."""
    task = get_task("trap_drag", n_steps=20)
    grads = []
    for gradient in ("direct", "checkpoint"):
        protocol = make_protocol(
            "chebyshev", dim=1, t_final=task.horizon, degree=3, low=-10.0, high=15.0
        )
        with use_rng(kind):
            final = task.rollout(protocol, 8, seed=3, gradient=gradient, window=5)
        task.loss(final).backward()
        grads.append(torch.cat([p.grad.flatten() for p in protocol.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)


def test_experiment_runs_with_the_configured_rng(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run with ``rng = "philox"`` builds its task streams as philox and repeats exactly;
    the default run draws other noise."""
    kinds: list[str] = []
    original = ReplicaRNG.__init__

    def spy(self: ReplicaRNG, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        kinds.append(self.kind)

    monkeypatch.setattr(ReplicaRNG, "__init__", spy)
    path = tmp_path / "exp.toml"
    path.write_text(_TINY.format(extra='rng = "philox"', train=""))
    cfg = load_config(path)
    a = run_experiment(cfg, out=tmp_path / "a", progress=False).metrics
    assert kinds and set(kinds) == {"philox"}
    b = run_experiment(cfg, out=tmp_path / "b", progress=False).metrics
    assert (a["metric_initial"], a["metric_final"]) == (b["metric_initial"], b["metric_final"])
    assert default_rng_kind() == "mt19937"
    kinds.clear()
    cfg["experiment"]["rng"] = "mt19937"
    c = run_experiment(cfg, out=tmp_path / "c", progress=False).metrics
    assert set(kinds) == {"mt19937"}
    assert c["metric_initial"] != a["metric_initial"]  # same replicas, other noise


@pytest.mark.slow
def test_compiled_philox_is_bit_identical() -> None:
    """The torch.compile-d block kernel gives exactly the eager streams (several shapes)."""
    shapes = [(5, (3,)), (64, (7, 2)), (300, (1,))]
    eager = [ReplicaRNG(9, B, kind="philox") for B, _ in shapes]
    ref = [
        [r.randn(*shape), r.rand(*shape), r.randn(*shape)] for r, (_, shape) in zip(eager, shapes)
    ]
    compile_philox(True)
    try:
        fast = [ReplicaRNG(9, B, kind="philox") for B, _ in shapes]
        got = [
            [r.randn(*shape), r.rand(*shape), r.randn(*shape)]
            for r, (_, shape) in zip(fast, shapes)
        ]
    finally:
        compile_philox(False)
    for a, b in zip(ref, got):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.slow
def test_fused_box_muller_normals() -> None:
    """compile_philox(box_muller=True): normals within 3 ulp of the eager ones (the
    compiled log/cos/sin are not the eager ones), uniforms bit-identical, and still one
    stream per replica: replica i of a batch = a one-replica run, float32 = float64
    rounded."""
    B = 1000
    eager = ReplicaRNG(9, B, kind="philox")
    ref = [eager.randn(3), eager.rand(2), eager.randn(1, 1), eager.randn(2)]
    compile_philox(True, box_muller=True)
    try:
        fused = ReplicaRNG(9, B, kind="philox")
        got = [fused.randn(3), fused.rand(2), fused.randn(1, 1), fused.randn(2)]
        ones = []
        for i in (0, 517, B - 1):
            one = ReplicaRNG(replica_seed(9, i), 1, kind="philox")
            ones.append([one.randn(3), one.rand(2), one.randn(1, 1), one.randn(2)])
        single = ReplicaRNG(9, B, kind="philox").randn(3, dtype=torch.float32)
    finally:
        compile_philox(False)
    assert torch.equal(ref[1], got[1])
    for x, y in zip(ref, got):
        assert ((x - y).abs() <= 3 * torch.finfo(F64).eps * x.abs()).all()
    for i, one in zip((0, 517, B - 1), ones):
        for x, y in zip(got, one):
            assert torch.equal(x[i], y[0])
    assert torch.equal(single, got[0].float())


def test_stacked_philox_equals_the_word_form() -> None:
    """The eager draws' stacked rounds (two words per tensor) and the word-by-word form
    that torch.compile fuses give the same words and uniforms, bit for bit, including
    counters whose block index crosses 2**32."""
    g = torch.Generator().manual_seed(0)
    c = [torch.randint(0, 2**32, (257,), generator=g, dtype=torch.int64) for _ in range(4)]
    for a, b in zip(philox4x32(*c), _philox_words(*c)):
        assert torch.equal(a, b)
    block = torch.arange(2**32 - 3, 2**32 + 4, dtype=torch.int64)
    seeds = torch.randint(0, 2**32, (5, 2), generator=g, dtype=torch.int64)
    for high in (block >> 32, 1):
        args = (block & 0xFFFFFFFF, high, seeds[:, :1], seeds[:, 1:])
        for a, b in zip(_uniform_pairs(*args), _uniform_pairs_words(*args)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("n_replicas", [1, 7, 10_000])
def test_philox_lookahead_keeps_the_stream(
    n_replicas: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One-block draws computed ahead (several blocks at once, the rest kept) give the
    bits of drawing block by block, through mixed draws, uniforms and a restored state."""
    import controlmd.rng as rng_module

    def draws(r: ReplicaRNG) -> torch.Tensor:
        out = []
        for i in range(30):
            out.append(r.randn(1, 1).reshape(n_replicas, -1))
            if i == 7:
                out += [r.randn(3), r.randn(2, 2).reshape(n_replicas, -1), r.rand(1)]
            if i == 15:
                r = r.restored(r.get_state())
            if i == 20:
                out.append(r.randn(1, dtype=torch.float32).double())
        return torch.cat(out, dim=1)

    ahead = draws(ReplicaRNG(9, n_replicas, kind="philox"))
    monkeypatch.setattr(rng_module, "_LOOKAHEAD_MAX_BLOCKS", 1)
    assert ReplicaRNG(9, n_replicas, kind="philox")._lookahead_blocks() == 1
    one_by_one = draws(ReplicaRNG(9, n_replicas, kind="philox"))
    assert torch.equal(ahead.view(torch.int64), one_by_one.view(torch.int64))
