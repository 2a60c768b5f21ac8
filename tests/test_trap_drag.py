"""trap_drag against its analytic solution (Schmiedl & Seifert, PRL 98, 108301 (2007))."""

from __future__ import annotations

import math

import pytest
import torch

from controlmd.errors import ControlMDError
from controlmd.protocols import FeedbackMLP, MLPProtocol, make_protocol
from controlmd.tasks import get_task
from controlmd.tasks.trap_drag import TrapDrag
from controlmd.train import Trainer, evaluate


def _linear(task: TrapDrag, *, degree: int = 1, bounded: bool = False):
    """lambda = lambda_f t / t_f (exact when unbounded: the squashing bends straight lines)."""
    lo, hi = task.make_protocol_bounds()
    bounds = {"low": float(lo), "high": float(hi)} if bounded else {}
    return make_protocol(
        "chebyshev", dim=1, t_final=task.t_f, degree=degree, init=[0.0, task.lambda_f], **bounds
    )


def _optimal(task: TrapDrag):
    return make_protocol("chebyshev", dim=1, t_final=task.t_f, degree=1, init=task.optimal_protocol)


def test_closed_forms() -> None:
    task = get_task("trap_drag")
    assert task.optimal_work() == pytest.approx(25.0 / 3.0)
    assert task.linear_work() == pytest.approx(25.0 / math.e)
    other = TrapDrag(lambda_f=2.0, t_f=3.0, mu=0.5, k=2.0)
    assert other.optimal_work() == pytest.approx(2.0 * 4.0 / (2.0 + 3.0))
    lam = other.optimal_protocol(torch.tensor([0.0, 3.0], dtype=torch.float64))[:, 0]
    jump = 2.0 / 5.0  # lambda_f / (2 + mu k t_f), at both ends
    assert lam.tolist() == pytest.approx([jump, 2.0 - jump])


@pytest.mark.parametrize(
    "params", [{}, {"lambda_f": 2.0, "t_f": 3.0, "mu": 0.5, "k": 2.0, "kT": 0.5}]
)
def test_discrete_optimum_converges_to_the_continuous_one(params: dict) -> None:
    previous = math.inf
    for n in (10, 40, 160):
        task = TrapDrag(n_steps=n, **params)
        W_n, centers = task.discrete_optimum()
        assert task.optimal_work() <= W_n < previous  # a piecewise-constant protocol cannot beat W*
        previous = W_n
    assert W_n == pytest.approx(task.optimal_work(), rel=2e-5)
    t_mid = (torch.arange(task.n_steps, dtype=torch.float64) + 0.5) * task.dt
    torch.testing.assert_close(
        centers, task.optimal_protocol(t_mid)[:, 0], atol=2e-3 * abs(task.lambda_f), rtol=0
    )
    assert task.exact_metric(_optimal(task)) == pytest.approx(task.optimal_work(), rel=1e-4)
    # the linear protocol held piecewise constant on steps: second-order convergence in dt
    errors = [
        abs(TrapDrag(n_steps=n, **params).exact_metric(_linear(task)) - task.linear_work())
        for n in (40, 160)
    ]
    assert errors[1] < errors[0] / 12 and errors[1] < 1e-4 * task.linear_work()


@pytest.mark.parametrize("method", ["exact_ou", "euler_maruyama"])
def test_simulated_work_matches_the_mean_dynamics(method: str) -> None:
    task = TrapDrag(n_steps=40, method=method)
    for protocol in (_linear(task), _optimal(task)):
        result = evaluate(task, protocol, 3000, seed=11)
        exact = task.exact_metric(protocol)
        assert abs(result.mean - exact) < 4.0 * result.se, (result, exact)


def test_jarzynski_equality_for_the_translated_trap() -> None:
    """<exp(-W/kT)> = exp(-dF/kT) = 1: the work definition, jumps included, is right."""
    task = TrapDrag(lambda_f=1.0, n_steps=20, kT=1.0)
    state = task.rollout(_linear(task), 4000, seed=3, gradient="none")
    w = torch.exp(-task.metric(state) / task.kT)
    assert abs(float(w.mean()) - 1.0) < 4.0 * float(w.std()) / math.sqrt(w.numel())
    assert float(task.metric(state).mean()) > 0.0  # second law


def test_short_training_from_the_linear_protocol_gets_within_1_percent() -> None:
    task = TrapDrag(n_steps=40)
    protocol = _linear(task, degree=3, bounded=True)
    start = task.exact_metric(protocol)
    trainer = Trainer(
        task,
        protocol,
        lr=0.05,
        replicas=128,
        lr_schedule="cosine",
        schedule_iterations=40,
        lr_min=0.005,
        seed=1,
    )
    trainer.learn(40)
    W = task.exact_metric(protocol)
    W_star = task.discrete_optimum()[0]
    assert start > 1.09 * W_star
    assert W < 1.01 * W_star, (start, W, W_star)
    assert trainer.md_steps == trainer.grad_steps == 40 * 128 * 40


def test_feedback_without_observation_weights_equals_open_loop() -> None:
    task = TrapDrag(n_steps=20)
    torch.manual_seed(0)
    feedback = FeedbackMLP(dim=1, t_final=1.0, obs_dim=1, hidden=[8], low=-10.0, high=15.0)
    open_loop = MLPProtocol(dim=1, t_final=1.0, hidden=[8], low=-10.0, high=15.0)
    with torch.no_grad():
        for p in feedback.parameters():
            p.normal_(0.0, 0.3)
        first, last = feedback.net.net[0], feedback.net.net[-1]
        open_loop.net.net[0].weight.copy_(first.weight[:, :-1])
        open_loop.net.net[0].bias.copy_(first.bias)
        open_loop.net.net[-1].load_state_dict(last.state_dict())
        open_loop.net.skip.weight.copy_(feedback.net.skip.weight[:, :-1])
    W_open = task.metric(task.rollout(open_loop, 64, seed=5, gradient="none"))
    with torch.no_grad():
        first.weight[:, -1] = 0.0
        feedback.net.skip.weight[:, -1] = 0.0
    W_zero = task.metric(task.rollout(feedback, 64, seed=5, gradient="none"))
    torch.testing.assert_close(W_zero, W_open, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        feedback.net.skip.weight[:, -1] = 0.5
    W_fb = task.metric(task.rollout(feedback, 64, seed=5, gradient="none"))
    assert float((W_fb - W_open).abs().max()) > 1e-3
    assert task.exact_metric(feedback) is None


def test_bad_arguments() -> None:
    with pytest.raises(ControlMDError, match="t_f must be > 0, got 0"):
        TrapDrag(t_f=0.0)
    with pytest.raises(ControlMDError, match="unstable for mu k dt >= 2"):
        TrapDrag(method="euler_maruyama", k=50.0, n_steps=10)
    with pytest.raises(ControlMDError, match="lambda_f must be a finite number"):
        TrapDrag(lambda_f=float("nan"))


@pytest.mark.parametrize("method", ["exact_ou", "euler_maruyama"])
def test_trajectory_bits_do_not_depend_on_grad_mode(method: str) -> None:
    """Without a graph the exact-OU step reads the trap's controls once per step; with one
    each term reads them itself: positions, work and heat are the same bits."""
    task = TrapDrag(n_steps=40, method=method)
    proto = make_protocol("chebyshev", dim=1, t_final=1.0, degree=3, init=[0.0, 5.0, 1.0, -0.5])
    integ = task.integrator(proto)
    finals = []
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            state = task.initial_state(6, 2)
            for _ in range(task.n_steps):
                state = integ.step(state)
        finals.append(state)
    a, b = finals
    assert b.aux["work"].requires_grad
    for key in ("work", "heat"):
        assert torch.equal(a.aux[key], b.aux[key].detach())
    assert torch.equal(a.R, b.R.detach())
