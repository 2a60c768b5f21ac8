"""Gradient estimators for the whole horizon: the score function for underdamped Langevin
(against the exact gradient of a linear system and central finite differences of a
nonlinear one), replica chunking, the multi-window pathwise estimator, and their errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from controlmd.config import resolve_config
from controlmd.distributed import DistributedContext
from controlmd.dynamics.base import ControlSchedule, Integrator, State
from controlmd.dynamics.langevin import Langevin
from controlmd.dynamics.nose_hoover import NoseHooverChain
from controlmd.dynamics.nve import NVE
from controlmd.errors import ConfigError, ControlMDError
from controlmd.estimators import (
    MixedEstimator,
    MultiWindowEstimator,
    PathwiseEstimator,
    RolloutBatch,
    score_rollout,
)
from controlmd.potentials.base import Potential
from controlmd.protocols import Protocol, make_protocol
from controlmd.rng import ReplicaRNG
from controlmd.tasks.base import ControlChannels, Task, TaskCapabilities
from controlmd.train import Trainer

Tensor = torch.Tensor


class _Trap(Potential):
    """``E = k/2 (x - u_0(t))^2 + a x^4`` for one particle in one dimension."""

    def __init__(self, protocol: Protocol, k: float, quartic: float) -> None:
        super().__init__()
        self.protocol = protocol
        self.k, self.quartic = k, quartic

    def energy(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        center = self.protocol(torch.as_tensor(t, dtype=torch.float64))[..., 0]
        x = R[..., 0]
        return (0.5 * self.k * (x - center) ** 2 + self.quartic * x**4).sum(-1)


class _LangevinTrap(Task[State]):
    """A particle in a moving trap at a controlled temperature: channel 0 the trap centre,
    channel 1 the bath kT. Loss ``mean[(x - 1)^2 + p^2 / 2]`` at ``T``; with
    ``quartic = 0`` the dynamics are linear (an Ornstein-Uhlenbeck process)."""

    name = "langevin_trap_test"
    metric_name = "loss"
    higher_is_better = False
    units = "reduced units"
    capabilities = TaskCapabilities(estimators=("pathwise", "score", "forward"))

    def __init__(
        self, *, quartic: float = 0.0, n_steps: int = 20, dynamics: str = "langevin"
    ) -> None:
        self.quartic, self.n_steps, self.dt, self.dynamics = quartic, n_steps, 0.1, dynamics
        self.controls = ControlChannels(
            ("center", "kT"), (-2.0, 0.5), (2.0, 2.0), ("sigma", "epsilon")
        )

    def initial_state(self, n_replicas: int, seed: int, *, first_replica: int = 0) -> State:
        rng = ReplicaRNG(seed, n_replicas, first_replica=first_replica)
        R = 0.5 * rng.randn(1, 1)
        P = rng.randn(1, 1)  # Maxwell-Boltzmann at kT = 1, m = 1
        return State(R=R, P=P, rng=rng)

    def integrator(self, protocol: Protocol) -> Integrator:
        potential = _Trap(protocol, 2.0, self.quartic)
        kT = ControlSchedule(protocol, 1)
        if self.dynamics == "nve":
            return NVE(potential, dt=self.dt)
        if self.dynamics == "nhc":
            return NoseHooverChain(potential, dt=self.dt, kT=kT)
        return Langevin(potential, dt=self.dt, kT=kT, gamma=1.0)

    def per_replica(self, state: State) -> Tensor:
        assert state.P is not None
        return (state.R[:, 0, 0] - 1.0) ** 2 + 0.5 * state.P[:, 0, 0] ** 2

    def loss(self, state: State) -> Tensor:
        return self.per_replica(state).mean()

    def metric(self, state: State) -> Tensor:
        return self.per_replica(state).detach()


def _smooth(task: _LangevinTrap) -> Protocol:
    return make_protocol(
        "chebyshev",
        dim=2,
        t_final=task.horizon,
        low=[-2.0, 0.5],
        high=[2.0, 2.0],
        degree=2,
        init=[[0.0, 1.0], [1.5, 1.4]],
    )


def _pieces(task: _LangevinTrap, n_pieces: int = 2) -> Protocol:
    return make_protocol(
        "piecewise_constant",
        dim=2,
        t_final=task.horizon,
        low=[-2.0, 0.5],
        high=[2.0, 2.0],
        n_pieces=n_pieces,
        init=[[0.5, 1.0], [1.0, 1.4]],
    )


class _Constant:
    """Stands in for a ReplicaRNG: every draw is ``value``."""

    def __init__(self, value: float, n: int) -> None:
        self.value, self.n = value, n

    def randn(self, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
        return torch.full((self.n, *shape), self.value, dtype=dtype)


def _exact_loss(task: _LangevinTrap, protocol: Protocol) -> Tensor:
    """``E[(x - 1)^2 + p^2 / 2]`` at ``T`` from the mean and covariance of the linear BAOAB
    map ``z' = A z + b + c xi``, with ``A``, ``b``, ``c`` read off the integrator's own step."""
    integrator = task.integrator(protocol)
    mean = torch.zeros(2, dtype=torch.float64)
    cov = torch.diag(torch.tensor([0.25, 1.0], dtype=torch.float64))
    basis_R = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).view(3, 1, 1)
    basis_P = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).view(3, 1, 1)
    for n in range(task.n_steps):
        t = torch.tensor(n * task.dt, dtype=torch.float64)
        zero = integrator.step(State(R=basis_R, P=basis_P, t=t, rng=_Constant(0.0, 3)))  # type: ignore[arg-type]
        one = integrator.step(State(R=basis_R, P=basis_P, t=t, rng=_Constant(1.0, 3)))  # type: ignore[arg-type]
        assert zero.P is not None and one.P is not None
        out = torch.stack([zero.R[:, 0, 0], zero.P[:, 0, 0]], dim=1)  # [3, 2]
        b = out[0]
        A = torch.stack([out[1] - b, out[2] - b], dim=1)
        c = torch.stack([one.R[0, 0, 0], one.P[0, 0, 0]]) - b
        mean = A @ mean + b
        cov = A @ cov @ A.T + torch.outer(c, c)
    return (mean[0] - 1.0) ** 2 + cov[0, 0] + 0.5 * (mean[1] ** 2 + cov[1, 1])


def _flat(grads: list[Tensor]) -> Tensor:
    return torch.cat([g.flatten() for g in grads])


def test_score_step_follows_the_langevin_trajectory() -> None:
    """The score-function rollout visits the positions and momenta of the ordinary one."""
    task = _LangevinTrap(quartic=0.3)
    protocol = _pieces(task)
    with torch.no_grad():
        ref = task.rollout(protocol, 8, 5)
    state, log_p = score_rollout(task, protocol, 8, 5)
    assert state.P is not None and ref.P is not None
    torch.testing.assert_close(state.R, ref.R, rtol=0, atol=1e-12)
    torch.testing.assert_close(state.P, ref.P, rtol=0, atol=1e-12)
    assert not state.R.requires_grad and log_p.requires_grad and log_p.shape == (8,)


@pytest.mark.parametrize("estimator", ["score", "mixed"])
def test_langevin_score_function_matches_the_exact_gradient_of_a_linear_system(
    estimator: str,
) -> None:
    """OU dynamics (harmonic trap, controlled centre and temperature): the score-function
    gradient (and the mixed one: score function for the first 3/4 of the steps, pathwise
    through the last 1/4) agrees with the exact gradient from the mean and covariance,
    within E|g - grad|^2 = tr Cov(g) (estimated from 16 replica groups), and is informative."""
    task = _LangevinTrap()
    protocol = _smooth(task)
    exact_value = _exact_loss(task, protocol)
    exact = _flat(list(torch.autograd.grad(exact_value, list(protocol.parameters()))))
    windows = {"windows": 4} if estimator == "mixed" else {}
    trainer = Trainer(
        task,
        protocol,
        estimator=estimator,
        replicas=4096,
        grad_groups=16,
        seed=1,
        chunk=1024,
        **windows,
    )
    est = trainer.estimate_gradient(11, with_variance=True)
    g = _flat(est.grads)
    assert float(((g - exact) ** 2).sum()) < 9.0 * est.stats["grad_var"]
    assert est.stats["grad_var"] < 0.05 * float((exact**2).sum())
    assert float(est.loss.detach()) == pytest.approx(float(exact_value.detach()), rel=0.05)


@pytest.mark.parametrize("estimator", ["score", "mixed"])
def test_score_function_agrees_with_central_differences_on_common_random_numbers(
    estimator: str,
) -> None:
    """Nonlinear (quartic) trap, piecewise-constant centre and kT: each gradient entry (score
    function; mixed with two windows, one per piece) agrees with the central difference of the
    expected loss on common random numbers within 3 SE."""
    task = _LangevinTrap(quartic=0.5)
    protocol = _pieces(task)
    params = list(protocol.parameters())
    n_groups, B = 16, 256
    windows = {"windows": 2} if estimator == "mixed" else {}
    trainer = Trainer(task, protocol, estimator=estimator, replicas=B, seed=0, **windows)
    G = torch.stack([_flat(trainer.estimate_gradient(100 + s).grads) for s in range(n_groups)])
    g, se_g = G.mean(0), G.std(0) / n_groups**0.5
    h, seed, n = 1e-4, 7, 8192
    flat = _flat([p.detach() for p in params])
    fd, se_fd = torch.zeros_like(flat), torch.zeros_like(flat)
    for j in range(flat.numel()):
        losses = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                p = params[0]
                p.view(-1)[j] += sign * h
                losses.append(task.per_replica(task.rollout(protocol, n, seed)))
                p.view(-1)[j] -= sign * h
        diff = (losses[0] - losses[1]) / (2 * h)
        fd[j], se_fd[j] = diff.mean(), diff.std() / n**0.5
    assert len(params) == 1
    assert ((g - fd).abs() < 3.0 * torch.sqrt(se_g**2 + se_fd**2)).all(), (g, se_g, fd, se_fd)
    assert (fd.abs() > 3.0 * se_fd).sum() >= 3  # the comparison has signal


def test_chunks_give_the_same_gradient_and_variance() -> None:
    """Blocks of replicas sum to the whole batch's gradient (leave-one-out baseline applied
    after the last block), for the score function and the pathwise estimator."""
    task = _LangevinTrap(quartic=0.3)
    for estimator in ("score", "pathwise", "multiwindow", "mixed"):
        windows = 3 if estimator in ("multiwindow", "mixed") else 1
        whole = Trainer(
            task, _pieces(task), estimator=estimator, replicas=64, grad_groups=4, windows=windows
        )
        chunked = Trainer(
            task,
            _pieces(task),
            estimator=estimator,
            replicas=64,
            grad_groups=4,
            chunk=5,
            windows=windows,
        )
        for with_variance in (False, True):
            a = whole.estimate_gradient(3, with_variance=with_variance)
            b = chunked.estimate_gradient(3, with_variance=with_variance)
            torch.testing.assert_close(_flat(a.grads), _flat(b.grads), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=0)
            if with_variance and estimator != "pathwise":  # chunk 0: strided groups
                assert b.stats["grad_var"] == pytest.approx(a.stats["grad_var"], rel=1e-8)
                assert "grad_snr/0" in b.stats


@pytest.mark.parametrize("estimator", ["score", "mixed"])
@pytest.mark.parametrize("dynamics", ["nve", "nhc"])
def test_score_function_refuses_deterministic_dynamics(dynamics: str, estimator: str) -> None:
    task = _LangevinTrap(dynamics=dynamics)
    windows = 2 if estimator == "mixed" else 1
    with pytest.raises(ControlMDError, match="deterministic: its only randomness is the initial"):
        Trainer(task, _pieces(task), estimator=estimator, windows=windows)


def _batch(task: Task[Any], protocol: Protocol, replicas: int, **options: Any) -> RolloutBatch:
    return RolloutBatch(
        task=task,
        protocol=protocol,
        params=list(protocol.parameters()),  # type: ignore[arg-type]
        replicas=replicas,
        shard=DistributedContext().shard(replicas),
        simulate_options={"gradient": "direct", **options},
    )


def test_mixed_with_one_window_is_the_pathwise_estimator() -> None:
    """No score-function steps: the pathwise derivative of the task's loss, same noise (the
    trainer asks for windows >= 2; the estimator itself allows one)."""
    task = _LangevinTrap(quartic=0.3)
    protocol = _pieces(task)
    a = PathwiseEstimator().estimate(_batch(task, protocol, 32), 4, with_variance=False)
    b = MixedEstimator(windows=1).estimate(_batch(task, protocol, 32), 4, with_variance=False)
    torch.testing.assert_close(_flat(a.grads), _flat(b.grads), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-14, atol=0)


def test_mixed_visits_the_ordinary_trajectory_and_scores_only_the_early_steps() -> None:
    """The final states are those of the plain rollout (to round-off when the window boundary
    is a protocol jump; to O(t_eps) for a smooth protocol, whose force the restart at the
    boundary evaluates at t_s + eps instead of t_s - eps); the score-function part covers the
    steps before the last window: its parameters' gradient through log P vanishes for a
    protocol piece that acts only inside the last window."""
    task = _LangevinTrap(quartic=0.3)
    for protocol, atol in ((_pieces(task), 1e-12), (_smooth(task), 1e-7)):
        with torch.no_grad():
            ref = task.rollout(protocol, 8, 5)
        state, log_p = MixedEstimator(windows=2).rollout(_batch(task, protocol, 8), 5, 0, 8)
        assert state.P is not None and ref.P is not None
        torch.testing.assert_close(state.R, ref.R, rtol=0, atol=atol)
        torch.testing.assert_close(state.P, ref.P, rtol=0, atol=atol)
    protocol = _pieces(task)  # two pieces: steps 1-10 and 11-20
    _, log_p = MixedEstimator(windows=2).rollout(_batch(task, protocol, 8), 5, 0, 8)
    (g,) = torch.autograd.grad(log_p.sum(), list(protocol.parameters()))
    assert bool((g[1] == 0).all()) and bool((g[0] != 0).any())


class _CountingTrap(_LangevinTrap):
    """The trap with a loss that has no pathwise derivative (a count, like assembly's yield)."""

    def loss(self, state: State) -> Tensor:
        with torch.no_grad():
            return (state.R[:, 0, 0] > 1.0).to(torch.float64).mean()


def test_mixed_estimator_is_refused_where_it_does_not_apply() -> None:
    task = _LangevinTrap()
    with pytest.raises(ControlMDError, match="windows = 21 exceeds the task's n_steps = 20"):
        Trainer(task, _pieces(task), estimator="mixed", windows=21)
    with pytest.raises(ControlMDError, match=r"'mixed' needs windows >= 2 .* got windows = 1"):
        Trainer(task, _pieces(task), estimator="mixed")
    pathwise_only = _LangevinTrap()
    pathwise_only.capabilities = TaskCapabilities(estimators=("pathwise",))  # type: ignore[misc]
    with pytest.raises(ControlMDError, match=r"'mixed' is not supported .* \(it needs score\)"):
        Trainer(pathwise_only, _pieces(pathwise_only), estimator="mixed", windows=2)
    with pytest.raises(ControlMDError, match="gradient = 'truncated' would not"):
        Trainer(task, _pieces(task), estimator="mixed", windows=2, gradient="truncated", window=5)
    counting = _CountingTrap()
    trainer = Trainer(counting, _pieces(counting), estimator="mixed", windows=2, replicas=4)
    with pytest.raises(ControlMDError, match="loss has no pathwise derivative"):
        trainer.estimate_gradient(0)


@pytest.mark.parametrize("estimator", ["score", "mixed"])
def test_score_function_refuses_langevin_work_it_would_not_count(estimator: str) -> None:
    task = _LangevinTrap()
    integrator = task.integrator
    task.integrator = lambda p: _with_work(integrator(p))  # type: ignore[method-assign]
    with pytest.raises(ControlMDError, match=r"does not count work or heat; .* tracks work"):
        Trainer(task, _pieces(task), estimator=estimator, windows=2 if estimator == "mixed" else 1)


def _with_work(integrator: Integrator) -> Integrator:
    integrator.track_work = True  # type: ignore[attr-defined]
    return integrator


def test_score_function_refuses_a_field_cost_it_would_ignore() -> None:
    task = _LangevinTrap()
    protocol = _pieces(task)
    protocol.field_cost_weight = 1e-3
    with pytest.raises(ControlMDError, match=r"field_cost_weight = 0\.001 would be ignored"):
        Trainer(task, protocol, estimator="score")


def test_one_window_is_the_pathwise_estimator() -> None:
    task = _LangevinTrap(quartic=0.3)
    a = Trainer(task, _pieces(task), replicas=32).estimate_gradient(4, with_variance=True)
    b = Trainer(task, _pieces(task), replicas=32, estimator="multiwindow").estimate_gradient(4)
    torch.testing.assert_close(_flat(a.grads), _flat(b.grads), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-14, atol=0)


def test_multiwindow_signs_agree_with_finite_differences() -> None:
    """Two windows over two pieces: every entry whose central difference (common random
    numbers) is nonzero at 3 SE has the finite difference's sign; the windows' gradients
    differ from the pathwise one (window 1 is credited with the loss at its own end)."""
    task = _LangevinTrap(quartic=0.5)
    protocol = _pieces(task)
    mw = Trainer(task, protocol, replicas=1024, estimator="multiwindow", windows=2)
    g = _flat(mw.estimate_gradient(9).grads)
    pw = _flat(Trainer(task, protocol, replicas=1024).estimate_gradient(9).grads)
    assert not torch.allclose(g, pw)
    p = next(iter(protocol.parameters()))
    h, n, counted = 1e-4, 4096, 0
    for j in range(p.numel()):
        losses = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                p.view(-1)[j] += sign * h
                losses.append(task.per_replica(task.rollout(protocol, n, 2)))
                p.view(-1)[j] -= sign * h
        diff = (losses[0] - losses[1]) / (2 * h)
        fd, se = float(diff.mean()), float(diff.std()) / n**0.5
        if abs(fd) > 3 * se:
            counted += 1
            assert (fd > 0) == (float(g[j]) > 0), (j, fd, se, g)
    assert counted >= 3


def test_estimator_options_are_validated() -> None:
    task = _LangevinTrap()
    with pytest.raises(ControlMDError, match="window_weights has 1 entries; expected one per"):
        Trainer(task, _pieces(task), estimator="multiwindow", windows=2, window_weights=[1.0])
    with pytest.raises(ControlMDError, match="windows apply to estimator = 'multiwindow' or"):
        Trainer(task, _pieces(task), estimator="score", windows=2)
    with pytest.raises(ControlMDError, match="windows = 50 exceeds the task's n_steps = 20"):
        Trainer(task, _pieces(task), estimator="multiwindow", windows=50)
    with pytest.raises(ControlMDError, match="chunk must be"):
        Trainer(task, _pieces(task), estimator="score", chunk=-1)
    assert MultiWindowEstimator(windows=3).bounds(10) == [(0, 3), (3, 6), (6, 10)]


def _raw(train: dict[str, Any]) -> dict[str, Any]:
    return {
        "experiment": {"name": "x"},
        "task": {"name": "trap_drag", "n_steps": 10},
        "protocol": {"kind": "chebyshev", "degree": 2},
        "train": train,
    }


@pytest.mark.parametrize(
    ("train", "match"),
    [
        ({"estimator": "multiwindow", "windows": 3, "window_weights": [1.0]}, "window_weights"),
        ({"estimator": "multiwindow", "window_weights": [1.0, -1.0]}, r"window_weights must be"),
        ({"estimator": "pathwise", "windows": 4}, r"\[train\] windows apply to estimator ="),
        ({"estimator": "mixed", "window_weights": [1.0]}, r"window_weights to 'multiwindow' only"),
        ({"estimator": "mixed"}, r"\[train\] estimator = 'mixed' needs windows >= 2"),
        (
            {"estimator": "mixed", "windows": 2, "gradient": "truncated", "window": 3},
            "'mixed' differentiates its last window in full",
        ),
        ({"estimator": "forward", "chunk": 8}, r"\[train\] chunk = 8 does not apply"),
        ({"estimator": "multiwindow", "optimizer": "lbfgs"}, "lbfgs"),
        ({"chunk": -1}, r"\[train\] chunk must be >= 0"),
    ],
)
def test_config_keys_are_validated(train: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve_config(_raw(train))


def test_config_multiwindow_resolves() -> None:
    cfg = resolve_config(
        _raw({"estimator": "multiwindow", "windows": 2, "window_weights": [0.5, 1.0], "chunk": 4})
    )
    assert cfg["train"]["windows"] == 2 and cfg["train"]["window_weights"] == [0.5, 1.0]


@pytest.mark.parametrize("name", ["polymer_fold_multiwindow.toml", "assembly_multiwindow.toml"])
def test_multiwindow_experiments_build_a_trainer(name: str) -> None:
    from pathlib import Path

    from controlmd.config import build_protocol, build_task, load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments" / name)
    task = build_task(cfg)
    trainer = Trainer.from_config(cfg, task, build_protocol(cfg, task))
    assert isinstance(trainer._estimator, MultiWindowEstimator)
    assert len(trainer._estimator.bounds(task.n_steps)) == cfg["protocol"]["n_pieces"]


def test_training_logs_the_per_piece_signal_to_noise_ratio() -> None:
    """``train/grad_snr/<j>`` (|mean| / SE over replica groups) reaches the logger's sinks."""
    from controlmd.logger import Logger, Sink

    class Memory(Sink):
        def __init__(self) -> None:
            self.rows: list[dict[str, float]] = []

        def write(self, values: dict[str, float], step: int) -> None:
            self.rows.append(dict(values))

    sink = Memory()
    task = _LangevinTrap(quartic=0.3)
    trainer = Trainer(
        task,
        _pieces(task),
        estimator="score",
        replicas=32,
        grad_groups=4,
        variance_every=1,
        logger=Logger([sink]),
    )
    trainer.learn(1, progress=False)
    n_entries = sum(p.numel() for p in trainer.parameters())
    snr = {k: v for k, v in sink.rows[0].items() if k.startswith("train/grad_snr/")}
    assert sorted(snr) == [f"train/grad_snr/{j}" for j in range(n_entries)]
    assert all(v >= 0 for v in snr.values())
