"""Reversible backpropagation: exact gradients through long trajectories in O(1) memory.

Velocity Verlet and the Nosé–Hoover chain integrator are time-reversible: step ``n`` can
be undone from state ``n + 1`` (``p -= dt/2 F(q_{n+1})``, ``q -= dt p/m``, ``p -= dt/2
F(q_n)``; each Suzuki–Yoshida chain half step is inverted by the same half step with
``-dt``). :func:`simulate_reversible` runs the trajectory without building a graph and,
in the backward pass, walks it backwards, recomputing each state from the next one
instead of storing it, while propagating the adjoint (in the spirit of the Verlet
adjoint of Wang, Axelrod & Gómez-Bombarelli, arXiv:2003.00868, and of reversible
molecular simulation, Greener, arXiv:2412.04374).

Per backward step: one force evaluation with a graph at the recomputed ``q_n`` (it both
undoes the kick and is the force whose vector-Jacobian product is needed) and one VJP of
that force (a Hessian-vector product and the parameter derivatives; analytic for the
fused Lennard-Jones kernel, :mod:`controlmd.potentials.lj_fused`). The two half kicks
that share ``q_n`` are merged into one VJP. Each Nose-Hoover chain half step is undone
and differentiated analytically, update by update (:func:`_chain_reverse`; no autograd
graph: the chain is a few hundred operations on ``[B]`` vectors, which autograd made 3x
dearer than the forces at N = 64). Memory: the current state, one force graph, and the
checkpoints below.

Round-off: floating-point Verlet is not bit-reversible, and in a chaotic system the
reconstruction error grows like ``e^{lambda t}`` (lambda ~ 4 per time unit for the LJ
liquid at density 0.8, kT = 1). The exact state is therefore stored every ``window``
steps during the forward pass (``ceil(n_steps / window) + 1`` copies of ``(q, p)``, a few
MiB even for 10^4 steps of 4000 particles) and restored when the backward walk reaches
it, so the error never grows for more than ``window`` steps: in float64 with
``window = 200`` (one time unit at dt = 0.005) the gradient matches direct backprop to
~1e-10 relative.

Gradients flow to the initial ``R``, ``P`` (and chain variables), and to every parameter
of the integrator that requires grad (potential parameters, protocols held by the
potential, temperature schedules of the chain). The loss may depend on the final state
(and on the parameters directly); observables along the trajectory are not recorded here:
use ``simulate(..., gradient="checkpoint")`` for time-averaged losses.

**Langevin dynamics** is not supported: its O step ``p' = c p + sqrt((1 - c^2) m kT) xi``
can be undone only with the noise ``xi`` of that step. Reversing it would need the noise
replayed backwards: the per-replica generator states stored at each window start and the
window's ``W`` noise draws regenerated before walking it backwards (``O(W N d)`` memory,
the same order as checkpointing), and friction amplifies round-off by ``e^{gamma dt}`` per
reversed step. ``simulate(..., gradient="checkpoint")`` already replays the stored noise
exactly (generator states saved per window), so use it for Langevin and Brownian runs.

Units: those of the integrator (reduced LJ units for classical tasks).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from controlmd._validation import check_int
from controlmd.dynamics.base import (
    Integrator,
    State,
    evaluate_schedule,
    jump_steps,
    kinetic_energy,
)
from controlmd.dynamics.nose_hoover import NoseHooverChain
from controlmd.dynamics.nve import NVE
from controlmd.errors import ControlMDError
from controlmd.potentials.base import Potential, SumPotential
from controlmd.potentials.lj_fused import lj_force_vjp
from controlmd.potentials.pair import LennardJones

Tensor = torch.Tensor

__all__ = ["simulate_reversible"]


def simulate_reversible(
    integrator: Integrator, state: State, n_steps: int, *, window: int = 200
) -> State:
    """Advance ``state`` by ``n_steps`` with gradients by reversible backpropagation.

    :param integrator: an :class:`~controlmd.dynamics.nve.NVE` or
        :class:`~controlmd.dynamics.nose_hoover.NoseHooverChain` integrator (deterministic
        and time-reversible).
    :param state: initial state; gradients reach ``state.R``, ``state.P`` (and the chain's
        ``xi``, ``p_xi``, ``Q``) when they require grad, and every integrator parameter
        that requires grad.
    :param n_steps: number of steps (>= 0).
    :param window: ``W``, steps between stored exact states (>= 1); bounds the growth of
        round-off in the backward reconstruction to ``W`` steps.
    :return: the final state; its ``R``, ``P`` (and chain ``xi``, ``p_xi``) are
        differentiable. The same values as ``simulate(integrator, state, n_steps)``.
    :raises ControlMDError: for an unsupported integrator (Langevin, Brownian).

    Example (a Lennard-Jones dimer; d E_final / d epsilon through 1000 steps)::

        >>> import torch
        >>> from controlmd.dynamics import NVE
        >>> from controlmd.potentials import LennardJones
        >>> lj = LennardJones(r_cut=None, shift="none", learnable=("epsilon",))
        >>> nve = NVE(lj, dt=0.005)
        >>> R = torch.tensor([[[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]]], dtype=torch.float64)
        >>> final = simulate_reversible(nve, nve.init(R, P=torch.zeros_like(R)), 1000, window=100)
        >>> lj.energy(final.R).sum().backward()
        >>> bool(torch.isfinite(lj.epsilon.grad))
        True
    """
    if not isinstance(integrator, (NVE, NoseHooverChain)):
        hint = (
            "; stochastic dynamics cannot be reversed without its noise: use "
            "simulate(..., gradient='checkpoint'), which replays the stored noise"
            if integrator.stochastic
            else "; use simulate(..., gradient='checkpoint')"
        )
        raise ControlMDError(
            "simulate_reversible supports NVE and NoseHooverChain (time-reversible "
            f"integrators), got {type(integrator).__name__}{hint}"
        )
    check_int("n_steps", n_steps, minimum=0)
    check_int("window", window)
    if state.P is None:
        raise ControlMDError("simulate_reversible needs momenta: state.P is None")
    chain = isinstance(integrator, NoseHooverChain)
    names = ("R", "P", "xi", "p_xi", "Q") if chain else ("R", "P")
    inputs = [state.R, state.P] + [state.aux[k] for k in names[2:]]
    params = [p for p in integrator.parameters() if p.requires_grad]
    meta = _Meta(integrator, state, n_steps, window, chain)
    outs: tuple[Tensor, ...] = _Reversible.apply(meta, len(inputs), *inputs, *params)
    aux = {k: v for k, v in state.aux.items() if k != "force"}
    if chain:
        aux["xi"], aux["p_xi"] = outs[2], outs[3]
    return state.replace(R=outs[0], P=outs[1], t=meta.t_final, step=state.step + n_steps, aux=aux)


class _Meta:
    """What the autograd function needs besides tensors (integrator, schedule, times)."""

    def __init__(
        self,
        integrator: NVE | NoseHooverChain,
        state: State,
        n_steps: int,
        window: int,
        chain: bool,
    ) -> None:
        self.integrator = integrator
        self.template = state
        self.n_steps = n_steps
        self.window = window
        self.chain = chain
        self.t_final: Tensor = state.t
        self.jumps = jump_steps(integrator, float(state.t), n_steps)


class _Reversible(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, meta: _Meta, n_state: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        integ = meta.integrator
        R, P = tensors[0], tensors[1]
        aux = dict(meta.template.aux)
        if meta.chain:
            aux.update(xi=tensors[2], p_xi=tensors[3], Q=tensors[4])
        aux.pop("force", None)
        s = meta.template.replace(R=R.detach(), P=P.detach(), aux=aux)
        t_start = s.t.detach()
        # as simulate(): times from the step count, forces refreshed at protocol jumps
        times = (
            t_start
            + torch.arange(meta.n_steps + 1, dtype=torch.float64, device=s.t.device) * integ.dt
        )
        jumps = meta.jumps
        s = integ.prepare(s.replace(t=times[0]))
        checkpoints: dict[int, tuple[Tensor, ...]] = {0: _chain_state(s, meta.chain)}
        for n in range(meta.n_steps):
            if n in jumps:
                s = integ.prepare(s)
            s = integ.step(s).replace(t=times[n + 1])
            if (n + 1) % meta.window == 0 and n + 1 < meta.n_steps:
                checkpoints[n + 1] = _chain_state(s, meta.chain)
        meta.t_final = s.t
        ctx.meta = meta
        ctx.n_state = n_state
        ctx.times = times
        ctx.checkpoints = checkpoints
        final = _chain_state(s, meta.chain)
        ctx.save_for_backward(*final, *tensors[n_state:])
        if meta.chain:
            return final[0], final[1], final[2], final[3]
        return final[0], final[1]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        meta: _Meta = ctx.meta
        n_out = 4 if meta.chain else 2
        saved = ctx.saved_tensors
        final, params = saved[:n_out], list(saved[n_out:])
        inputs_Q = None
        if meta.chain:
            inputs_Q = meta.template.aux["Q"].detach()
        adj = [torch.zeros_like(x) if g is None else g for x, g in zip(final, grads)]
        a_params = [torch.zeros_like(p) for p in params]
        a_Q = torch.zeros_like(inputs_Q) if inputs_Q is not None else None
        split = _split_fused_lj(meta, params)
        if split is not None:
            a_state, a_params = _walk_back_lj(
                meta, ctx.times, ctx.checkpoints, final, adj, params, *split
            )
        else:
            with torch.enable_grad():
                a_state, a_params, a_Q = _walk_back(
                    meta, ctx.times, ctx.checkpoints, final, adj, params, a_params, inputs_Q, a_Q
                )
        out: list[Tensor | None] = [None, None, a_state[0], a_state[1]]
        if meta.chain:
            out += [a_state[2], a_state[3], a_Q]
        return (*out, *a_params)


def _split_fused_lj(
    meta: _Meta, params: list[Tensor]
) -> tuple[LennardJones, list[Potential]] | None:
    """NVE whose potential is one Lennard-Jones term on the fused kernel plus any other
    terms (``H0 + H_ctrl(q, t; theta)``: traps, pulling forces, external fields driven by
    protocols), where the only LJ parameters differentiated are sigma and epsilon: the
    walk can take the LJ force and its VJP from one kernel call (:func:`lj_force_vjp`) and
    differentiate only the other terms with autograd. ``(lj, others)``, else ``None``."""
    if meta.chain:
        return None
    pot = meta.integrator.potential
    terms = pot.potentials() if isinstance(pot, SumPotential) else [pot]
    fused = [t for t in terms if isinstance(t, LennardJones) and t.fused_supported()]
    if len(fused) != 1:
        return None
    lj = fused[0]
    if any(p.requires_grad and p is not lj.sigma and p is not lj.epsilon for p in lj.parameters()):
        return None
    return lj, [t for t in terms if t is not lj]


def _walk_back_lj(
    meta: _Meta,
    times: Tensor,
    checkpoints: dict[int, tuple[Tensor, ...]],
    final: tuple[Tensor, ...],
    adj: list[Tensor],
    params: list[Tensor],
    lj: LennardJones,
    others: list[Potential],
) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`_walk_back` for NVE with a fused LJ term (plus, optionally, other terms).

    At each recomputed ``q_n`` the half kicks that use it pull the adjoint back with the
    cotangent ``h a_P`` each (a_P does not change between them). The LJ force does not
    depend on time, so its force and VJP come from one kernel call with the summed
    cotangent ``dt a_P`` (``h`` at both ends). The other terms are evaluated with an
    autograd graph at the times the forward used: once at ``t_n - eps`` (the force cached
    for both kicks), or at ``t_n - eps`` and ``t_n + eps`` after a protocol jump (the
    forward re-evaluated the cached force there), ``t_0 + eps`` at the start."""
    integ = meta.integrator
    dt, h, eps = integ.dt, 0.5 * integ.dt, integ.t_eps
    space = integ.space
    R, P = final[0], final[1]
    aR, aP = adj[0], adj[1]
    drift = integ.drift_factor(R)  # dt / m
    want_sigma = any(p is lj.sigma for p in params)
    want_eps = any(p is lj.epsilon for p in params)
    g_sigma = torch.zeros((), dtype=R.dtype, device=R.device)
    g_eps = torch.zeros((), dtype=R.dtype, device=R.device)
    a_params = [torch.zeros_like(p) for p in params]

    def pull(Rn: Tensor, kicks: list[tuple[Tensor, float]]) -> list[Tensor]:
        """Forces at ``Rn`` for each ``(time, weight)`` of the kicks using them, with the
        adjoint pulled back through each with cotangent ``weight * aP``."""
        nonlocal aR, g_sigma, g_eps
        v = sum(w for _, w in kicks) * aP
        F, gR, gs, ge = lj_force_vjp(lj, Rn, v, need_sigma=want_sigma, need_epsilon=want_eps)
        aR = aR + gR
        if gs is not None:
            g_sigma = g_sigma + gs
        if ge is not None:
            g_eps = g_eps + ge
        if not others:
            return [F]
        forces = []
        for t, w in kicks:
            with torch.enable_grad():
                leaf = Rn.detach().requires_grad_(True)
                F_ctrl = others[0].energy_and_forces(leaf, t, create_graph=True)[1]
                for term in others[1:]:
                    F_ctrl = F_ctrl + term.energy_and_forces(leaf, t, create_graph=True)[1]
                g = torch.autograd.grad(
                    F_ctrl, [leaf, *params], grad_outputs=w * aP, allow_unused=True
                )
            if g[0] is not None:
                aR = aR + g[0]
            _accumulate(a_params, g[1:])
            forces.append(F + F_ctrl.detach())
        return forces

    T = meta.n_steps
    if T > 0:
        F_next = pull(R, [(times[T - 1] + dt - eps, h)])[0]  # the last kick, at q_T
    for n in range(T - 1, -1, -1):
        P = torch.sub(P, F_next, alpha=h)
        aP = torch.addcmul(aP, aR, drift)
        R = space.shift(R, torch.mul(P, drift).neg_())
        ck = checkpoints.get(n)
        if ck is not None:
            R = ck[0]
        if n == 0:
            kicks = [(times[0] + eps, h)]
        elif n in meta.jumps:  # first kick of step n after the jump, last of step n - 1
            kicks = [(times[n] + eps, h), (times[n - 1] + dt - eps, h)]
        else:
            kicks = [(times[n - 1] + dt - eps, dt)]
        forces = pull(R, kicks)
        F_next = forces[-1]
        P = ck[1] if ck is not None else torch.sub(P, forces[0], alpha=h)
    for k, p in enumerate(params):
        if p is lj.sigma:
            a_params[k] = a_params[k] + g_sigma.to(p.dtype).reshape(p.shape)
        elif p is lj.epsilon:
            a_params[k] = a_params[k] + g_eps.to(p.dtype).reshape(p.shape)
    return [aR, aP], a_params


def _chain_state(s: State, chain: bool) -> tuple[Tensor, ...]:
    assert s.P is not None
    if chain:
        return (s.R.detach(), s.P.detach(), s.aux["xi"].detach(), s.aux["p_xi"].detach())
    return (s.R.detach(), s.P.detach())


def _accumulate(acc: list[Tensor], grads: tuple[Tensor | None, ...]) -> None:
    for k, g in enumerate(grads):
        if g is not None:
            acc[k] = acc[k] + g


def _walk_back(
    meta: _Meta,
    times: Tensor,
    checkpoints: dict[int, tuple[Tensor, ...]],
    final: tuple[Tensor, ...],
    adj: list[Tensor],
    params: list[Tensor],
    a_params: list[Tensor],
    Q: Tensor | None,
    a_Q: Tensor | None,
) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
    """The backward walk (see the module docstring); mirrors ``NVE.step`` /
    ``NoseHooverChain.step`` operation by operation, last to first."""
    integ = meta.integrator
    dt, h, eps = integ.dt, 0.5 * integ.dt, integ.t_eps
    space = integ.space
    R, P = final[0], final[1]
    xi, p_xi = (final[2], final[3]) if meta.chain else (None, None)
    aR, aP = adj[0], adj[1]
    a_xi, a_pxi = (adj[2], adj[3]) if meta.chain else (None, None)
    m = integ.mass_like(R)
    drift = integ.drift_factor(R)  # dt / m
    n_dof = integ.n_dof(R) if meta.chain else 0
    T = meta.n_steps

    def force_graph(Rn: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        leaf = Rn.detach().requires_grad_(True)
        return leaf, integ.potential.energy_and_forces(leaf, t, create_graph=True)[1]

    def vjp_force(leaf: Tensor, F: Tensor, v: Tensor) -> None:
        nonlocal aR
        g = torch.autograd.grad(F, [leaf, *params], grad_outputs=v, allow_unused=True)
        if g[0] is not None:
            aR = aR + g[0]
        _accumulate(a_params, g[1:])

    def chain_back(t: Tensor) -> None:
        """Undo one chain half step at time ``t`` and pull the adjoint through it."""
        nonlocal P, xi, p_xi, aP, a_xi, a_pxi, a_Q
        if not isinstance(integ, NoseHooverChain):
            raise RuntimeError(f"chain_back needs a NoseHooverChain, got {type(integ).__name__}")
        if xi is None or p_xi is None or Q is None or a_xi is None or a_pxi is None:
            raise RuntimeError("chain_back needs the chain state xi, p_xi, Q and its adjoints")
        with torch.enable_grad() if params else contextlib.nullcontext():
            kT = evaluate_schedule(integ.kT, t)
        P, xi, p_xi, aP, a_xi, a_pxi, da_Q, a_kT = _chain_reverse(
            integ, P, xi, p_xi, Q, kT.detach(), n_dof, m, aP, a_xi, a_pxi
        )
        if a_Q is not None:
            a_Q = a_Q + da_Q
        if kT.requires_grad:
            a_kT = a_kT.sum() if kT.ndim == 0 else a_kT.reshape(kT.shape)
            _accumulate(a_params, torch.autograd.grad(kT, params, a_kT, allow_unused=True))

    def state_adjoint() -> list[Tensor]:
        """``[aR, aP]``, plus ``[a_xi, a_pxi]`` with a chain."""
        if not meta.chain:
            return [aR, aP]
        if a_xi is None or a_pxi is None:
            raise RuntimeError("the chain adjoints a_xi, a_pxi are missing")
        return [aR, aP, a_xi, a_pxi]

    # F(q_T) as cached by the last forward step (evaluated at t_T - eps); for T = 0 nothing runs.
    if T == 0:
        return state_adjoint(), a_params, a_Q
    # forces at q_{n+1} were evaluated inside step n at (t_n + dt) - eps
    leaf, F = force_graph(R, times[T - 1] + dt - eps)
    v = torch.zeros_like(R)
    for n in range(T - 1, -1, -1):
        t0 = times[n]
        step_start = t0 + eps
        if meta.chain:
            chain_back(times[n] + dt - eps)
        # second half kick at q_{n+1}: its VJP completes the one pending at q_{n+1}
        v = v + h * aP
        with torch.no_grad():
            P = torch.sub(P, F.detach(), alpha=h)
        vjp_force(leaf, F, v)
        # drift
        aP = torch.addcmul(aP, aR, drift)
        with torch.no_grad():
            R = space.shift(R, torch.mul(P, drift).neg_())
        ck = checkpoints.get(n)
        if ck is not None:
            R = ck[0]
        # first half kick at q_n: F(q_n) as the forward used it (t_n - eps; t_n + eps at
        # n = 0 and after a protocol jump, where the forward refreshed the cached force)
        jump = n in meta.jumps
        leaf, F = force_graph(R, step_start if n == 0 or jump else times[n - 1] + dt - eps)
        with torch.no_grad():
            P = torch.sub(P, F.detach(), alpha=h)
        v = h * aP
        if jump:
            # the previous step's last kick used the force before the jump, F(q_n, t_n - eps)
            vjp_force(leaf, F, v)
            leaf, F = force_graph(R, times[n - 1] + dt - eps)
            v = torch.zeros_like(v)
        if meta.chain:
            chain_back(step_start)
        if ck is not None:
            P = ck[1]
            if meta.chain:
                xi, p_xi = ck[2], ck[3]
    vjp_force(leaf, F, v)
    return state_adjoint(), a_params, a_Q


def _chain_reverse(
    integ: NoseHooverChain,
    P: Tensor,
    xi: Tensor,
    p_xi: Tensor,
    Q: Tensor,
    kT: Tensor,
    n_dof: int,
    m: Tensor,
    aP: Tensor,
    a_xi: Tensor,
    a_pxi: Tensor,
) -> tuple[Tensor, ...]:
    """Undo one chain half step ``NoseHooverChain._half_step_chain`` and pull the adjoint
    through it, update by update in reverse order, analytically (no autograd graph).

    The half step is a sequence of invertible updates of ``v_j = p_xi_j / Q_j``, ``xi_j``,
    the accumulated momentum scale ``S`` and ``K2 = 2 K``: each is inverted in closed
    form, which gives the state before it, where its partial derivatives are evaluated.
    With ``c = sum(aP' * P')`` per replica the scale's adjoint needs no forward pass:
    ``a_S S`` is invariant along the chain of ``S <- S s0`` updates.

    Returns ``(P, xi, p_xi, aP, a_xi, a_pxi, a_Q, a_kT)`` at the start of the half step
    (``a_kT`` per replica ``[B]``).
    """
    M = integ.chain_length
    h = 0.5 * integ.dt
    kT_t = kT.to(P).reshape(-1) if kT.ndim else kT.to(P)
    K2_t = 2.0 * kinetic_energy(P, m)
    c_t = (aP * P).sum(dim=(-2, -1))
    # The chain itself is a few hundred operations on [B] vectors: on CPU they run in
    # NumPy (several times less overhead per operation than torch), elsewhere in torch.
    xp: Any = np if P.device.type == "cpu" else torch

    def arr(t: Tensor) -> Any:
        return t.detach().numpy() if xp is np else t

    Qa = arr(Q)
    Qs = [Qa[:, j] for j in range(M)]
    v = [arr(p_xi)[:, j] / Qs[j] for j in range(M)]
    x = [arr(xi)[:, j] for j in range(M)]
    K2, c, kT = arr(K2_t), arr(c_t), arr(kT_t)
    # adjoints of the outputs p_xi' = v Q, xi' = x
    av = [arr(a_pxi)[:, j] * Qs[j] for j in range(M)]
    aQ = [arr(a_pxi)[:, j] * v[j] for j in range(M)]
    ax = [arr(a_xi)[:, j] for j in range(M)]
    aK2 = K2 * 0.0
    akT = K2 * 0.0
    log_S = K2 * 0.0

    def G(j: int) -> Any:
        if j == 0:
            return (K2 - n_dof * kT) / Qs[0]
        return (Qs[j - 1] * v[j - 1] * v[j - 1] - kT) / Qs[j]

    def pull_G(j: int, g: Any, a: Any) -> None:
        """Add ``a dG_j/d(.)`` to the adjoints (``g`` = G_j)."""
        nonlocal aK2, akT
        if j == 0:
            aK2 = aK2 + a / Qs[0]
            akT = akT - (n_dof * a) / Qs[0]
        else:
            av[j - 1] = av[j - 1] + a * 2.0 * Qs[j - 1] * v[j - 1] / Qs[j]
            aQ[j - 1] = aQ[j - 1] + a * v[j - 1] * v[j - 1] / Qs[j]
            akT = akT - a / Qs[j]
        aQ[j] = aQ[j] - a * g / Qs[j]

    def undo_end(d2: float) -> None:  # v_{M-1} += d2 G_{M-1}
        g = G(M - 1)
        v[M - 1] = v[M - 1] - d2 * g
        pull_G(M - 1, g, d2 * av[M - 1])

    def undo_inner(j: int, d2: float, d4: float) -> None:  # v_j = (v_j s + d2 G_j) s
        s = xp.exp(-d4 * v[j + 1])
        g = G(j)
        v[j] = (v[j] / s - d2 * g) / s
        a = av[j]
        av[j] = a * s * s
        pull_G(j, g, a * d2 * s)
        av[j + 1] = av[j + 1] - a * (2.0 * v[j] * s + d2 * g) * d4 * s

    for w in reversed(integ._substeps):
        d = w * h
        d2, d4 = 0.5 * d, 0.25 * d
        undo_end(d2)
        for j in range(M - 2, -1, -1):
            undo_inner(j, d2, d4)
        # S <- S s0, K2 <- K2 s0^2 with s0 = exp(-d v_0)
        s0 = xp.exp(-d * v[0])
        K2 = K2 / (s0 * s0)
        log_S = log_S - d * v[0]
        a_s0 = c / s0 + 2.0 * aK2 * K2 * s0
        aK2 = aK2 * s0 * s0
        av[0] = av[0] - d * s0 * a_s0
        for j in range(M):  # x_j += d v_j
            x[j] = x[j] - d * v[j]
            av[j] = av[j] + d * ax[j]
        for j in range(M - 1):
            undo_inner(j, d2, d4)
        undo_end(d2)

    def tensor(a: Any) -> Tensor:
        return torch.from_numpy(a) if xp is np else a

    def stack(parts: list[Any]) -> Tensor:
        return tensor(xp.stack(parts, 1) if xp is np else torch.stack(parts, dim=1))

    S = torch.exp(tensor(log_S)).view(-1, 1, 1)
    P_prev = P / S
    aP_prev = aP * S + (2.0 * tensor(aK2)).view(-1, 1, 1) * P_prev / m
    # inputs v = p_xi / Q
    a_pxi_prev = stack([av[j] / Qs[j] for j in range(M)])
    a_Q = stack([aQ[j] - av[j] * v[j] / Qs[j] for j in range(M)])
    p_xi_prev = stack([v[j] * Qs[j] for j in range(M)])
    return (P_prev, stack(x), p_xi_prev, aP_prev, stack(ax), a_pxi_prev, a_Q, tensor(akT))
