"""Fused steps: ``K`` Brownian or Langevin steps of a small system as one program.

For a few to a few dozen particles per replica a step of the generic integrators is a few
hundred separately dispatched tensor operations (protocol reads, one noise draw, the
force terms, the update), and their fixed costs, not arithmetic, are the time
(docs/performance.md, "Small batched systems"). :class:`FusedSteps` removes them from the
inner loop:

* every control the steps need (the bath ``kT(t)``, a protocol that scales the force) is
  read at all the run's step times at once, one call per control,
* the noise is drawn in blocks of whole chunks, one call of the state's philox stream per
  block of up to ``2**17`` normals (each replica's stream is a sequence of slots, so this
  is the noise single steps draw, bit for bit), and
* each chunk of ``K`` updates runs as one function, compiled by ``torch.compile``
  (``compile=True``, the default; inductor fuses each step's elementwise work into a few
  loops), or eagerly; the force parts at a chunk's last positions are carried into the
  next chunk, and whether positions (and momenta) stayed finite is computed inside it.

The steps are those of :class:`~controlmd.dynamics.brownian.Brownian`
(``method="euler_maruyama"``) and :class:`~controlmd.dynamics.langevin.Langevin` (BAOAB),
with the same control convention (controls as one-sided limits at the same times), so a
fused run equals ``simulate(integrator, state, n)`` to round-off (the compiled arithmetic
is not bit-identical to the eager one) with the same noise. Gradients flow to the
protocol's parameters and the initial state as through ``simulate(..., gradient="direct")``.

Supported: a potential ``E(R, t) = E_fixed(R) + sum_g s_g(t) E_g(R)``: time-independent
terms beside :class:`~controlmd.potentials.external.ScaledPotential` terms (a sum, a
single term, or either inside a wrapper whose one child is its ``inner`` term, like the
polymer task's ``OneGraph``); the unscaled terms are checked not to depend on time on the
run's first state at its first, middle and last times. ``kT`` a number or a schedule with
one value per time; philox noise; no work/heat tracking. Anything else is refused by
name. Forces come from a term's closed form where it has one
(:attr:`~controlmd.potentials.base.Potential.closed_form_forces`, e.g.
:class:`~controlmd.potentials.analytic.DenseMorse`), else from ``torch.func.grad`` of its
energy inside the compiled function (its own autograd path when eager).

Compiling costs ~30-60 s (the assembly step, ``K = 20``) to minutes (the 22-bead Go
chain) per dtype, batch size, chunk length and forward / backward, and needs a C++
compiler on the CPU; a new instance over an integrator of the same structure reuses the
compiled chunk (dynamo caches it on the function, within dynamo's recompile limit per
function). Tasks use it under ``[experiment] fused_steps`` (:func:`use_fused_steps`).
Units: those of the integrator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from controlmd._validation import check_int
from controlmd.dynamics.base import Integrator, Schedule, State, evaluate_schedule
from controlmd.dynamics.brownian import Brownian
from controlmd.dynamics.langevin import Langevin
from controlmd.errors import ControlMDError, SimulationDivergedError
from controlmd.potentials.base import Potential, SumPotential
from controlmd.potentials.external import ScaledPotential

Tensor = torch.Tensor

__all__ = ["FusedSteps", "fused_steps_setting", "use_fused_steps"]

_SETTING: ContextVar[tuple[int, bool]] = ContextVar("controlmd_fused_steps", default=(0, True))


@contextmanager
def use_fused_steps(chunk: int, *, compile: bool = True) -> Iterator[None]:
    """Within the block, tasks advance their particle dynamics by :class:`FusedSteps`
    with ``chunk`` steps per call, compiled unless ``compile=False`` (``chunk = 0``: the
    engine's ``simulate``); this is how ``[experiment] fused_steps`` reaches the tasks
    (:func:`controlmd.simulate.final_state`)."""
    check_int("fused_steps", chunk, minimum=0)
    token = _SETTING.set((chunk, compile))
    try:
        yield
    finally:
        _SETTING.reset(token)


def fused_steps_setting() -> tuple[int, bool]:
    """``(chunk, compile)`` of the innermost :func:`use_fused_steps` block (``(0, True)``
    outside any)."""
    return _SETTING.get()


# noise drawn per block of whole chunks of at most this many normals (one philox call each)
_NOISE_BLOCK = 1 << 17


class FusedSteps:
    """Runs a Brownian (Euler–Maruyama) or Langevin (BAOAB) integrator ``chunk`` steps at
    a time as one (compiled) function.

    Args:
        integrator: a :class:`Brownian` with ``method="euler_maruyama"`` or a
            :class:`Langevin`, without ``track_work``, whose potential is ``s(t) E_0(R)``
            or ``E_0(R)`` (module docstring).
        chunk: steps per fused call ``K`` (>= 1); a run's last ``n mod K`` steps run in
            one more (eager) call.
        compile: compile the chunk with ``torch.compile`` (``fullgraph=True``); ``False``
            runs the same function eagerly.

    Example::

        >>> import torch
        >>> from controlmd.dynamics import Brownian
        >>> from controlmd.rng import ReplicaRNG
        >>> class Well(Potential):
        ...     def energy(self, R, t=None):
        ...         return 0.5 * (R * R).sum(dim=(-2, -1))
        >>> bd = Brownian(Well(), dt=0.01, kT=1.0)
        >>> s0 = bd.init(torch.zeros(3, 2, 2, dtype=torch.float64),
        ...              rng=ReplicaRNG(0, 3, kind="philox"))
        >>> FusedSteps(bd, chunk=10, compile=False).run(s0, 25).step
        25
    """

    def __init__(self, integrator: Integrator, *, chunk: int = 20, compile: bool = True) -> None:
        check_int("chunk", chunk, minimum=1)
        if isinstance(integrator, Brownian):
            if integrator.method != "euler_maruyama":
                raise ControlMDError(
                    f"FusedSteps runs Brownian method='euler_maruyama', got method="
                    f"{integrator.method!r}"
                )
        elif not isinstance(integrator, Langevin):
            raise ControlMDError(
                f"FusedSteps runs Brownian or Langevin integrators, got {type(integrator).__name__}"
            )
        if integrator.track_work:
            raise ControlMDError("FusedSteps does not track work and heat: track_work=True")
        self.integrator = integrator
        self.fixed, self.scaled = _split(integrator.potential)
        self.chunk = chunk
        # chunk(*carry, *controls, noise, *constants) -> (*carry, all finite)
        fn: Callable[..., tuple[Any, ...]] = (
            self._brownian_chunk if isinstance(integrator, Brownian) else self._langevin_chunk
        )
        self._eager = fn
        self._compiled: Callable[..., tuple[Any, ...]] = (
            torch.compile(fn, dynamic=False, fullgraph=True) if compile else fn
        )

    # ------------------------------------------------------------------ running

    def run(self, state: State, n_steps: int) -> State:
        """The state after ``n_steps`` steps (>= 0) from ``state`` (built by the
        integrator's ``init``, philox noise). Builds a graph where something requires grad
        (the protocol's parameters, the state's tensors), as ``simulate`` does.

        :raises SimulationDivergedError: positions (or momenta) not finite after a chunk,
            naming the chunk's steps.
        """
        check_int("n_steps", n_steps, minimum=0)
        rng = state.rng
        if rng is None or rng.kind != "philox":
            raise ControlMDError(
                "FusedSteps draws a chunk's noise in one call of a philox stream: build the "
                "state with rng=ReplicaRNG(..., kind='philox') (or [experiment] rng = "
                f"'philox'); got rng kind {None if rng is None else rng.kind!r}"
            )
        self._check_static(state, n_steps)
        if n_steps == 0:
            return state
        integ, R = self.integrator, state.R
        # the engine's times: t_{n+1} = t_n + dt in float64, controls as one-sided limits
        starts = [float(state.t)]
        for _ in range(n_steps):
            starts.append(starts[-1] + integ.dt)
        ends, eps = starts[1:], integ.t_eps
        # every control of the run read once, [G, n] / [n]; chunks take slices
        if isinstance(integ, Brownian):
            mu, tc = integ.mobility_like(R), [t - eps for t in ends]
            kT = self._values(integ.kT, tc, R)
            scale = torch.sqrt(2.0 * kT.view(-1, 1, 1, 1) * mu * integ.dt)
            controls = [self._scales(tc, R)]
            carry: list[Any] = [R]
            consts: list[Any] = [mu * integ.dt]
        else:
            assert state.P is not None
            m, c = integ.mass_like(R), integ._damping_like(R)
            h = 0.5 * integ.dt
            kT = self._values(integ.kT, [t + h for t in starts[:-1]], R)
            scale = torch.sqrt((1.0 - c * c) * m * kT.view(-1, 1, 1, 1))
            controls = [
                self._scales([t + eps for t in starts[:-1]], R),
                self._scales([t - eps for t in ends], R),
            ]
            F0 = state.aux.get("force")
            parts = [F0] if F0 is not None and not self.scaled else self._force_parts(R)
            carry = [R, state.P, parts]
            consts = [c, h / m, h]
        block = self.chunk * max(1, _NOISE_BLOCK // (self.chunk * R[0].numel() * R.shape[0]))
        done = 0
        while done < n_steps:
            nb = min(block, n_steps - done)
            # [nb, B, N, d], contiguous: torch 2.13's inductor miscompiled the chain's
            # chunk (torch.func.grad forces came out zero) when the noise was a transposed view
            xi = rng.randn(nb, *R.shape[1:], dtype=R.dtype).to(R.device)
            noise = scale[done : done + nb] * xi.transpose(0, 1).contiguous()
            for a in range(0, nb, self.chunk):
                k = min(self.chunk, nb - a)
                fn = self._compiled if k == self.chunk else self._eager
                lo, hi = done + a, done + a + k
                *carry, ok = fn(*carry, *(v[:, lo:hi] for v in controls), noise[a : a + k], *consts)
                if not bool(ok):
                    raise SimulationDivergedError(
                        f"non-finite positions or momenta within steps {state.step + lo + 1}.."
                        f"{state.step + hi} (fused chunk of {k})",
                        step=state.step + hi,
                        time=ends[hi - 1],
                    )
            done += nb
        t = torch.as_tensor(ends[-1], dtype=state.t.dtype)
        if isinstance(integ, Brownian):
            return state.replace(R=carry[0], t=t, step=state.step + n_steps)
        R1, P1, parts = carry
        F1 = self._total_force(parts, controls[1][:, -1:], 0)
        return state.replace(
            R=R1, P=P1, aux={**state.aux, "force": F1}, t=t, step=state.step + n_steps
        )

    # ------------------------------------------------------------------ controls

    def _values(self, schedule: Schedule, times: list[float], like: Tensor) -> Tensor:
        """A schedule's values at ``times`` ``[n]``, in ``like``'s dtype and device."""
        if not callable(schedule):
            return torch.full((len(times),), float(schedule), dtype=like.dtype, device=like.device)
        v = _at_times(lambda t: evaluate_schedule(schedule, t), times, "kT")
        if v.shape[1] != 1:
            raise ControlMDError(
                f"FusedSteps needs one kT value per time; the schedule gave {v.shape[1]}"
            )
        return v[:, 0].to(device=like.device, dtype=like.dtype)

    def _scales(self, times: list[float], like: Tensor) -> Tensor:
        """The scales ``s_g(t)`` of the scaled terms at ``times``: ``[G, n]`` (``G = 0``
        without scaled terms)."""
        rows = [
            _at_times(term.protocol, times, "scaling protocol")[:, term.channel]
            for term in self.scaled
        ]
        if not rows:
            return torch.zeros(0, len(times), dtype=like.dtype, device=like.device)
        return torch.stack(rows).to(device=like.device, dtype=like.dtype)

    # ------------------------------------------------------------------ forces

    def _force_parts(self, R: Tensor) -> list[Tensor]:
        """Unscaled forces ``[B, N, d]`` of the fixed terms (one tensor, first, where there
        are any) and of each scaled term's base, differentiable where a graph is being
        built."""
        parts = [] if self.fixed is None else [_forces(self.fixed, R)]
        return parts + [_forces(term.base, R) for term in self.scaled]

    def _total_force(self, parts: list[Tensor], scales: Tensor, k: int) -> Tensor:
        """``F_fixed + sum_g s_g(t_k) F_g`` from :meth:`_force_parts`."""
        offset = 0 if self.fixed is None else 1
        F = parts[0] if offset else scales[0, k] * parts[0]
        for g in range(1 - offset, len(self.scaled)):
            F = F + scales[g, k] * parts[g + offset]
        return F

    def _brownian_chunk(
        self, R: Tensor, scales: Tensor, noise: Tensor, mu_dt: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``K`` Euler–Maruyama steps ``R += mu dt F(R, t_k) + noise_k``; returns the
        positions and whether they are all finite."""
        space = self.integrator.space
        for k in range(noise.shape[0]):
            F = self._total_force(self._force_parts(R), scales, k)
            R = space.shift(R, mu_dt * F + noise[k])
        return R, torch.isfinite(R).all()

    def _langevin_chunk(
        self,
        R: Tensor,
        P: Tensor,
        parts: list[Tensor],
        s_first: Tensor,
        s_last: Tensor,
        noise: Tensor,
        c: Tensor,
        h_over_m: Tensor,
        h: float,
    ) -> tuple[Tensor, Tensor, list[Tensor], Tensor]:
        """``K`` BAOAB steps from the force parts at ``R`` (:meth:`_force_parts`; without
        scaled terms, the total force); returns the positions, momenta, the force parts at
        the new positions (the next chunk starts from them) and whether ``R`` and ``P`` are
        all finite."""
        space = self.integrator.space
        for k in range(noise.shape[0]):
            P = P + h * self._total_force(parts, s_first, k)
            R = space.shift(R, h_over_m * P)
            P = c * P + noise[k]
            R = space.shift(R, h_over_m * P)
            parts = self._force_parts(R)
            P = P + h * self._total_force(parts, s_last, k)
        return R, P, parts, torch.isfinite(R).all() & torch.isfinite(P).all()

    # ------------------------------------------------------------------ checks

    def _check_static(self, state: State, n_steps: int) -> None:
        """``E_0`` must not depend on time: its energies at ``state.R`` at the run's first,
        middle and last step times must be equal."""
        t0 = float(state.t)
        times = [t0, t0 + 0.5 * n_steps * self.integrator.dt, t0 + n_steps * self.integrator.dt]
        terms = [] if self.fixed is None else [self.fixed]
        for term in [*terms, *(scaled.base for scaled in self.scaled)]:
            with torch.no_grad():
                E = [term.energy(state.R, torch.tensor(t, dtype=torch.float64)) for t in times]
            if not (torch.equal(E[0], E[1]) and torch.equal(E[0], E[2])):
                raise ControlMDError(
                    f"FusedSteps needs the unscaled term {type(term).__name__} to be "
                    f"independent of time; its energy changes over t = {times[0]:g}.."
                    f"{times[2]:g}"
                )


def _at_times(fn: Callable[[Tensor], Any], times: list[float], what: str) -> Tensor:
    """``fn``'s values at each of ``times``, ``[K, C]`` (``C`` channels; a number is one):
    one call where ``fn`` takes a vector of times, else one call per time.

    :raises ControlMDError: values per replica (more than a channel vector at one time).
    """
    t = torch.tensor(times, dtype=torch.float64)
    try:
        v = torch.as_tensor(fn(t))
    except Exception:  # a function of one time only
        v = None
    if v is not None and v.ndim in (1, 2) and v.shape[0] == len(times):
        return v.reshape(len(times), -1)
    values = [torch.as_tensor(fn(ti)) for ti in t]
    for value in values:
        if value.ndim > 1:
            raise ControlMDError(
                f"FusedSteps needs one {what} value per time (not per replica); at one "
                f"time it gave shape {tuple(value.shape)}"
            )
    return torch.stack([value.reshape(-1) for value in values])


def _split(potential: Potential) -> tuple[Potential | None, list[ScaledPotential]]:
    """``(fixed part or None, scaled terms)`` of ``E = E_fixed + sum_g s_g(t) E_g``."""
    if _is_wrapper(potential):
        potential = potential.inner  # type: ignore[assignment]
    terms = potential.potentials() if isinstance(potential, SumPotential) else [potential]
    scaled = [term for term in terms if isinstance(term, ScaledPotential)]
    fixed = [term for term in terms if not isinstance(term, ScaledPotential)]
    if not fixed:
        return None, scaled
    return (fixed[0] if len(fixed) == 1 else SumPotential(fixed)), scaled


def _forces(term: Potential, R: Tensor) -> Tensor:
    """``-dE/dR`` ``[B, N, d]`` of a time-independent term: its closed form where it has
    one; inside ``torch.compile`` by ``torch.func.grad`` (traceable), else by the term's
    own autograd path; differentiable where a graph is being built."""
    if term.closed_form_forces or not torch.compiler.is_compiling():
        return term.energy_and_forces(R, None, create_graph=torch.is_grad_enabled())[1]
    return -torch.func.grad(lambda x: term.energy(x, None).sum())(R)


def _is_wrapper(potential: Potential) -> bool:
    """A potential whose energy is its ``inner``'s (e.g. ``OneGraph``): its one child is a
    potential named ``inner``."""
    children = list(potential.children())
    inner = getattr(potential, "inner", None)
    return isinstance(inner, Potential) and len(children) == 1 and children[0] is inner
