"""State and integrator contracts shared by every equation of motion.

Units follow the task: reduced LJ units (sigma, epsilon, m, tau = sigma sqrt(m/epsilon))
for classical tasks; kT is an energy.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from controlmd._validation import check_finite, check_positions, check_positive
from controlmd.errors import ControlMDError
from controlmd.potentials.base import Potential
from controlmd.rng import ReplicaRNG
from controlmd.space import Space, free

Tensor = torch.Tensor
Schedule = float | Callable[[Tensor], Tensor]
"""A constant, or a function of time returning a scalar (or ``[B]``) tensor, e.g. kT(t)."""

__all__ = [
    "CONTROL_TIME_OFFSET",
    "ControlSchedule",
    "Integrator",
    "IntegratorWrapper",
    "MomentumIntegrator",
    "Schedule",
    "State",
    "check_schedule",
    "closing_jumps",
    "evaluate_schedule",
    "kinetic_energy",
    "maxwell_boltzmann",
    "per_replica",
]


@dataclass
class State:
    """Dynamical state of ``B`` replicas.

    Attributes:
        R: positions ``[B, N, d]``.
        P: momenta ``[B, N, d]`` (``None`` for overdamped dynamics).
        t: time, 0-d tensor.
        step: number of integration steps taken.
        aux: extra per-replica tensors: thermostat variables (``xi``, ``p_xi`` ``[B, M]``),
            accumulators such as the protocol ``work`` ``[B]``.
        rng: per-replica noise streams for stochastic integrators.
    """

    R: Tensor
    P: Tensor | None = None
    t: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    step: int = 0
    aux: dict[str, Tensor] = field(default_factory=dict)
    rng: ReplicaRNG | None = None

    @property
    def n_replicas(self) -> int:
        return self.R.shape[0]

    def replace(self, **changes: object) -> State:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def detach(self) -> State:
        """The same state cut from the autograd graph (truncated backprop)."""
        return self.replace(
            R=self.R.detach(),
            P=None if self.P is None else self.P.detach(),
            t=self.t.detach(),
            aux={k: v.detach() for k, v in self.aux.items()},
        )


def evaluate_schedule(value: Schedule, t: Tensor) -> Tensor:
    """Value of a constant-or-callable schedule at time ``t`` as a tensor."""
    if callable(value):
        return torch.as_tensor(value(t))
    return torch.as_tensor(value, dtype=t.dtype, device=t.device)


def check_schedule(name: str, value: Schedule, *, allow_zero: bool = False) -> None:
    """Validate a schedule at the boundary: a constant must be finite and > 0 (>= 0 with
    ``allow_zero``, e.g. ``kT = 0``, the deterministic limit); a callable must give such
    values at ``t = 0``.

    Schedules whose values depend on learnable parameters should be ``nn.Module`` s (e.g. a
    :class:`ControlSchedule`) so that the integrator registers them and gradients and
    ``odeint_adjoint`` find their parameters.
    """
    if callable(value):
        try:
            v = evaluate_schedule(value, torch.zeros((), dtype=torch.float64))
        except Exception as exc:  # report which schedule failed, keep the cause
            raise ControlMDError(f"{name} schedule failed at t = 0: {exc}") from exc
        check_positive(f"{name}(t=0)", v.detach(), allow_zero=allow_zero)
    elif isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise ControlMDError(f"{name} must be a number or a callable of t, got {value!r}")
    else:
        check_positive(name, value, allow_zero=allow_zero)


class ControlSchedule(nn.Module):
    """One channel of a protocol used as a schedule: ``t -> protocol(t)[index]``.

    Use it to make temperature (or friction) a control channel:
    ``Langevin(potential, dt=0.005, kT=ControlSchedule(protocol, 0))``.
    """

    def __init__(self, protocol: nn.Module, index: int = 0) -> None:
        super().__init__()
        self.protocol = protocol
        self.index = int(index)

    def forward(self, t: Tensor) -> Tensor:
        return self.protocol(t)[..., self.index]


def per_replica(value: Tensor, R: Tensor) -> Tensor:
    """A scalar or per-replica ``[B]`` value broadcastable against ``R`` ``[B, N, d]``."""
    value = value.to(R)
    return value.view(-1, 1, 1) if value.ndim == 1 else value


def kinetic_energy(P: Tensor, mass: Tensor) -> Tensor:
    """Kinetic energy ``sum_i |p_i|^2 / (2 m_i)`` of each replica ``[B]``.

    Args:
        P: momenta ``[B, N, d]``.
        mass: masses broadcastable against ``P`` (``[]`` or ``[1, N, 1]``).
    """
    return 0.5 * (P * P / mass).sum(dim=(-2, -1))


def maxwell_boltzmann(
    R: Tensor, mass: Tensor, kT: Tensor, rng: ReplicaRNG, *, remove_com: bool
) -> Tensor:
    """Momenta ``[B, N, d]`` drawn from the Maxwell–Boltzmann distribution at ``kT``.

    ``p_i = sqrt(m_i kT) xi_i`` with ``xi`` from each replica's own generator; with
    ``remove_com`` the centre-of-mass momentum is removed (``p_i -= m_i P_tot / M``), which
    leaves ``d N - d`` momentum degrees of freedom.

    Args:
        R: positions ``[B, N, d]`` (shape and dtype template).
        mass: masses broadcastable against ``R``.
        kT: temperature (energy), scalar or ``[B]``.
        rng: per-replica generators (``rng.n_replicas == B``).
        remove_com: subtract the centre-of-mass momentum.
    """
    B, N, d = R.shape
    if rng.n_replicas != B:
        raise ControlMDError(f"rng has {rng.n_replicas} replicas but R has B = {B}")
    xi = rng.randn(N, d, dtype=R.dtype).to(R.device)
    m = mass.expand(1, N, 1) if mass.ndim == 0 else mass
    P = torch.sqrt(m * per_replica(kT, R)) * xi
    if remove_com:
        P = P - m * P.sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True)
    return P


CONTROL_TIME_OFFSET = 1e-6
"""One-sided control evaluation: inside step ``n`` the time-dependent terms are evaluated
at ``t_{n+1} - eps`` (end of step) and, right after a protocol jump at ``t_n``, at
``t_n + eps``, with ``eps = CONTROL_TIME_OFFSET * dt``. A control that jumps on a step
boundary thus acts exactly on the steps of its own interval (as a held env action does)
and velocity Verlet stays second order across the jump.

The convention, the same for every integrator: step ``n`` (from ``t_n`` to ``t_{n+1}``)
reads the control only inside its own interval, as the one-sided limits ``u(t_n^+)`` and
``u(t_{n+1}^-)``. First-order schemes (Brownian) read ``u(t_{n+1}^-)`` once; splitting
schemes (NVE, Nosé–Hoover chain, Langevin BAOAB) read ``u(t_n^+)`` for the first half
kick and ``u(t_{n+1}^-)`` for the last. A jump at ``t_k`` therefore acts from step ``k``
on, in every integrator (tested in ``tests/test_integrators_compose.py``)."""


def closing_jumps(integrator: Integrator) -> list[float]:
    """Times of the *closing* jumps of the protocols held by ``integrator``.

    A module with a callable ``closing_jumps()`` (e.g. :class:`~controlmd.protocols.Endpoints`:
    the jump to the fixed final value at ``t_final``) declares jumps whose work belongs to
    the step that *ends* there, so a run that stops at ``t_final`` counts it. Every other
    jump at ``t_k`` is counted by the step that starts at ``t_k``.
    """
    times: set[float] = set()
    for module in _submodules(integrator):
        fn = _module_attribute(module, "closing_jumps")
        if callable(fn) and not isinstance(module, Integrator):
            times.update(float(x) for x in fn())
    return sorted(times)


def _submodules(root: nn.Module) -> list[nn.Module]:
    """The modules of ``root`` (itself included), each once, in ``root.modules()``'s order:
    the same walk without building each module's dotted name (a Brownian step asks for
    its closing jumps at every step)."""
    out: list[nn.Module] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        out.append(module)
        stack.extend(m for m in reversed(module._modules.values()) if m is not None)
    return out


_MISSING = object()


def _module_attribute(module: nn.Module, name: str) -> Any:
    """``getattr(module, name, None)`` without the cost of a miss (``nn.Module.__getattr__``
    formats an error message for every attribute it does not find)."""
    if type(module).__getattr__ is not nn.Module.__getattr__:  # e.g. a forwarding wrapper
        return getattr(module, name, None)
    if getattr(type(module), name, _MISSING) is not _MISSING or name in module.__dict__:
        return getattr(module, name, None)
    for store in ("_parameters", "_buffers", "_modules"):
        held = module.__dict__.get(store)
        if held is not None and name in held:
            return held[name]
    return None


class Integrator(nn.Module, ABC):
    """One integration step of an equation of motion, batched over replicas.

    Time-dependent terms (protocols, kT schedules) are evaluated as one-sided limits inside
    each step; see :data:`CONTROL_TIME_OFFSET`.

    Subclasses implement :meth:`init` and :meth:`step`; deterministic Hamiltonian ones also
    provide ``vector_field`` for the torchdiffeq path and ``invariant`` (the conserved
    quantity).

    Args:
        potential: the energy ``H0 + H_ctrl`` (an :class:`~controlmd.potentials.Potential`).
        dt: time step (> 0).
        mass: particle mass, scalar or ``[N]``.
        space: the box; positions are wrapped with ``space.shift`` after each step.
    """

    stochastic: ClassVar[bool] = False
    """Whether :meth:`step` draws noise from ``state.rng``."""

    cached_aux: ClassVar[tuple[str, ...]] = ()
    """Keys of ``state.aux`` that :meth:`prepare` recomputes from ``(R, t)``."""

    _mass: Tensor

    def __init__(
        self,
        potential: Potential,
        *,
        dt: float,
        mass: float | Tensor = 1.0,
        space: Space | None = None,
    ) -> None:
        super().__init__()
        check_positive("dt", dt)
        check_positive("mass", mass)
        self.potential = potential
        self.dt = float(dt)
        self.register_buffer("_mass", torch.as_tensor(mass, dtype=torch.float64), persistent=False)
        self.space = space if space is not None else free()
        self.t_eps = CONTROL_TIME_OFFSET * self.dt

    def mass_like(self, R: Tensor) -> Tensor:
        """Mass broadcastable against ``R`` ``[B, N, d]``: ``[]`` or ``[1, N, 1]`` (converted
        to ``R``'s dtype and device once, not at every step; read-only)."""
        return self._cached_like("_mass_like", R, lambda m: m)

    def drift_factor(self, R: Tensor) -> Tensor:
        """``dt / m`` broadcastable against ``R`` (read-only, cached like :meth:`mass_like`):
        a drift is ``q += P * drift_factor`` (one operation per step)."""
        return self._cached_like("_drift_factor", R, lambda m: self.dt / m)

    def _cached_like(self, name: str, R: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        m = self._mass
        key = (R.dtype, R.device, self.dt, m.data_ptr(), m._version)
        hit = self.__dict__.get(name)
        if hit is None or hit[0] != key:
            v = fn(m.to(R))
            hit = (key, v if v.ndim == 0 else v.view(1, -1, 1))
            self.__dict__[name] = hit
        return hit[1]

    def potential_energy(self, state: State) -> Tensor:
        """Potential energy ``E(R, t)`` of each replica ``[B]``."""
        return self.potential.energy(state.R, state.t)

    def control_schedules(self) -> dict[str, tuple[Schedule, bool]]:
        """The integrator's own time-dependent parameters (e.g. the bath ``kT(t)``) as
        ``name -> (schedule, zero allowed)``; a diverged run reports any that left its
        range (default: none)."""
        return {}

    def prepare(self, state: State) -> State:
        """Refresh what the state caches from the potential (e.g. the force) so that it
        matches this integrator; :func:`~controlmd.simulate.simulate` calls it once at the
        start (a state may come from a run under another control value) and at every step
        that is a protocol breakpoint.

        Contract: every key of :attr:`cached_aux` present in ``state.aux`` is recomputed
        (a new tensor); ``simulate`` raises when one comes back unchanged, so a wrapper that
        does not forward ``prepare`` cannot apply a stale control. Also adds zero work
        accumulators where the integrator tracks work and the state has none.
        """
        return self._with_accumulators(state)

    # ------------------------------------------------------------------ work accounting

    def control_jump_work(self, R: Tensor, t: Tensor) -> Tensor:
        """Work ``E(R, t + eps) - E(R, t - eps)`` ``[B]`` of the control change at ``t``
        with the configuration ``R`` ``[B, N, d]`` held (zero up to O(eps) where the
        control is continuous)."""
        return self.potential.energy(R, t + self.t_eps) - self.potential.energy(R, t - self.t_eps)

    def _is_closing(self, t: Tensor, closing: list[float] | None = None) -> bool:
        """Whether ``t`` is a closing jump (``closing``: :func:`closing_jumps` of ``self``,
        when the caller has it already)."""
        tv = float(t)
        closing = closing_jumps(self) if closing is None else closing
        return any(abs(tv - c) <= 10 * self.t_eps for c in closing)

    def opening_jump_work(self, R: Tensor, t: Tensor) -> Tensor:
        """Work ``[B]`` of a jump at the start ``t`` of a step, at ``R`` ``[B, N, d]`` (zero
        at a closing jump: the step that ended there counted it)."""
        if self._is_closing(t):
            return R.new_zeros(R.shape[0])
        return self.control_jump_work(R, t)

    def closing_jump_work(self, R: Tensor, t1: Tensor) -> Tensor:
        """Work ``[B]`` of a closing jump (:func:`closing_jumps`) at the end ``t1`` of a
        step, at ``R``; zeros where there is none."""
        if self._is_closing(t1):
            return self.control_jump_work(R, t1)
        return R.new_zeros(R.shape[0])

    def _with_accumulators(self, state: State) -> State:
        """``state`` with zero ``work`` / ``heat`` ``[B]`` where tracked and missing (a
        state built as ``State(R=..., rng=...)`` rather than by :meth:`init`)."""
        if not getattr(self, "track_work", False) or ("work" in state.aux and "heat" in state.aux):
            return state
        zeros = state.R.new_zeros(state.R.shape[0])
        return state.replace(aux={"work": zeros, "heat": zeros.clone(), **state.aux})

    @abstractmethod
    def init(
        self,
        R: Tensor,
        *,
        kT: float | None = None,
        rng: ReplicaRNG | None = None,
        P: Tensor | None = None,
    ) -> State:
        """Initial state from positions ``[B, N, d]`` (momenta drawn at ``kT`` with ``rng``)."""

    @abstractmethod
    def step(self, state: State) -> State:
        """Advance every replica by ``dt``."""


class MomentumIntegrator(Integrator):
    """Base of the inertial integrators (NVE, Nosé–Hoover chain, Langevin).

    The state caches the force at ``(R, t)`` in ``aux["force"]`` ``[B, N, d]`` so that each
    step costs one force evaluation.

    Degrees of freedom: with ``remove_com`` (default: periodic boxes, where total momentum
    is conserved) the momenta are drawn with zero total momentum and ``n_dof = d N - d``;
    otherwise ``n_dof = d N`` (free space with external fields does not conserve it).
    Integrators whose dynamics do not conserve total momentum (Langevin) override
    :meth:`n_dof`.

    Args:
        potential, dt, mass, space: see :class:`Integrator`.
        remove_com: remove the centre-of-mass momentum at init (default ``space.periodic``).
    """

    cached_aux = ("force",)

    def __init__(
        self,
        potential: Potential,
        *,
        dt: float,
        mass: float | Tensor = 1.0,
        space: Space | None = None,
        remove_com: bool | None = None,
    ) -> None:
        super().__init__(potential, dt=dt, mass=mass, space=space)
        self.remove_com = self.space.periodic if remove_com is None else bool(remove_com)

    def n_dof(self, R: Tensor) -> int:
        """Momentum degrees of freedom of one replica: ``d N - d`` or ``d N``."""
        N, d = R.shape[-2], R.shape[-1]
        return d * N - d if self.remove_com else d * N

    def kinetic_energy(self, state: State) -> Tensor:
        """``sum p^2 / 2m`` per replica ``[B]``."""
        assert state.P is not None
        return kinetic_energy(state.P, self.mass_like(state.R))

    def temperature(self, state: State) -> Tensor:
        """Instantaneous kinetic temperature ``2 K / n_dof`` (energy units) ``[B]``."""
        return 2.0 * self.kinetic_energy(state) / self.n_dof(state.R)

    def energy(self, state: State) -> Tensor:
        """Total energy ``K + E(R, t)`` per replica ``[B]``."""
        return self.kinetic_energy(state) + self.potential_energy(state)

    def force(self, R: Tensor, t: Tensor) -> Tensor:
        """``F = -dE/dR`` at ``(R, t)``, ``[B, N, d]``."""
        return self.potential.energy_and_forces(R, t)[1]

    def _drift_work(self, R: Tensor, P: Tensor, t: Tensor) -> Tensor:
        """Work ``E(q', t_{n+1}^-) - E(q', t_n^+)`` ``[B]`` of the control update of step
        ``n`` at the midpoint of its drift, ``q' = q_n + dt/2 P/m`` (``P`` after the
        first half kick)."""
        mid = self.space.shift(R, 0.5 * P * self.drift_factor(R))
        after = self.potential.energy(mid, t + self.dt - self.t_eps)
        return after - self.potential.energy(mid, t + self.t_eps)

    def prepare(self, state: State) -> State:
        """Recompute the cached force at ``t + eps`` (the control of the step that starts)."""
        state = self._with_accumulators(state)
        return state.replace(aux={**state.aux, "force": self.force(state.R, state.t + self.t_eps)})

    def _init_state(
        self,
        R: Tensor,
        kT: Schedule | None,
        rng: ReplicaRNG | None,
        P: Tensor | None,
        aux: dict[str, Tensor] | None = None,
    ) -> State:
        """Validated initial state at ``t = 0``; momenta given or drawn at ``kT``."""
        check_positions("R", R)
        B, N, _ = R.shape
        if self._mass.ndim == 1 and self._mass.shape[0] != N:
            raise ControlMDError(
                f"mass has {self._mass.shape[0]} entries but R has N = {N} particles"
            )
        if self._mass.ndim > 1:
            raise ControlMDError(
                f"mass must be a scalar or [N], got shape {tuple(self._mass.shape)}"
            )
        if rng is not None and rng.n_replicas != B:
            raise ControlMDError(f"rng has {rng.n_replicas} replicas but R has B = {B}")
        t0 = torch.zeros((), dtype=torch.float64)
        if P is not None:
            if not isinstance(P, Tensor) or P.shape != R.shape:
                raise ControlMDError(
                    f"P must have the shape of R {tuple(R.shape)}, got "
                    f"{tuple(P.shape) if isinstance(P, Tensor) else type(P).__name__}"
                )
            check_finite("P", P)
            P = P.to(R)
        else:
            if kT is None or rng is None:
                raise ControlMDError(
                    f"{type(self).__name__}.init needs momenta: pass P=..., or kT=... and "
                    "rng=ReplicaRNG(seed, B) to draw them from the Maxwell-Boltzmann distribution"
                )
            check_schedule("kT", kT, allow_zero=True)
            kT0 = evaluate_schedule(kT, t0)
            P = maxwell_boltzmann(R, self.mass_like(R), kT0, rng, remove_com=self.remove_com)
        R = self.space.wrap(R)
        state = State(R=R, P=P, t=t0, aux=dict(aux or {}), rng=rng)
        return self.prepare(state)


class IntegratorWrapper(Integrator):
    """Base of integrators that add something to another one (a counter, a feedback hold,
    a boundary term) without re-implementing it.

    Every hook is forwarded to ``inner``: :meth:`init`, :meth:`prepare` (the refresh of the
    cached force at control jumps), :meth:`step`, :meth:`potential_energy`, the class-level
    ``stochastic`` / ``cached_aux``, and any other attribute (``kT``, ``energy``,
    ``kinetic_energy``, ``invariant``, ``vector_field``, ...). A subclass overrides
    :meth:`step` and calls ``self.inner.step(state)`` inside; it does not override
    :meth:`prepare` unless it calls ``self.inner.prepare`` too.

    Subclassing :class:`Integrator` directly and holding the inner integrator as an
    attribute also works, but then ``prepare`` must be forwarded by hand:
    :func:`~controlmd.simulate.simulate` raises ``ControlMDError`` at the first control
    jump where a cached entry of any integrator inside comes back unrefreshed, instead of
    applying the old control for half a step.

    Example::

        >>> import torch
        >>> from controlmd.dynamics import NVE
        >>> from controlmd.potentials import HarmonicTrap
        >>> class StepCounter(IntegratorWrapper):
        ...     def step(self, state):
        ...         new = self.inner.step(state)
        ...         new.aux["n"] = state.aux.get("n", torch.zeros(1)) + 1
        ...         return new
        >>> nve = StepCounter(NVE(HarmonicTrap(1.0), dt=0.01))
        >>> s = nve.init(torch.ones(1, 1, 1, dtype=torch.float64), P=torch.zeros(1, 1, 1, dtype=torch.float64))
        >>> float(nve.step(nve.step(s)).aux["n"])
        2.0

    Args:
        inner: the integrator that does the dynamics.
    """

    def __init__(self, inner: Integrator) -> None:
        if not isinstance(inner, Integrator):
            raise ControlMDError(
                f"IntegratorWrapper wraps a controlmd Integrator, got {type(inner).__name__}"
            )
        super().__init__(inner.potential, dt=inner.dt, mass=inner._mass, space=inner.space)
        self.inner = inner
        self.stochastic = inner.stochastic  # type: ignore[misc]
        self.cached_aux = inner.cached_aux  # type: ignore[misc]
        self.t_eps = inner.t_eps

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("inner")
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)

    def init(
        self,
        R: Tensor,
        *,
        kT: float | None = None,
        rng: ReplicaRNG | None = None,
        P: Tensor | None = None,
    ) -> State:
        """The inner integrator's initial state."""
        return self.inner.init(R, kT=kT, rng=rng, P=P)

    def prepare(self, state: State) -> State:
        """The inner integrator's refresh of its cached entries (never skip it)."""
        return self.inner.prepare(state)

    def potential_energy(self, state: State) -> Tensor:
        return self.inner.potential_energy(state)

    def control_schedules(self) -> dict[str, tuple[Schedule, bool]]:
        return self.inner.control_schedules()

    def step(self, state: State) -> State:
        """One step of the inner integrator; subclasses add to it."""
        return self.inner.step(state)


def add_to(aux: dict[str, Tensor], key: str, value: Tensor) -> dict[str, Tensor]:
    """``aux`` with ``value`` ``[B]`` added to the accumulator ``key`` (zero when absent)."""
    previous = aux.get(key)
    return {**aux, key: value if previous is None else previous + value}


# --------------------------------------------------------------------------- protocol jumps


def jump_steps(integrator: Integrator, t0: float, n_steps: int) -> set[int]:
    """Steps ``k`` (0 < k < n_steps) whose time ``t0 + k dt`` is a protocol breakpoint."""
    dt = integrator.dt
    steps = set()
    for b in breakpoints(integrator, t0, t0 + n_steps * dt):
        k = round((b - t0) / dt)
        if 0 < k < n_steps and abs(t0 + k * dt - b) <= 10 * integrator.t_eps:
            steps.add(k)
    return steps


def jump_tolerance(t: float) -> float:
    """Times closer than this to a protocol jump count as the jump (protocol rounding)."""
    return 1e-12 * max(1.0, abs(t))


def breakpoints(integrator: Integrator, t0: float, t1: float) -> list[float]:
    """Sorted jump times of every protocol held by ``integrator`` strictly inside (t0, t1)."""
    jumps: set[float] = set()
    for module in _submodules(integrator):
        bp = _module_attribute(module, "breakpoints")
        if callable(bp):
            jumps.update(float(x) for x in bp() if t0 < float(x) < t1)
    return sorted(jumps)
