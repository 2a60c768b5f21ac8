"""Trainer: validation, gradient estimators against the exact gradient, gradient paths,
optimizers, schedules, clipping, callbacks, seeded reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from controlmd.callbacks import Callback, EarlyStopping, EvalCallback
from controlmd.errors import ControlMDError
from controlmd.logger import Logger
from controlmd.protocols import make_protocol
from controlmd.tasks.trap_drag import TrapDrag
from controlmd.train import Trainer


def _task() -> TrapDrag:
    return TrapDrag(n_steps=20)


def _protocol(task: TrapDrag, degree: int = 2):
    lo, hi = task.make_protocol_bounds()
    return make_protocol(
        "chebyshev",
        dim=1,
        t_final=task.t_f,
        low=float(lo),
        high=float(hi),
        degree=degree,
        init=[0.0, task.lambda_f],
    )


def _exact_gradient(task: TrapDrag, protocol) -> torch.Tensor:
    W = task.mean_work(task.step_centers(protocol))
    return torch.cat([g.flatten() for g in torch.autograd.grad(W, list(protocol.parameters()))])


def test_constructor_validates() -> None:
    task = _task()
    p = _protocol(task)
    with pytest.raises(ControlMDError, match="unknown optimizer 'adamm'; expected one of: adam"):
        Trainer(task, p, optimizer="adamm")
    with pytest.raises(ControlMDError, match="needs a window"):
        Trainer(task, p, gradient="checkpoint")
    with pytest.raises(ControlMDError, match="does not support it"):
        Trainer(task, p, gradient="adjoint")
    with pytest.raises(ControlMDError, match="lbfgs"):
        Trainer(task, p, optimizer="lbfgs", estimator="score")
    big = make_protocol("mlp", dim=1, t_final=1.0, hidden=[16, 16])
    with pytest.raises(ControlMDError, match="one rollout per parameter"):
        Trainer(task, big, estimator="forward")
    with pytest.raises(ControlMDError, match="lr must be > 0, got 0"):
        Trainer(task, p, lr=0.0)


def test_cosine_schedule_takes_its_horizon_from_learn() -> None:
    """Without schedule_iterations the cosine schedule ends at the first learn() call's count."""
    task = _task()
    trainer = Trainer(task, _protocol(task), lr=0.1, lr_min=0.01, lr_schedule="cosine", replicas=4)
    trainer.learn(4, progress=False)
    assert trainer.lr_at(0) == pytest.approx(0.1)
    assert trainer.lr_at(2) == pytest.approx(0.055)
    assert trainer.lr_at(4) == pytest.approx(0.01)


def test_estimator_outside_the_task_capabilities_is_refused() -> None:
    from controlmd.tasks import get_task

    task = get_task("isomerization", n_steps=10)
    protocol = make_protocol(
        "piecewise_constant", dim=1, t_final=task.horizon, n_pieces=2, low=-1.0, high=1.0
    )
    with pytest.raises(
        ControlMDError,
        match="estimator = 'score' is not supported by task "
        "'isomerization'; it supports \\['pathwise', 'forward'\\]",
    ):
        Trainer(task, protocol, estimator="score")


@pytest.mark.parametrize("estimator", ["pathwise", "score"])
def test_stochastic_gradients_are_unbiased(estimator: str) -> None:
    """Against the exact gradient of the mean work from the mean dynamics:
    E|g - grad|^2 = tr Cov(g), estimated from 16 replica groups."""
    task = _task()
    protocol = _protocol(task)
    exact = _exact_gradient(task, protocol)
    trainer = Trainer(
        task,
        protocol,
        replicas=1024 if estimator == "pathwise" else 2048,
        estimator=estimator,
        grad_groups=16,
        variance_every=1,
        seed=3,
    )
    est = trainer.estimate_gradient(3, with_variance=True)
    loss, grads, stats = est.loss, est.grads, est.stats
    g = torch.cat([x.flatten() for x in grads])
    assert float(((g - exact) ** 2).sum()) < 9.0 * stats["grad_var"]
    assert stats["grad_var"] < 0.05 * float((exact**2).sum())  # and informative
    assert float(loss) == pytest.approx(task.exact_metric(protocol), rel=0.05)


def test_forward_mode_equals_reverse_mode() -> None:
    task = _task()
    reverse = Trainer(task, _protocol(task), replicas=32)
    forward = Trainer(task, _protocol(task), replicas=32, estimator="forward")
    r, f = reverse.estimate_gradient(5), forward.estimate_gradient(5)
    loss_r, g_r, loss_f, g_f = r.loss, r.grads, f.loss, f.grads
    torch.testing.assert_close(loss_f, loss_r)
    for a, b in zip(g_f, g_r):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert forward.md_steps == 3 * 32 * task.n_steps  # one dual rollout per parameter


@pytest.mark.parametrize(("gradient", "window"), [("checkpoint", 7), ("truncated", 100)])
def test_gradient_paths_match_direct_backprop(gradient: str, window: int) -> None:
    task = _task()
    direct = Trainer(task, _protocol(task), replicas=16)
    other = Trainer(task, _protocol(task), replicas=16, gradient=gradient, window=window)
    g_d, g_o = direct.estimate_gradient(2).grads, other.estimate_gradient(2).grads
    for a, b in zip(g_o, g_d):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_seeded_runs_are_identical_and_seeds_matter() -> None:
    task = _task()

    def run(seed: int) -> torch.Tensor:
        p = _protocol(task)
        Trainer(task, p, replicas=8, lr=0.05, seed=seed).learn(3)
        return p.coef.detach().clone()

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_lbfgs_with_frozen_noise_solves_the_sample_problem() -> None:
    task = _task()
    protocol = _protocol(task, degree=3)
    start = task.exact_metric(protocol)
    trainer = Trainer(
        task,
        protocol,
        optimizer="lbfgs",
        lr=1.0,
        replicas=256,
        frozen_noise=True,
        lbfgs_max_iter=15,
        variance_every=0,
    )
    trainer.learn(2)
    W_star = task.discrete_optimum()[0]
    assert task.exact_metric(protocol) < W_star + 0.05 * (start - W_star)
    assert trainer.md_steps > 2 * 256 * task.n_steps  # line-search evaluations are counted


def test_learning_rate_schedules() -> None:
    task = _task()
    p = _protocol(task)
    cos = Trainer(task, p, lr=1.0, lr_schedule="cosine", lr_min=0.1, schedule_iterations=10)
    assert cos.lr_at(0) == pytest.approx(1.0) and cos.lr_at(10) == pytest.approx(0.1)
    assert cos.lr_at(5) == pytest.approx(0.55)
    assert Trainer(task, p, lr=1.0, lr_schedule="exponential", lr_gamma=0.9).lr_at(
        3
    ) == pytest.approx(0.729)
    assert Trainer(task, p, lr=1.0, lr_schedule="step", lr_gamma=0.5, lr_step=4).lr_at(
        9
    ) == pytest.approx(0.25)


def test_gradient_clipping_bounds_the_update() -> None:
    task = _task()
    p = _protocol(task)
    before = p.coef.detach().clone()
    trainer = Trainer(task, p, optimizer="sgd", lr=1.0, clip=0.01, replicas=16)
    trainer.learn(1)
    assert trainer.last["grad_norm"] > 0.01
    assert float(torch.linalg.vector_norm(p.coef.detach() - before)) == pytest.approx(
        0.01, rel=1e-6
    )


def test_logged_scalars_budgets_and_callbacks() -> None:
    task = _task()
    logger = Logger()
    trainer = Trainer(
        task, _protocol(task), replicas=8, variance_every=2, grad_groups=4, logger=logger
    )

    class Stop(Callback):
        def on_step(self) -> bool:
            return self.trainer.iteration < 3

    evaluator = EvalCallback(every=2, n_replicas=10)
    trainer.learn(10, [evaluator, Stop()])
    assert trainer.iteration == 3
    for key in (
        "train/loss",
        "train/grad_norm",
        "train/lr",
        "train/grad_var",
        "budget/md_steps",
        "budget/grad_steps",
        "time/wall_s",
        "outcome/metric",
        "outcome/metric_exact",
    ):
        assert key in logger.latest, key
    train_steps = 3 * 8 * task.n_steps
    assert trainer.grad_steps == train_steps
    assert (
        trainer.md_steps == train_steps + 2 * 10 * task.n_steps
    )  # evaluations before training and at 2
    assert math.isfinite(logger.latest["train/grad_var"]) and trainer.wall_s > 0


def test_early_stopping_stops_without_improvement() -> None:
    task = _task()
    trainer = Trainer(task, _protocol(task), replicas=4, lr=1e-9, variance_every=0)
    evaluator = EvalCallback(every=1, n_replicas=4)
    trainer.learn(50, [evaluator, EarlyStopping(evaluator, patience=2, min_delta=0.1)])
    assert trainer.iteration == 2


def test_documented_task_example_trains() -> None:
    """The ~40-line task of docs/trainer.md runs with the public API and learns to push right."""
    from pathlib import Path

    from controlmd.tasks import registry as task_registry
    from controlmd.train import evaluate

    doc = (Path(__file__).resolve().parents[1] / "docs" / "trainer.md").read_text()
    code = doc.split("<!-- example: new-task -->\n```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 45
    namespace: dict = {}
    try:
        exec(compile(code, "docs/trainer.md", "exec"), namespace)
        task = namespace["BarrierCrossing"]()
        protocol = make_protocol(
            "chebyshev", dim=1, t_final=task.horizon, low=-3.0, high=3.0, degree=2
        )
        before = evaluate(task, protocol, 400, seed=1).mean
        Trainer(task, protocol, lr=0.1, replicas=64, variance_every=0).learn(15)
        after = evaluate(task, protocol, 400, seed=1).mean
    finally:
        task_registry._TASKS.pop("barrier_crossing", None)
    assert after > before + 0.1
    u = protocol(torch.linspace(0.0, task.horizon, 20, dtype=torch.float64)).detach()
    assert float(u.mean()) > 0.5
