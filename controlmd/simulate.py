"""Run trajectories: the one entry for every equation of motion and gradient path.

Two ways to integrate, with the same :class:`Trajectory` result:

* :func:`simulate` steps a native integrator (NVE velocity Verlet, Nosé–Hoover chain,
  Langevin BAOAB, Brownian) and chooses how gradients flow back through the steps:

  ===============  ==========================================================  =============
  ``gradient``     what is differentiated                                      memory
  ===============  ==========================================================  =============
  ``"direct"``     the whole trajectory (plain autograd)                       O(n_steps)
  ``"checkpoint"`` the whole trajectory; only window-start states are kept,    O(n_steps/W
                   each window of ``W`` steps is rerun in backward; same       + W)
                   gradient
  ``"truncated"``  each window of ``W`` steps alone: the state is detached     O(W)
                   every ``W`` steps (not the full gradient unless W >= n)
  ``"reversible"`` the whole trajectory, recomputing states backwards           O(n_steps/W)
                   (NVE, Nosé–Hoover chain; final state only; exact states      small states
                   kept every ``W`` steps, default 200; see
                   :mod:`controlmd.dynamics.reversible`); same gradient
  ``"none"``       nothing (``torch.no_grad``)                                 O(1)
  ===============  ==========================================================  =============

  Stochastic integrators replay the same noise when a checkpointed window is recomputed
  (the per-replica generator states at the window start are saved and restored).

* :func:`simulate_ode` integrates a deterministic integrator's vector field (Hamiltonian
  NVE, Nosé–Hoover chain) with torchdiffeq's ``odeint`` or ``odeint_adjoint`` (O(1)
  memory in trajectory length); the integration is split at protocol breakpoints
  (what torchdiffeq's ``jump_t`` does for adaptive solvers, for every method).

Budgets: ``Trajectory.md_steps`` counts forward replica-steps (``B * n_steps``; for the
ODE path ``B *`` the number of vector-field evaluations, i.e. force evaluations) and
``Trajectory.grad_steps`` the replica-steps the backward pass goes through (0 when no
graph is built).

Controls: time-dependent terms are evaluated as one-sided limits inside each step
(:data:`~controlmd.dynamics.base.CONTROL_TIME_OFFSET`); at a step where a protocol held by
the integrator has a breakpoint, ``simulate`` re-evaluates the cached force with the new
control, and the state's time is recomputed from the step count at every segment end.
Each refresh is checked (:func:`refresh`): a cached entry that comes back unchanged (a
wrapper that does not forward ``prepare``) raises instead of applying the old control.

Divergence: the positions and momenta are checked for NaN/inf at the end of every
segment (at most ``check_every`` steps apart); on failure the steps since the last good
check are replayed without gradients to name the first non-finite step, and a
:class:`~controlmd.errors.SimulationDivergedError` is raised.

Per-step I/O goes through reporters (:mod:`controlmd.reporters`): each says how many steps
until it next needs the state and then receives it; ``simulate`` itself writes nothing.

Units: those of the integrator (reduced LJ units for classical tasks).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from torch import nn

from controlmd._validation import check_choice, check_finite, check_int, check_positions
from controlmd.dynamics.base import (
    Integrator,
    State,
    breakpoints,
    evaluate_schedule,
    jump_steps,
    jump_tolerance,
)
from controlmd.dynamics.fused import FusedSteps, fused_steps_setting
from controlmd.dynamics.reversible import simulate_reversible
from controlmd.errors import ControlMDError, SimulationDivergedError
from controlmd.reporters import Reporter

Tensor = torch.Tensor
Observable = Callable[[State], Tensor]

__all__ = [
    "GRADIENT_MODES",
    "ODE_METHODS",
    "Trajectory",
    "final_state",
    "refresh",
    "simulate",
    "simulate_ode",
]

GRADIENT_MODES = ("direct", "checkpoint", "truncated", "reversible", "none")
ODE_METHODS = (
    "dopri5",
    "dopri8",
    "bosh3",
    "fehlberg2",
    "adaptive_heun",
    "euler",
    "midpoint",
    "heun2",
    "heun3",
    "rk4",
    "explicit_adams",
    "implicit_adams",
)
_ADAPTIVE = frozenset({"dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun"})


@dataclass
class Trajectory:
    """Result of :func:`simulate` / :func:`simulate_ode`.

    Attributes:
        final: the state after the last step.
        times: times of the recorded frames ``[n_rec]``.
        records: observable name -> values ``[n_rec, B, ...]`` (differentiable unless
            ``gradient="none"``).
        md_steps: forward replica-steps spent, ``B * n_steps`` (ODE: ``B *`` force
            evaluations).
        grad_steps: replica-steps differentiated through (0 when no graph was built).
    """

    final: State
    times: Tensor
    records: dict[str, Tensor] = field(default_factory=dict)
    md_steps: int = 0
    grad_steps: int = 0


def final_state(
    integrator: Integrator, state: State, n_steps: int, **simulate_options: Any
) -> State:
    """``simulate(integrator, state, n_steps, **simulate_options).final``; within
    :func:`~controlmd.dynamics.fused.use_fused_steps` (``[experiment] fused_steps = K``) the
    same steps by :class:`~controlmd.dynamics.fused.FusedSteps`, ``K`` per compiled call
    (equal to round-off, with the same noise). This is how tasks advance their particles.

    :raises ControlMDError: fused steps with an option they cannot honour (``gradient``
        other than ``"direct"`` / ``"none"``, frames, observables, reporters, windows), or
        with an integrator or potential :class:`FusedSteps` does not run (named there).
    """
    chunk, compile = fused_steps_setting()
    if not chunk:
        return simulate(integrator, state, n_steps, **simulate_options).final
    gradient = simulate_options.pop("gradient", "direct")
    simulate_options.pop("check_every", None)  # a fused run checks after every chunk
    unused = sorted(key for key, value in simulate_options.items() if value)
    if gradient not in ("direct", "none") or unused:
        raise ControlMDError(
            f"[experiment] fused_steps = {chunk} runs gradient = 'direct' or 'none' without "
            f"frames, observables, reporters or windows; got gradient = {gradient!r}"
            + (f" and {unused}" if unused else "")
            + "; set fused_steps = 0 for this run"
        )
    runner = FusedSteps(integrator, chunk=chunk, compile=compile)
    if gradient == "none":
        with torch.no_grad():
            return runner.run(state, n_steps)
    return runner.run(state, n_steps)


def simulate(
    integrator: Integrator,
    state: State,
    n_steps: int,
    *,
    gradient: str = "direct",
    window: int | None = None,
    record_every: int = 0,
    observables: Mapping[str, Observable] | None = None,
    reporters: Sequence[Reporter] = (),
    check_every: int = 100,
) -> Trajectory:
    """Advance ``state`` by ``n_steps`` steps of ``integrator``.

    :param integrator: the equation of motion (holds the potential and any protocol).
    :param state: initial state (``integrator.init(...)`` or a previous ``final``).
    :param n_steps: number of steps (>= 0).
    :param gradient: ``"direct"``, ``"checkpoint"``, ``"truncated"``, ``"reversible"`` or
        ``"none"`` (see the module docstring). With ``"direct"`` a graph is only built when something requires
        grad (an integrator parameter, or a tensor of the state), as plain autograd would.
    :param window: ``W``, steps per checkpoint / truncation window (required for those; for
        ``"reversible"`` the interval between stored exact states, default 200).
    :param record_every: record ``observables`` every this many steps, including the
        initial state (frames at steps 0, k, 2k, ... <= n_steps); 0 records nothing.
    :param observables: name -> function of the state returning ``[B, ...]``; default
        ``{"R": positions}``.
    :param reporters: per-step observers (:class:`controlmd.reporters.Reporter`).
    :param check_every: steps between NaN/inf checks (>= 1).
    :return: a :class:`Trajectory`.
    :raises SimulationDivergedError: when positions or momenta become non-finite.

    Example::

        >>> import torch
        >>> from controlmd.dynamics import Brownian
        >>> from controlmd.potentials import Potential
        >>> from controlmd.rng import ReplicaRNG
        >>> class Well(Potential):
        ...     def energy(self, R, t=None):
        ...         return 0.5 * (R * R).sum(dim=(-2, -1))
        >>> bd = Brownian(Well(), dt=0.01, kT=1.0)
        >>> s0 = bd.init(torch.zeros(2, 1, 1, dtype=torch.float64), rng=ReplicaRNG(7, 2))
        >>> traj = simulate(bd, s0, 100, gradient="none", record_every=50)
        >>> traj.records["R"].shape, traj.md_steps
        (torch.Size([3, 2, 1, 1]), 200)
    """
    _check_simulate_inputs(
        integrator, state, n_steps, gradient, window, record_every, reporters, check_every
    )
    if gradient == "reversible":
        return _simulate_reversible(integrator, state, n_steps, window, record_every, reporters)
    if observables is None:
        observables = {"R": _positions}
    graph = gradient != "none" and _needs_graph(integrator, state)
    B = state.n_replicas
    context = torch.enable_grad() if graph else torch.no_grad()
    with context:
        state = refresh(integrator, state)
        final, times, records = _run(
            integrator,
            state,
            n_steps,
            gradient if graph else "none",
            window,
            record_every,
            observables,
            list(reporters),
            check_every,
        )
    return Trajectory(
        final=final,
        times=times,
        records=records,
        md_steps=B * n_steps,
        grad_steps=B * n_steps if graph else 0,
    )


def _run(
    integrator: Integrator,
    state: State,
    n_steps: int,
    mode: str,
    window: int | None,
    record_every: int,
    observables: Mapping[str, Observable],
    reporters: list[Reporter],
    check_every: int,
) -> tuple[State, Tensor, dict[str, Tensor]]:
    frames: dict[str, list[Tensor]] = {name: [] for name in observables}
    times: list[Tensor] = []

    def record(s: State) -> None:
        times.append(s.t.detach().to(torch.float64).clone())
        for name, fn in observables.items():
            frames[name].append(fn(s))

    if record_every:
        record(state)
    due = [_next_report(r, state) for r in reporters]
    good = _snapshot(state)
    t_start, step0 = state.t, state.step
    jumps = jump_steps(integrator, float(t_start), n_steps)
    done = 0
    while done < n_steps:
        n = min(n_steps - done, check_every - done % check_every)
        if record_every:
            n = min(n, record_every - done % record_every)
        if window is not None and mode in ("checkpoint", "truncated"):
            n = min(n, window - done % window)
        if due:
            n = min(n, *due)
        if jumps:
            n = min([n] + [k - done for k in jumps if k > done])
        if mode == "checkpoint":
            state = _checkpointed_segment(integrator, state, n)
        else:
            state = _segment(integrator, state, n)
        done += n
        # times from the step count, so rounding does not accumulate over long runs
        state = state.replace(t=t_start + done * integrator.dt)
        if done in jumps:
            state = refresh(integrator, state)  # the cached force must see the new control
        if not _is_finite(state):
            _locate_divergence(integrator, good, state, t_start, step0, jumps)
        if done % check_every == 0:
            good = _snapshot(state)
        if record_every and done % record_every == 0:
            record(state)
        for i, reporter in enumerate(reporters):
            due[i] -= n
            if due[i] == 0:
                with torch.no_grad():
                    reporter.report(state.detach(), integrator)
                due[i] = _next_report(reporter, state)
        if mode == "truncated" and done % window == 0 and done < n_steps:  # type: ignore[operator]
            state = state.detach()
    records = {name: torch.stack(v) for name, v in frames.items()} if record_every else {}
    t = torch.stack(times) if times else torch.zeros(0, dtype=torch.float64)
    return state, t, records


def refresh(integrator: Integrator, state: State) -> State:
    """``integrator.prepare(state)``, checked: every cached entry of ``state.aux`` that an
    integrator inside ``integrator`` declares (``cached_aux``, e.g. the force) must come
    back recomputed.

    :raises ControlMDError: when one comes back unchanged, e.g. a wrapper that subclasses
        ``Integrator`` and does not forward ``prepare`` to the integrator it wraps; running
        on would apply the previous control for half a step after every jump.
    """
    new = integrator.prepare(state)
    keys = {k for m in integrator.modules() if isinstance(m, Integrator) for k in m.cached_aux}
    stale = sorted(k for k in keys if k in state.aux and new.aux.get(k) is state.aux[k])
    if stale:
        raise ControlMDError(
            f"{type(integrator).__name__}.prepare() returned the cached {stale} unchanged at "
            f"t = {float(state.t):g}: the cache would keep the previous control. A wrapper "
            "must forward prepare() to the integrator it wraps: subclass "
            "controlmd.dynamics.IntegratorWrapper (docs/integrators.md)"
        )
    return new


def _segment(integrator: Integrator, state: State, n: int) -> State:
    for _ in range(n):
        state = integrator.step(state)
    return state


def _checkpointed_segment(integrator: Integrator, state: State, n: int) -> State:
    """``n`` steps whose intermediate states are recomputed in the backward pass.

    The forward pass runs without a graph and keeps only the window's input state; the
    backward pass reruns the window with a graph and backpropagates through it. Noise of a
    stochastic integrator is the same in the rerun: each run draws from a copy of the
    generators restored to their window-start states. (``torch.utils.checkpoint`` is not
    used: its non-reentrant mode recomputes the window at each force-gradient call inside
    it, O(W^2) steps.)
    """
    keys = sorted(
        k for k, v in state.aux.items() if isinstance(v, Tensor) and v.is_floating_point()
    )
    names = ["R"] + (["P"] if state.P is not None else []) + [f"aux:{k}" for k in keys]
    rng = state.rng
    start = None if rng is None else rng.get_state()
    last: list[State] = []

    def run(tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        values = dict(zip(names, tensors))
        s = state.replace(
            R=values["R"],
            P=values.get("P"),
            aux={**state.aux, **{k: values[f"aux:{k}"] for k in keys}},
            rng=None if rng is None else rng.restored(start),  # type: ignore[arg-type]
        )
        s = _segment(integrator, s, n)
        last[:] = [s]
        outs = [s.R]
        if state.P is not None:
            if s.P is None:
                raise ControlMDError(f"{type(integrator).__name__}.step dropped the momenta P")
            outs.append(s.P)
        outs += [s.aux[k] for k in keys]
        return tuple(o.clone() if any(o is x for x in tensors) else o for o in outs)

    inputs = [state.R] + ([state.P] if state.P is not None else []) + [state.aux[k] for k in keys]
    params = [p for p in integrator.parameters() if p.requires_grad]
    outs = _Window.apply(run, len(inputs), *inputs, *params)
    end = last[0]
    values = dict(zip(names, outs))
    if rng is not None:
        rng.set_state(end.rng.get_state())  # type: ignore[union-attr]
    return end.replace(
        R=values["R"],
        P=values.get("P"),
        aux={**end.aux, **{k: values[f"aux:{k}"] for k in keys}},
        rng=rng,
    )


class _Window(torch.autograd.Function):
    """A window of steps as one autograd node: forward without a graph, backward by rerun."""

    @staticmethod
    def forward(
        ctx: Any,
        run: Callable[[Sequence[Tensor]], tuple[Tensor, ...]],
        n_inputs: int,
        *args: Tensor,
    ) -> tuple[Tensor, ...]:
        ctx.run, ctx.n_inputs = run, n_inputs
        ctx.save_for_backward(*args)
        with torch.no_grad():
            return run(args[:n_inputs])

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor | None) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        inputs = [x.detach().requires_grad_(True) for x in saved[: ctx.n_inputs]]
        params = list(saved[ctx.n_inputs :])
        with torch.enable_grad():
            outs = ctx.run(inputs)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
        grads = (
            torch.autograd.grad(
                [o for o, _ in pairs], inputs + params, [g for _, g in pairs], allow_unused=True
            )
            if pairs
            else (None,) * (len(inputs) + len(params))
        )
        return (None, None, *grads)


def _snapshot(state: State) -> tuple[State, list[Tensor] | None]:
    """A detached copy of ``state`` and its generator states, to replay from."""
    return state.detach(), None if state.rng is None else state.rng.get_state()


def _simulate_reversible(
    integrator: Integrator,
    state: State,
    n_steps: int,
    window: int | None,
    record_every: int,
    reporters: Sequence[Reporter],
) -> Trajectory:
    """``gradient="reversible"``: :func:`~controlmd.dynamics.reversible.simulate_reversible`
    when a graph is needed, else the plain no-gradient run."""
    if record_every or reporters:
        raise ControlMDError(
            "gradient='reversible' keeps only the final state: record_every and reporters are "
            "not supported; use gradient='checkpoint' to record observables along the run"
        )
    if not _needs_graph(integrator, state):
        return simulate(integrator, state, n_steps, gradient="none")
    if getattr(integrator, "track_work", False):
        raise ControlMDError(
            "gradient='reversible' recomputes positions and momenta only and would leave "
            "aux['work'] / aux['heat'] unchanged; with track_work=True use "
            "gradient='checkpoint' (the same gradient, O(n_steps/W + W) memory)"
        )
    final = simulate_reversible(
        integrator, state, n_steps, window=200 if window is None else window
    )
    if not _is_finite(final):
        simulate(
            integrator, state.detach(), n_steps, gradient="none"
        )  # raises at the first bad step
        raise SimulationDivergedError(
            "non-finite positions or momenta", step=final.step, time=float(final.t)
        )
    B = state.n_replicas
    return Trajectory(
        final=final,
        times=torch.zeros(0, dtype=torch.float64),
        records={},
        md_steps=B * n_steps,
        grad_steps=B * n_steps,
    )


def _is_finite(state: State) -> bool:
    ok = torch.isfinite(state.R.detach()).all()
    if state.P is not None:
        ok = ok & torch.isfinite(state.P.detach()).all()
    return bool(ok)


def _locate_divergence(
    integrator: Integrator,
    good: tuple[State, list[Tensor] | None],
    bad: State,
    t_start: Tensor,
    step0: int,
    jumps: set[int],
) -> None:
    """Replay from the last finite snapshot, step by step as :func:`_run` does, and raise
    at the first bad step."""
    state, rng_states = good
    if rng_states is not None and state.rng is not None:
        state = state.replace(rng=state.rng.restored(rng_states))
    with torch.no_grad():
        while state.step < bad.step:
            state = integrator.step(state)
            done = state.step - step0
            state = state.replace(t=t_start + done * integrator.dt)
            if done in jumps:
                state = refresh(integrator, state)
            if not _is_finite(state):
                break
        else:
            state = bad  # not reproduced by the replay; report where it was detected
    n_bad = int((~torch.isfinite(state.R.detach())).any(dim=(-2, -1)).sum())
    cause = _schedule_out_of_range(integrator, state.t - integrator.dt, state.t)
    raise SimulationDivergedError(
        f"non-finite positions or momenta in {n_bad} of {state.n_replicas} replicas after "
        f"this step (dt = {integrator.dt:g}); "
        + (
            cause
            if cause is not None
            else "the time step may be too large, particles may overlap, or a control may be "
            "out of range"
        ),
        step=state.step,
        time=float(state.t),
    )


def _schedule_out_of_range(integrator: Integrator, t0: Tensor, t1: Tensor) -> str | None:
    """The first of the integrator's own schedules (e.g. ``kT(t)``) that leaves its range
    within the step ``[t0, t1]`` (checked at its start, middle and end), described."""
    for name, (schedule, zero_ok) in integrator.control_schedules().items():
        for t in (t0, 0.5 * (t0 + t1), t1):
            values = evaluate_schedule(schedule, t).detach()
            bad = ~torch.isfinite(values) | (values < 0 if zero_ok else values <= 0)
            if bool(bad.any()):
                v = float(values.reshape(-1)[bad.reshape(-1)][0])
                bound = ">= 0" if zero_ok else "> 0"
                return f"the control {name}(t = {float(t):.6g}) = {v:.6g} is out of range (must be {bound})"
    return None


def _next_report(reporter: Reporter, state: State) -> int:
    n = reporter.describe_next_report(state)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ControlMDError(
            f"{type(reporter).__name__}.describe_next_report must return an int >= 1, got {n!r}"
        )
    return n


def _positions(state: State) -> Tensor:
    return state.R


def _needs_graph(integrator: Integrator, state: State) -> bool:
    if not torch.is_grad_enabled():
        return False
    if any(p.requires_grad for p in integrator.parameters()):
        return True
    cached = integrator.cached_aux  # recomputed by prepare(), so their graphs do not count
    tensors = [state.R, state.P, state.t, *(v for k, v in state.aux.items() if k not in cached)]
    return any(x is not None and x.requires_grad for x in tensors)


def _check_state(integrator: Integrator, state: State) -> None:
    if not isinstance(integrator, Integrator):
        raise ControlMDError(
            f"integrator must be a controlmd Integrator, got {type(integrator).__name__}"
        )
    if not isinstance(state, State):
        raise ControlMDError(f"state must be a controlmd State, got {type(state).__name__}")
    check_positions("state.R", state.R)
    if state.P is not None:
        if state.P.shape != state.R.shape:
            raise ControlMDError(
                f"state.P has shape {tuple(state.P.shape)}, expected that of state.R {tuple(state.R.shape)}"
            )
        check_finite("state.P", state.P)
    if integrator.stochastic:
        if state.rng is None:
            raise ControlMDError(
                f"{type(integrator).__name__} is stochastic and state.rng is None; create the "
                "state with integrator.init(R, rng=ReplicaRNG(seed, B))"
            )
        if state.rng.n_replicas != state.n_replicas:
            raise ControlMDError(
                f"state.rng has {state.rng.n_replicas} replicas, state.R has B = {state.n_replicas}"
            )


def _check_simulate_inputs(
    integrator: Integrator,
    state: State,
    n_steps: int,
    gradient: str,
    window: int | None,
    record_every: int,
    reporters: Sequence[Reporter],
    check_every: int,
) -> None:
    _check_state(integrator, state)
    check_int("n_steps", n_steps, minimum=0)
    check_choice("gradient", gradient, GRADIENT_MODES)
    if gradient in ("checkpoint", "truncated"):
        if window is None:
            raise ControlMDError(
                f"gradient={gradient!r} needs window=W (steps per window), got None"
            )
        check_int("window", window)
    elif window is not None:
        check_int("window", window)
    check_int("record_every", record_every, minimum=0)
    check_int("check_every", check_every)
    for r in reporters:
        if not (hasattr(r, "describe_next_report") and hasattr(r, "report")):
            raise ControlMDError(
                f"reporters must provide describe_next_report(state) and report(state, "
                f"integrator); got {type(r).__name__}"
            )


class _ODEIntegrator(Protocol):
    """The deterministic integrators that :func:`simulate_ode` accepts (``NVE``,
    ``NoseHooverChain``, and wrappers of them, which forward the three methods)."""

    def ode_state(self, state: State) -> tuple[Tensor, ...]: ...

    def vector_field(self, t: Tensor, y: tuple[Tensor, ...]) -> tuple[Tensor, ...]: ...

    def from_ode_state(self, y: tuple[Tensor, ...], t: Tensor, template: State) -> State: ...


class _VectorField(nn.Module):
    """``f(t, y)`` on one interval ``[a, b]`` between protocol jumps, for torchdiffeq.

    With ``clamp`` the time is kept in ``[a + eps, b - eps]`` (``eps = 1e-10 max(1, |t|)``,
    far above a protocol's own rounding), so the field at the interval's ends sees the
    interval's control. Counts evaluations (each one force evaluation).
    """

    def __init__(self, integrator: _ODEIntegrator, a: float, b: float, *, clamp: bool) -> None:
        super().__init__()
        self.integrator = integrator
        self.nfe = 0
        self.lo = a + 100 * jump_tolerance(a) if clamp else -math.inf
        self.hi = b - 100 * jump_tolerance(b) if clamp else math.inf

    def forward(self, t: Tensor, y: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        self.nfe += 1
        if not torch.is_grad_enabled():
            # odeint_adjoint's forward solve runs under no_grad on views of a tensor that
            # requires grad; the autograd force needs plain tensors there
            y = tuple(x.detach() for x in y)
        return self.integrator.vector_field(t.clamp(self.lo, self.hi), y)


def simulate_ode(
    integrator: Integrator,
    state: State,
    t_final: float | Tensor,
    *,
    method: str = "dopri5",
    adjoint: bool = True,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    options: dict[str, Any] | None = None,
    adjoint_options: dict[str, Any] | None = None,
    observables: Mapping[str, Observable] | None = None,
) -> Trajectory:
    """Integrate a deterministic integrator's equations of motion with torchdiffeq.

    :param integrator: an integrator with ``vector_field`` (NVE, NoseHooverChain).
    :param state: initial state at ``state.t``.
    :param t_final: final time (> ``state.t``), or increasing times ``[T]`` at which to
        record (the first may equal ``state.t``).
    :param method: a torchdiffeq method (``"dopri5"``, ``"rk4"``, ...). Fixed-grid methods
        default to ``options={"step_size": integrator.dt}``.
    :param adjoint: use ``odeint_adjoint`` (O(1) memory; gradients reach the initial state
        and every parameter of the integrator: potential, protocol and schedules) instead
        of backprop through the solver.
    :param rtol, atol: tolerances of adaptive solvers (also used for the adjoint solve).
    :param options: solver options (passed to every solve).
        Where a :class:`~controlmd.protocols.Protocol` inside the integrator has
        breakpoints, the integration is split there (one solve per piece, the field
        evaluated strictly inside the piece): the role of torchdiffeq's ``jump_t``, for
        fixed-grid methods too (their last step in a piece is shortened to end on the
        jump).
    :param adjoint_options: options of the backward solve (default: ``options``).
    :param observables: name -> function of the state; recorded at each requested time
        (default positions when ``t_final`` is a tensor of times, nothing otherwise).
    :return: a :class:`Trajectory`; ``md_steps`` is ``B *`` the forward vector-field
        evaluations.
    """
    from torchdiffeq import odeint, odeint_adjoint

    _check_state(integrator, state)
    if not hasattr(integrator, "vector_field"):
        raise ControlMDError(
            f"simulate_ode needs a deterministic integrator with a vector field (NVE, "
            f"NoseHooverChain); {type(integrator).__name__} has none: use simulate()"
        )
    ode = cast(_ODEIntegrator, integrator)  # checked just above
    check_choice("method", method, ODE_METHODS)
    t0 = state.t.detach().to(torch.float64)
    times = torch.as_tensor(t_final, dtype=torch.float64)
    record_all = times.ndim == 1
    times = times.reshape(-1)
    if times.numel() == 0 or not bool(torch.isfinite(times).all()):
        raise ControlMDError(f"t_final must be finite, got {times.tolist()}")
    if times.numel() > 1 and not bool((times[1:] > times[:-1]).all()):
        raise ControlMDError(f"times must be strictly increasing, got {times.tolist()}")
    if bool(times[0] < t0) or (not record_all and bool(times[0] <= t0)):
        raise ControlMDError(f"t_final must be > state.t = {float(t0):g}, got {times.tolist()}")
    grid = times if bool(times[0] == t0) else torch.cat([t0.reshape(1), times])
    offset = grid.numel() - times.numel()

    opts = dict(options or {})
    if method not in _ADAPTIVE and "step_size" not in opts and "grid_constructor" not in opts:
        opts["step_size"] = integrator.dt
    grid = grid.to(state.R.device)
    params = tuple(p for p in integrator.parameters() if p.requires_grad)
    jumps = breakpoints(integrator, float(grid[0]), float(grid[-1]))
    edges = [float(grid[0]), *jumps, float(grid[-1])]
    y = ode.ode_state(state)
    frames: list[tuple[Tensor, ...]] = [y]  # the solution at each grid time
    nfe = 0
    # One solve per interval between protocol jumps, with the field evaluated strictly
    # inside the interval, so each interval sees its own control whatever the rounding.
    for a, b in itertools.pairwise(edges):
        inner = grid[(grid > a + jump_tolerance(a)) & (grid < b - jump_tolerance(b))]
        times = torch.cat([grid.new_tensor([a]), inner, grid.new_tensor([b])])
        func = _VectorField(ode, a, b, clamp=bool(jumps))
        if adjoint:
            sol = odeint_adjoint(
                func,
                y,
                times,
                rtol=rtol,
                atol=atol,
                method=method,
                options=opts,
                adjoint_options=adjoint_options,
                adjoint_params=params,
            )
        else:
            sol = odeint(func, y, times, rtol=rtol, atol=atol, method=method, options=opts)
        nfe += func.nfe
        frames.extend(tuple(x[k] for x in sol) for k in range(1, times.numel() - 1))
        y = tuple(x[-1] for x in sol)
        if b == edges[-1] or bool((grid - b).abs().min() <= jump_tolerance(b)):
            frames.append(y)
    if len(frames) != grid.numel():  # a requested time within rounding of a jump
        raise ControlMDError(
            f"could not place the requested times {grid.tolist()} around the protocol "
            f"jumps {jumps}; avoid times within 1e-12 of a jump"
        )
    ys = tuple(torch.stack([f[j] for f in frames]) for j in range(len(y)))

    def state_at(i: int) -> State:
        return ode.from_ode_state(tuple(series[i] for series in ys), grid[i], state)

    if observables is None:
        observables = {"R": _positions} if record_all else {}
    records: dict[str, Tensor] = {}
    if observables:
        states = [state_at(i) for i in range(offset, grid.numel())]
        records = {name: torch.stack([fn(s) for s in states]) for name, fn in observables.items()}
    final = state_at(grid.numel() - 1)
    for series in ys:
        if not bool(torch.isfinite(series[-1].detach()).all()):
            raise SimulationDivergedError(
                "the ODE solution became non-finite", step=final.step, time=float(grid[-1])
            )
    B = state.n_replicas
    return Trajectory(
        final=final,
        times=times,
        records=records,
        md_steps=B * nfe,
        grad_steps=B * nfe if torch.is_grad_enabled() else 0,
    )
