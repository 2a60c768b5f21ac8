"""External and control terms ``H_ctrl(q, t; theta)``: where a protocol enters the Hamiltonian.

Units: reduced LJ units (lengths sigma, energies epsilon, forces epsilon/sigma) unless the
task states otherwise.

A control value ``u = protocol(t)`` has shape ``[k]`` (the same for every replica) or
``[B, k]`` (one value per replica, e.g. a :class:`~controlmd.protocols.HeldControl` set by
the gymnasium env). Every term here accepts both.

- :class:`ExternalField` — the generic hook: ``E = coupling(R, u(t))``.
- :class:`HarmonicTrap` — ``E = k/2 sum_i |r_i - c(t)|^2`` with a fixed or protocol-driven
  centre (and stiffness).
- :class:`ConstantForce` — optical-tweezer pulling: ``E = -sum_i w_i f(t) . r_i``.
- :class:`ScaledPotential` — ``E = u_c(t) E_base``, e.g. an interaction strength epsilon(t).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from controlmd._validation import check_int, check_positive
from controlmd.errors import ControlMDError
from controlmd.potentials.base import Potential
from controlmd.potentials.control_memo import memoized_control
from controlmd.space import Space, free

if TYPE_CHECKING:
    from controlmd.protocols import Protocol

Tensor = torch.Tensor
Coupling = Callable[[Tensor, Tensor], Tensor]

__all__ = ["ConstantForce", "ExternalField", "HarmonicTrap", "ScaledPotential"]


def _control_at(
    protocol: Protocol | nn.Module | Callable[[Tensor], Tensor],
    t: Tensor | float | None,
    like: Tensor,
    name: str,
) -> Tensor:
    """``protocol(t)`` as ``like``'s dtype: ``[k]`` or ``[B, k]``. Without a graph, a read
    at a time read just before may return that read's tensor (same bits; see
    :mod:`controlmd.potentials.control_memo`): read-only."""
    if t is None:
        raise ControlMDError(
            f"{name} is time-dependent: pass the time t to energy(R, t) / energy_and_forces(R, t)"
        )
    time = t

    def read() -> Tensor:  # as_tensor / .to return a tensor that needs no change itself
        tt = time
        if not (isinstance(tt, Tensor) and tt.dtype == torch.float64 and tt.device == like.device):
            tt = torch.as_tensor(tt, dtype=torch.float64, device=like.device)
        u = protocol(tt)
        u = u if isinstance(u, Tensor) else torch.as_tensor(u)
        if u.dtype != like.dtype or u.device != like.device:
            u = u.to(dtype=like.dtype, device=like.device)
        return u

    return memoized_control(protocol, time, like, read)


def _particle_index(particles: Sequence[int] | Tensor | None) -> Tensor | None:
    if particles is None:
        return None
    p = torch.as_tensor(particles)
    if p.ndim == 0:
        p = p.reshape(1)
    if p.ndim != 1 or p.numel() == 0:
        raise ControlMDError(
            f"particles must be a non-empty 1-D index list, got shape {tuple(p.shape)}"
        )
    if p.is_floating_point() or p.dtype == torch.bool:
        raise ControlMDError(f"particles must hold integer indices, got dtype {p.dtype}")
    return p.long()


def _select(R: Tensor, index: Tensor | None, bounds: tuple[int, int], name: str) -> Tensor:
    """``R[:, index]``; ``bounds`` = (min, max) of the index, cached at construction."""
    if index is None:
        return R
    n = R.shape[1]
    if bounds[1] >= n or bounds[0] < -n:
        raise ControlMDError(
            f"{name} selects particle {bounds[1]} but R has only N = {n} particles"
        )
    return R[:, index]


def _sum_squares(dR: Tensor) -> Tensor:
    """``sum dR^2`` over the last two dimensions of ``dR`` ``[B, n, d]`` -> ``[B]``. One
    particle in 1-D (``n d = 1``) takes no reduction (a reduction over [B, 1, 1] costs
    several elementwise operations): the sum of one square is that square, bit for bit."""
    sq = dR * dR
    if sq.shape[-1] * sq.shape[-2] == 1:
        return sq.reshape(sq.shape[:-2])
    return sq.sum(dim=(-1, -2))


def _bounds(index: Tensor | None) -> tuple[int, int]:
    return (0, -1) if index is None else (int(index.min()), int(index.max()))


class ExternalField(Potential):
    """Generic time-dependent control term ``E_b = coupling(R, u(t))``.

    Args:
        coupling: callable (function or ``nn.Module``) ``(R [B, N, d], u [k] or [B, k]) -> [B]``.
            An ``nn.Module`` coupling is registered, so its parameters are trained too.
        protocol: the control ``u(t)`` (a :class:`~controlmd.protocols.Protocol`, or any
            callable of a 0-d time tensor).

    Example:
        >>> import torch
        >>> from controlmd.protocols import PiecewiseConstant
        >>> u = PiecewiseConstant(dim=1, t_final=1.0, n_pieces=2, init=[0.5, 2.0])
        >>> field = ExternalField(lambda R, u: -u[..., 0] * R[..., 0].sum(-1), u)
        >>> field.energy(torch.ones(1, 2, 3, dtype=torch.float64), 0.75)
        tensor([-4.], dtype=torch.float64, grad_fn=<MulBackward0>)
    """

    def __init__(self, coupling: Coupling, protocol: Protocol | Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        if not callable(coupling):
            raise ControlMDError(f"coupling must be callable (R, u) -> [B], got {type(coupling)}")
        if not callable(protocol):
            raise ControlMDError(
                f"protocol must be a Protocol or callable of t, got {type(protocol)}"
            )
        self.coupling = coupling
        self.protocol = protocol

    def energy(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        u = _control_at(self.protocol, t, R, "ExternalField")
        E = self.coupling(R, u)
        if E.shape != (R.shape[0],):
            raise ControlMDError(
                f"coupling must return one energy per replica, shape [{R.shape[0]}], got {tuple(E.shape)}"
            )
        return E


class HarmonicTrap(Potential):
    """Harmonic trap ``E_b = k(t)/2 sum_{i in particles} |r_i - c(t)|^2``.

    The centre ``c`` is fixed (scalar or ``[d]``) or a protocol whose output has ``d``
    channels (``[d]`` or per replica ``[B, d]``); the stiffness likewise is fixed (scalar
    > 0) or a 1-channel protocol. In a periodic box the distance is the minimum image.
    The dynamics use :meth:`center_at` and :meth:`stiffness_at` for the exact
    Ornstein–Uhlenbeck step.

    Args:
        stiffness: ``k`` (> 0) in energy / length^2, or a Protocol.
        center: ``c`` in length units, or a Protocol.
        particles: indices of trapped particles (default: all).
        space: the box (default: free space).
    """

    stiffness: Tensor | Protocol  # buffer [] (energy / length^2) or a 1-channel protocol
    center: Tensor | Protocol  # buffer [] or [d] (length) or a d-channel protocol
    particles: Tensor | None  # buffer [n] of trapped indices; None = all

    def __init__(
        self,
        stiffness: float | Tensor | Protocol,
        center: float | Sequence[float] | Tensor | Protocol = 0.0,
        particles: Sequence[int] | Tensor | None = None,
        *,
        space: Space | None = None,
    ) -> None:
        super().__init__()
        self.space = space if space is not None else free()
        if isinstance(stiffness, nn.Module):
            self.stiffness = stiffness
        else:
            k = torch.as_tensor(stiffness, dtype=torch.float64)
            if k.ndim != 0:
                raise ControlMDError(
                    f"stiffness must be a scalar or a Protocol, got shape {tuple(k.shape)}"
                )
            check_positive("stiffness", k)
            self.register_buffer("stiffness", k)
        if isinstance(center, nn.Module):
            self.center = center
        else:
            c = torch.as_tensor(center, dtype=torch.float64)
            if c.ndim > 1:
                raise ControlMDError(f"center must be a scalar or [d], got shape {tuple(c.shape)}")
            if not bool(torch.isfinite(c).all()):
                raise ControlMDError(f"center must be finite, got {c.tolist()}")
            self.register_buffer("center", c)
        idx = _particle_index(particles)
        self.register_buffer("particles", idx, persistent=False)
        self._bounds = _bounds(idx)

    @property
    def time_dependent(self) -> bool:
        return isinstance(self.center, nn.Module) or isinstance(self.stiffness, nn.Module)

    def center_at(self, t: Tensor | float | None, like: Tensor) -> Tensor:
        """Trap centre broadcastable against ``R`` ``[B, N, d]``: ``[1, 1, d]`` or ``[B, 1, d]``."""
        d = like.shape[-1]
        if isinstance(self.center, nn.Module):
            c = _control_at(self.center, t, like, "HarmonicTrap.center")
            if c.shape[-1] != d:
                raise ControlMDError(
                    f"center protocol has {c.shape[-1]} channels, expected d = {d} (one per axis)"
                )
        else:
            c = self.center.to(like.dtype)
            if c.ndim == 1 and c.shape[0] != d:
                raise ControlMDError(f"center has {c.shape[0]} components, expected d = {d}")
            c = c.expand(d)
        return c.reshape(-1, 1, d)

    def stiffness_at(self, t: Tensor | float | None, like: Tensor) -> Tensor:
        """Stiffness as a tensor broadcastable against ``[B]``: ``[]`` or ``[B]``."""
        if isinstance(self.stiffness, nn.Module):
            k = _control_at(self.stiffness, t, like, "HarmonicTrap.stiffness")
            if k.shape[-1] != 1:
                raise ControlMDError(f"stiffness protocol must have 1 channel, got {k.shape[-1]}")
            return k[..., 0]
        k = self.stiffness
        return k if k.dtype == like.dtype else k.to(like.dtype)

    def energy(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        c = self.center_at(t, R)
        return self.energy_at(R, self.stiffness_at(t, R), c)

    def energy_at(self, R: Tensor, stiffness: Tensor, center: Tensor) -> Tensor:
        """Energy ``[B]`` of ``R`` ``[B, N, d]`` under given controls: ``stiffness`` from
        :meth:`stiffness_at` and ``center`` from :meth:`center_at` (so that a step that
        needs the energy several times at one time evaluates the protocol once)."""
        X = _select(R, self.particles, self._bounds, "particles")
        dR = self.space.displacement(X, center)
        return 0.5 * stiffness * _sum_squares(dR)

    def energy_and_forces(
        self, R: Tensor, t: Tensor | float | None = None, *, create_graph: bool | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(E [B], F [B, N, d])``. Without a graph of the forces (``create_graph`` false,
        or ``None`` with gradients disabled), all particles trapped in free space: the closed
        form ``F = -(g + g)``, ``g = (k/2) (x - c)``, the very operations autograd performs on
        :meth:`energy` (same bits, no backward pass). Otherwise autograd."""
        graph = torch.is_grad_enabled() if create_graph is None else create_graph
        if graph or self.particles is not None or not self.space.is_free:
            return super().energy_and_forces(R, t, create_graph=create_graph)
        half_k = 0.5 * self.stiffness_at(t, R)
        dR = R - self.center_at(t, R)
        E = half_k * _sum_squares(dR)
        g = (half_k.view(-1, 1, 1) if half_k.ndim == 1 else half_k) * dR
        return E.detach(), (g + g).neg_().detach()


class ConstantForce(Potential):
    """Force ``w_i f(t)`` on chosen beads (optical tweezers): ``E_b = -sum_i w_i f(t) . r_i``.

    ``f`` is a fixed vector ``[d]``, or a protocol with ``d`` channels, or with one channel
    times a fixed ``direction`` ``[d]``. Weights ``w`` (default 1) let one channel pull two
    beads apart (``particles=[0, N-1]``, ``weights=[-1, 1]``). The energy uses the
    positions as given: use it in free space or with unwrapped coordinates (wrapping makes
    the energy jump by ``f . L``; the forces are unaffected).

    Args:
        force: ``f`` (force units), or a Protocol (any module mapping ``t`` to ``u(t)``).
        particles: indices of the pulled beads (default: all).
        weights: per-bead multipliers ``[n_particles]`` (default: ones).
        direction: unit vector ``[d]`` for a 1-channel force protocol (normalized here).
    """

    force: Tensor | nn.Module  # buffer [] or [d] (force units), or a protocol-like module of t
    particles: Tensor | None  # buffer [n] of pulled indices; None = all
    weights: Tensor | None  # buffer [n]; None = ones
    direction: Tensor | None  # buffer [d], unit norm

    def __init__(
        self,
        force: float | Sequence[float] | Tensor | Protocol | nn.Module,
        particles: Sequence[int] | Tensor | None = None,
        *,
        weights: Sequence[float] | Tensor | None = None,
        direction: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        if isinstance(force, nn.Module):
            self.force = force
        else:
            f = torch.as_tensor(force, dtype=torch.float64)
            if f.ndim > 1 or not bool(torch.isfinite(f).all()):
                raise ControlMDError(
                    f"force must be a finite scalar or [d] vector, got {f.tolist()}"
                )
            self.register_buffer("force", f)
        idx = _particle_index(particles)
        self.register_buffer("particles", idx, persistent=False)
        self._bounds = _bounds(idx)
        if weights is not None:
            w = torch.as_tensor(weights, dtype=torch.float64)
            n = None if idx is None else idx.numel()
            if w.ndim != 1 or (n is not None and w.numel() != n):
                raise ControlMDError(
                    f"weights must have shape [{n if n is not None else 'N'}] (one per pulled bead), "
                    f"got {tuple(w.shape)}"
                )
            self.register_buffer("weights", w)
        else:
            self.weights = None
        if direction is not None:
            v = torch.as_tensor(direction, dtype=torch.float64)
            norm = torch.linalg.vector_norm(v)
            if v.ndim != 1 or not bool(torch.isfinite(v).all()) or float(norm) == 0.0:
                raise ControlMDError(
                    f"direction must be a finite non-zero [d] vector, got {v.tolist()}"
                )
            self.register_buffer("direction", v / norm)
        else:
            self.direction = None

    def force_at(self, t: Tensor | float | None, like: Tensor) -> Tensor:
        """Force vector broadcastable against ``R``: ``[1, 1, d]`` or ``[B, 1, d]``."""
        d = like.shape[-1]
        if isinstance(self.force, nn.Module):
            f = _control_at(self.force, t, like, "ConstantForce.force")
        else:
            f = self.force.to(like.dtype)
        if self.direction is not None:
            if f.ndim > 0 and f.shape[-1] != 1:
                raise ControlMDError(
                    f"with a direction the force must have 1 channel, got {f.shape[-1]}"
                )
            if self.direction.shape[0] != d:
                raise ControlMDError(
                    f"direction has {self.direction.shape[0]} components, expected d = {d}"
                )
            f = f.reshape(-1, 1) * self.direction.to(like.dtype)
        elif f.ndim == 0 or f.shape[-1] != d:
            raise ControlMDError(
                f"force must have d = {d} components (or 1 channel with a direction), got shape "
                f"{tuple(f.shape)}"
            )
        return f.reshape(-1, 1, d)

    def energy(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        X = _select(R, self.particles, self._bounds, "particles")
        e = (X * self.force_at(t, R)).sum(dim=-1)  # [B, n]
        if self.weights is not None:
            if self.weights.shape[0] != e.shape[1]:
                raise ControlMDError(
                    f"weights has {self.weights.shape[0]} entries for {e.shape[1]} beads"
                )
            e = e * self.weights.to(R.dtype)
        return -e.sum(dim=-1)


class ScaledPotential(Potential):
    """``E = u_c(t) E_base(R)``: a protocol channel scales a whole term.

    E.g. a time-dependent interaction strength epsilon(t) = ``u_c(t)`` times a term built
    with epsilon = 1. With a per-replica control ``[B, k]`` each replica gets its own scale.

    Args:
        base: the term to scale.
        protocol: the control (Protocol or callable of t).
        channel: which component of ``u`` scales the term (default 0).
    """

    def __init__(
        self, base: Potential, protocol: Protocol | Callable[[Tensor], Tensor], channel: int = 0
    ) -> None:
        super().__init__()
        if not isinstance(base, Potential):
            raise ControlMDError(f"base must be a Potential, got {type(base)}")
        check_int("channel", channel, minimum=0)
        self.base = base
        self.protocol = protocol
        self.channel = channel

    def scale_at(self, t: Tensor | float | None, like: Tensor) -> Tensor:
        """``u_c(t)``: ``[]`` or ``[B]``."""
        u = _control_at(self.protocol, t, like, "ScaledPotential")
        if u.ndim == 0 or u.shape[-1] <= self.channel:
            raise ControlMDError(
                f"channel = {self.channel} but the protocol has {1 if u.ndim == 0 else u.shape[-1]} channel(s)"
            )
        return u[..., self.channel]

    def energy(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        return self.scale_at(t, R) * self.base.energy(R, t)

    def virial(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        """Scaled virial of the base term (when the base has one)."""
        scale = self.scale_at(t, R)
        base_virial = getattr(self.base, "virial", None)
        if not callable(base_virial):
            raise ControlMDError(
                f"{type(self.base).__name__} has no virial: pressure is defined for pair and "
                "bonded terms only"
            )
        W: Tensor = base_virial(R, t)
        return scale * W
