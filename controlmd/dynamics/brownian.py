"""Overdamped Brownian (Langevin) dynamics.

Equation of motion (Itô): ``dx = mu F(x, t) dt + sqrt(2 kT mu) dW`` with mobility
``mu = 1 / gamma`` (``gamma`` the friction coefficient, force per velocity), so the free
diffusion coefficient is ``D = kT mu`` and ``<|x(t) - x(0)|^2> = 2 d kT t / gamma``.

Two update rules:

* ``"euler_maruyama"`` (any potential):
  ``x_{n+1} = x_n + mu F(x_n, t_{n+1}) dt + sqrt(2 kT(t_{n+1}) mu dt) xi``.
* ``"exact_ou"`` (a :class:`~controlmd.potentials.external.HarmonicTrap` alone): the exact
  Ornstein–Uhlenbeck transition of ``E = k/2 |x - c|^2`` with the centre held at
  ``c = c(t_{n+1})`` over the step:
  ``x_{n+1} = c + (x_n - c) e^{-mu k dt} + sqrt(kT / k (1 - e^{-2 mu k dt})) xi``.
  Particles the trap does not act on diffuse freely (exactly).

Control convention (both rules): at each step the control is updated first, from
``t_n`` to ``t_{n+1}``, and the particle then moves under the new control. Controls are
read as left limits, ``u(t_{n+1} - eps)`` (see
:data:`~controlmd.dynamics.base.CONTROL_TIME_OFFSET`), so a piecewise-constant control
whose piece starts at ``t_k`` first moves the particle in the step from ``t_k`` to
``t_k + dt``, exactly like a held env action.

Work and heat (``track_work=True``; ``aux["work"]``, ``aux["heat"]`` ``[B]``): the protocol
work ``W += E(x_n, t_{n+1}^-) - E(x_n, t_n^-)`` is the control change made at fixed
configuration (it includes a jump at ``t_n``, e.g. from a fixed initial value at
``t = 0``), the discrete Jarzynski / Crooks work used by Schmiedl & Seifert (PRL 98,
108301, 2007) for optimal trap dragging; the heat released to the bath is the energy lost
by the move under the step's control, ``Q += E(x_n, t_{n+1}^-) - E(x_{n+1}, t_{n+1}^-)``.
A *closing* jump (:func:`~controlmd.dynamics.base.closing_jumps`, e.g. the fixed final
value of :class:`~controlmd.protocols.Endpoints`) at ``t_{n+1}`` is added to the work of
the step ending there, at ``x_{n+1}``. Per trajectory the first law
``W = E_final - E_initial + Q`` holds exactly. With this convention
``<exp(-W/kT)> = exp(-dF/kT)`` holds exactly for the exact OU step (each move is an
equilibrium-preserving transition under the current control) and up to O(dt) bias for
Euler–Maruyama.

``kT = 0`` is allowed: the noise term vanishes and the step is the explicit Euler step
(or, for ``exact_ou``, the exact solution) of the gradient flow ``dx/dt = mu F(x, t)``;
``init`` still takes ``rng`` (the noise is drawn and multiplied by zero).

Units: reduced LJ units (length sigma, energy epsilon, time tau); kT is an energy, gamma
a friction coefficient (energy * time / length^2).
"""

from __future__ import annotations

import torch

from controlmd._validation import check_choice, check_positions, check_positive
from controlmd.dynamics.base import (
    Integrator,
    Schedule,
    State,
    check_schedule,
    closing_jumps,
    evaluate_schedule,
    per_replica,
)
from controlmd.errors import ControlMDError
from controlmd.potentials.base import Potential
from controlmd.potentials.external import HarmonicTrap
from controlmd.rng import ReplicaRNG
from controlmd.space import Space

Tensor = torch.Tensor

__all__ = ["Brownian"]

_METHODS = ("euler_maruyama", "exact_ou")


class Brownian(Integrator):
    """Overdamped Brownian dynamics, batched over replicas.

    Args:
        potential: energy ``E(x, t)``; for ``method="exact_ou"`` a ``HarmonicTrap``.
        dt: time step (> 0).
        kT: temperature as an energy (>= 0; 0 is the noise-free gradient flow
            ``dx = mu F dt``), constant or a schedule ``kT(t)``; evaluated at ``t_{n+1}`` in
            step ``n``.
        gamma: friction coefficient (> 0), scalar or per particle ``[N]``; mobility
            ``mu = 1 / gamma``.
        space: the box (positions are wrapped with ``space.shift``).
        method: ``"euler_maruyama"`` or ``"exact_ou"``.
        track_work: accumulate the protocol work in ``state.aux["work"]`` and the heat
            released to the bath in ``state.aux["heat"]`` (``[B]`` each).

    Example::

        >>> import torch
        >>> from controlmd.rng import ReplicaRNG
        >>> class Free(Potential):
        ...     def energy(self, R, t=None):
        ...         return 0.0 * R.sum(dim=(-2, -1))
        >>> bd = Brownian(Free(), dt=0.01, kT=1.0, gamma=2.0)
        >>> state = bd.init(torch.zeros(4, 1, 3, dtype=torch.float64), rng=ReplicaRNG(0, 4))
        >>> bd.step(state).R.shape
        torch.Size([4, 1, 3])
    """

    stochastic = True
    _gamma: Tensor  # buffer: friction coefficient, [] or [N]

    def __init__(
        self,
        potential: Potential,
        *,
        dt: float,
        kT: Schedule,
        gamma: float | Tensor = 1.0,
        space: Space | None = None,
        method: str = "euler_maruyama",
        track_work: bool = False,
    ) -> None:
        super().__init__(potential, dt=dt, space=space)
        check_schedule("kT", kT, allow_zero=True)
        check_positive("gamma", gamma)
        check_choice("method", method, _METHODS)
        if method == "exact_ou":
            _check_trap(potential)
        self.kT = kT
        self.register_buffer(
            "_gamma", torch.as_tensor(gamma, dtype=torch.float64), persistent=False
        )
        self.method = method
        self.track_work = bool(track_work)

    def mobility_like(self, R: Tensor) -> Tensor:
        """Mobility ``mu = 1/gamma`` broadcastable against ``R`` ``[B, N, d]`` (converted to
        ``R``'s dtype and device once, not at every step, unless ``gamma`` requires grad;
        read-only; a ``gamma`` changed in place through ``.data`` is not seen: assign a new
        tensor)."""
        g = self._gamma
        if g.ndim == 1 and g.shape[0] != R.shape[1]:
            raise ControlMDError(
                f"gamma has {g.shape[0]} entries but there are N = {R.shape[1]} particles"
            )
        if g.requires_grad:  # a cached value would hold this call's graph
            mu = 1.0 / g.to(R)
            return mu.view(1, -1, 1) if mu.ndim else mu
        key = (R.dtype, R.device, g.data_ptr(), g._version)
        hit = self.__dict__.get("_mobility_like")
        if hit is None or hit[0] != key:
            mu = 1.0 / g.to(R)
            hit = self.__dict__["_mobility_like"] = (key, mu.view(1, -1, 1) if mu.ndim else mu)
        return hit[1]

    def control_schedules(self) -> dict[str, tuple[Schedule, bool]]:
        return {"kT": (self.kT, True)}

    def init(
        self,
        R: Tensor,
        *,
        kT: float | None = None,
        rng: ReplicaRNG | None = None,
        P: Tensor | None = None,
    ) -> State:
        """Initial state at ``t = 0`` from positions ``R`` ``[B, N, d]``.

        ``kT`` is accepted for interface symmetry and unused (no momenta); ``rng`` is
        required (the noise stream of each replica); ``P`` must be ``None``.
        """
        check_positions("R", R)
        if P is not None:
            raise ControlMDError("Brownian dynamics is overdamped and has no momenta; pass P=None")
        if rng is None:
            raise ControlMDError(
                "Brownian dynamics draws noise: pass rng=ReplicaRNG(seed, B) to init"
            )
        if rng.n_replicas != R.shape[0]:
            raise ControlMDError(f"rng has {rng.n_replicas} replicas but R has B = {R.shape[0]}")
        self.mobility_like(R)  # validates gamma against N
        state = State(R=self.space.wrap(R), P=None, rng=rng)
        return self._with_accumulators(state)

    def step(self, state: State) -> State:
        R, t = state.R, state.t
        t1 = t + self.dt
        tc = t1 - self.t_eps  # the control of this step: u(t_{n+1}) as a left limit
        aux = dict(state.aux)
        # a constant kT is only needed where the OU factors are not cached: made then
        kT = None if self._constant_kT() else self._kT_at(tc, R)
        mu = self.mobility_like(R)
        xi = state.rng.randn(*R.shape[1:], dtype=R.dtype)  # type: ignore[union-attr]
        if xi.device != R.device:
            xi = xi.to(R.device)
        E_end = None
        remembered = False  # whether E(x_n, t_n^-) may be the previous step's E_end
        if self.method == "euler_maruyama":
            kT = self._kT_at(tc, R) if kT is None else kT
            E1, F = self.potential.energy_and_forces(R, tc)
            dR = mu * F * self.dt + torch.sqrt(2.0 * kT * mu * self.dt) * xi
            R1 = self.space.shift(R, dR)
        elif torch.is_grad_enabled():  # each term reads the protocol itself: the graph,
            # and the order in which backward sums the gradients, stay those of separate reads
            trap: HarmonicTrap = self.potential  # type: ignore[assignment]
            if self.track_work:
                E1 = trap.energy(R, tc)
            k, c = trap.stiffness_at(tc, R), trap.center_at(tc, R)
            R1 = self.space.shift(R, self._ou_displacement(R, k, c, kT, tc, mu, xi))
        else:  # no graph: the trap's controls at tc, read once for the move and both energies
            trap = self.potential  # type: ignore[assignment]
            k, c = trap.stiffness_at(tc, R), trap.center_at(tc, R)
            if self.track_work:
                E1 = trap.energy_at(R, k, c)
            R1 = self.space.shift(R, self._ou_displacement(R, k, c, kT, tc, mu, xi))
            if self.track_work:
                E_end = self._trap_energy(R1, k, c, remember=True)
                remembered = True
        if self.track_work:
            aux = self._account(aux, R, R1, t, t1, E1, E_end, remembered)
        return state.replace(R=R1, t=t1, step=state.step + 1, aux=aux)

    def _constant_kT(self) -> bool:
        """Whether ``kT`` is a number (its tensor is then made only where needed)."""
        return isinstance(self.kT, int | float)

    def _kT_at(self, t: Tensor, R: Tensor) -> Tensor:
        """``kT(t)`` broadcastable against ``R``: ``[]`` or ``[B, 1, 1]``."""
        return per_replica(evaluate_schedule(self.kT, t), R)

    def _trap_energy(self, R: Tensor, k: Tensor, c: Tensor, *, remember: bool) -> Tensor:
        """``trap.energy_at(R, k, c)`` ``[B]`` without a graph. The exact-OU step's end
        energy ``E(x_{n+1}, t_{n+1}^-)`` (``remember=True``) is the next step's energy
        before the control change, the same operations on the same tensors (``R`` the
        next state's positions, ``k`` and ``c`` the memoized controls of
        :mod:`controlmd.potentials.control_memo`): it is remembered and returned then,
        while the tensors are those, unchanged."""
        keys = (_tensor_key(R), _tensor_key(k), _tensor_key(c))
        memo: list[tuple[Tensor, tuple[object, ...], tuple[Tensor, Tensor], Tensor]]
        memo = self.__dict__.setdefault("_trap_energy_memo", [])
        for held, held_keys, _, energy in memo:
            if held is R and held_keys == keys and None not in keys:
                return energy
        trap: HarmonicTrap = self.potential  # type: ignore[assignment]
        energy = trap.energy_at(R, k, c)
        if remember:  # two entries: a step stores its end energy before its work reads
            # the previous step's; the tensors are held so their memory stays theirs
            memo[:] = [*memo[-1:], (R, keys, (k, c), energy)]
        return energy

    def _account(
        self,
        aux: dict[str, Tensor],
        R: Tensor,
        R1: Tensor,
        t: Tensor,
        t1: Tensor,
        E1: Tensor,
        E_end: Tensor | None,
        remembered: bool = False,
    ) -> dict[str, Tensor]:
        """Work and heat of one step (module docstring): the control change at ``x_n``
        (from ``t_n^-``, or ``t_n^+`` after a closing jump, to ``t_{n+1}^-``), the heat
        ``E(x_n) - E(x_{n+1})`` released by the move under the control of the step (``E1``
        and ``E_end`` ``[B]``, the latter computed here when ``None``), and a closing jump
        at ``t_{n+1}`` at ``x_{n+1}``. ``remembered`` (exact OU without a graph): the
        energy at ``x_n`` before the control change goes through :meth:`_trap_energy`."""
        closing = closing_jumps(self)
        t_before = t + self.t_eps if self._is_closing(t, closing) else t - self.t_eps
        if E_end is None:
            E_end = self.potential.energy(R1, t1 - self.t_eps)
        work, heat = aux.get("work"), aux.get("heat")
        if work is None or heat is None:
            zeros = R.new_zeros(R.shape[0])
            work, heat = aux.get("work", zeros), aux.get("heat", zeros)
        if remembered:
            trap: HarmonicTrap = self.potential  # type: ignore[assignment]
            c0 = trap.center_at(t_before, R)  # the order of HarmonicTrap.energy's reads
            E0 = self._trap_energy(R, trap.stiffness_at(t_before, R), c0, remember=False)
        else:
            E0 = self.potential.energy(R, t_before)
        work = work + E1 - E0
        heat = heat + E1 - E_end
        # a closing jump's work; elsewhere closing_jump_work's zeros were added, which
        # changed no bit (work is never -0.0: E1 >= +0)
        if self._is_closing(t1, closing):
            work = work + self.control_jump_work(R1, t1)
        return {**aux, "work": work, "heat": heat}

    def _ou_displacement(
        self,
        R: Tensor,
        k: Tensor,
        c: Tensor,
        kT: Tensor | None,
        tc: Tensor,
        mu: Tensor,
        xi: Tensor,
    ) -> Tensor:
        """Exact OU displacement ``x_{n+1} - x_n`` under the trap's stiffness ``k`` (``[]``
        or ``[B]``) and centre ``c`` (from :meth:`HarmonicTrap.center_at`); ``kT`` as from
        :meth:`_kT_at` at ``tc``, or ``None`` to make it here if needed."""
        trap: HarmonicTrap = self.potential  # type: ignore[assignment]
        if trap.particles is None:
            drift_factor, amplitude = self._ou_factors(R, k, kT, tc, mu)
            return drift_factor * trap.space.displacement(R, c) + amplitude * xi
        kT = self._kT_at(tc, R) if kT is None else kT
        k = per_replica(k, R)
        decay = torch.exp(-mu * k * self.dt)
        drift = (decay - 1.0) * trap.space.displacement(R, c)
        var = kT / k * (1.0 - decay * decay)
        trapped = torch.zeros(1, R.shape[1], 1, dtype=torch.bool, device=R.device)
        trapped[:, trap.particles.to(R.device)] = True
        drift = torch.where(trapped, drift, torch.zeros_like(drift))
        var = torch.where(trapped, var, 2.0 * kT * mu * self.dt)
        return drift + torch.sqrt(var.clamp_min(torch.finfo(var.dtype).tiny)) * xi

    def _ou_factors(
        self, R: Tensor, k: Tensor, kT: Tensor | None, tc: Tensor, mu: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(e^{-mu k dt} - 1, sqrt(kT/k (1 - e^{-2 mu k dt})))``, broadcastable against
        ``R``: the exact OU step is ``x += drift_factor (x - c) + amplitude xi``. Computed
        once per dtype and device when the stiffness is a fixed tensor and ``kT`` a number
        (no graph either way), else at every step (``kT`` ``None``: made at ``tc``)."""
        trap: HarmonicTrap = self.potential  # type: ignore[assignment]
        stiffness, gamma = trap.stiffness, self._gamma
        key = None
        if (
            isinstance(stiffness, Tensor)
            and not stiffness.requires_grad
            and not gamma.requires_grad
            and isinstance(self.kT, int | float)
        ):
            key = (
                R.dtype,
                R.device,
                self.dt,
                self.kT,
                stiffness.data_ptr(),
                stiffness._version,
                gamma.data_ptr(),
                gamma._version,
            )
            hit = self.__dict__.get("_ou_cache")
            if hit is not None and hit[0] == key:
                cached: tuple[Tensor, Tensor] = hit[1]
                return cached
        kT = self._kT_at(tc, R) if kT is None else kT
        k = per_replica(k, R)
        decay = torch.exp(-mu * k * self.dt)
        var = kT / k * (1.0 - decay * decay)
        # clamped: at kT = 0 the variance is 0 and sqrt's infinite slope would turn the
        # gradient in a learnable stiffness into NaN (no effect on any variance > 1e-308)
        factors = (decay - 1.0, torch.sqrt(var.clamp_min(torch.finfo(var.dtype).tiny)))
        if key is not None:
            self.__dict__["_ou_cache"] = (key, factors)
        return factors


def _check_trap(potential: Potential) -> None:
    """``method="exact_ou"`` needs a lone :class:`HarmonicTrap`."""
    if not isinstance(potential, HarmonicTrap):
        raise ControlMDError(
            "method='exact_ou' is exact only for a lone harmonic trap; got potential "
            f"{type(potential).__name__}; use method='euler_maruyama' for other potentials"
        )


def _tensor_key(x: Tensor) -> tuple[object, ...] | None:
    """The memory, layout and version counter of ``x``: equal keys of tensors whose memory
    is still held mean the same values (``None`` for an inference tensor, which has no
    version counter)."""
    if x.is_inference():
        return None
    return (x.data_ptr(), x.shape, x.stride(), x.dtype, x.device, x._version)
