"""Spatiotemporal control fields ``E(R, t) = sum_i V(r_i, t)``: one external potential felt
by every particle, varying in space and time.

Units: those of the system (reduced LJ units for the classical tasks: length sigma,
energy epsilon, time tau). Positions ``R`` are ``[B, N, d]``; energies ``[B]``.

- :class:`FieldNetwork` — the trainable ``V_theta(phi(x), t) = V_max tanh(MLP(phi, tau(t)))``
  (``max |V| <= V_max`` by construction), with position features ``phi``: Fourier features
  of fractional coordinates under periodic boundaries (the field is then periodic and
  smooth) or Cartesian coordinates (optionally relative to the centre of mass) in free
  space, and an optional one-hot species input.
- :class:`NeuralField` — the potential of a :class:`FieldNetwork` in a :class:`Space`.
- :class:`BasisField` — ``V(x, t) = sum_k c_k(t) b_k(x)`` with a fixed spatial basis
  (Gaussian wells on a grid, or Fourier modes) and coefficients from protocol channels.
- :class:`Confinement` — ``0.5 k(t) |r - c|^2`` with the minimum-image distance to the box
  centre (the hand-made compress-and-release schedules).
- :class:`RadialWave` — ``A(t) (1 - cos(2 pi (d + s(t)) / lambda)) / 2`` in the distance
  ``d`` to the box centre: a radial wave whose troughs travel inward as the phase ``s(t)``
  grows (a conveyor that gathers particles with a bounded ``|V| <= A``).
- :func:`mean_square_force` — ``mean_i |F_i|^2``, the integrand of the field cost
  ``integral mean_i |F_i(t)|^2 dt``.

Forces come from autograd (:meth:`Potential.energy_and_forces`); tests compare them with
float64 finite differences of the energy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from controlmd._validation import check_choice, check_int, check_positive
from controlmd.errors import ControlMDError
from controlmd.potentials.base import Potential
from controlmd.potentials.external import _control_at
from controlmd.space import Space

if TYPE_CHECKING:
    from controlmd.protocols import Protocol

Tensor = torch.Tensor
Envelope = Callable[[Tensor], Tensor]

__all__ = [
    "BASIS_KINDS",
    "FIELD_FEATURES",
    "BasisField",
    "Confinement",
    "FieldNetwork",
    "NeuralField",
    "RadialWave",
    "mean_square_force",
]

FIELD_FEATURES = ("fourier", "cartesian")
BASIS_KINDS = ("gaussian", "fourier")
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
}


def _wave_vectors(dim: int, n_modes: int) -> Tensor:
    """Integer wave vectors ``m`` with ``0 < max|m_a| <= n_modes``, one of each ``+-m`` pair
    (first non-zero component positive): ``[((2M + 1)^d - 1) / 2, d]``."""
    out = []
    for m in itertools.product(range(-n_modes, n_modes + 1), repeat=dim):
        first = next((c for c in m if c != 0), 0)
        if first > 0:
            out.append(m)
    return torch.tensor(out, dtype=torch.float64)


def _time_features(s: Tensor, n_frequencies: int) -> Tensor:
    """``[s, cos(pi j s), sin(pi j s)]_{j=1..F}`` of the scaled time ``s = t / T`` (0-d)
    -> ``[1 + 2F]``."""
    j = torch.arange(1, n_frequencies + 1, dtype=s.dtype, device=s.device)
    return torch.cat([s.reshape(1), torch.cos(math.pi * s * j), torch.sin(math.pi * s * j)])


def _check_dim(name: str, R: Tensor, dim: int) -> None:
    if R.ndim != 3 or R.shape[-1] != dim:
        raise ControlMDError(
            f"{name} is built for dim = {dim} but the positions have shape {tuple(R.shape)} "
            f"(expected [B, N, {dim}])"
        )


class FieldNetwork(nn.Module):
    """``V_theta(phi, t) = V_max tanh(MLP(x) + W x)``, ``x = [phi, tau(t), onehot(species)]``,
    per particle.

    The output layer and the linear readout ``W`` start at zero, so a fresh network is no
    field at all (``V = 0``); the linear path makes a single Fourier mode (a smooth well)
    directly representable, which conditions the first gradient steps.

    :param dim: spatial dimension ``d`` of the system.
    :param t_final: horizon ``T``; time features use ``s = t / T``.
    :param v_max: amplitude bound ``V_max`` (> 0), energy units: ``|V| <= V_max``.
    :param features: ``"fourier"`` (periodic box: ``cos, sin(2 pi m . x / L)`` for integer
        wave vectors ``0 < max|m_a| <= n_modes``) or ``"cartesian"`` (free space:
        ``x / length_scale``, optionally relative to the centre of mass).
    :param n_modes: highest Fourier mode ``M`` (>= 1) per axis.
    :param length_scale: length unit of Cartesian features (> 0).
    :param com_relative: Cartesian features relative to each replica's centre of mass.
    :param hidden: hidden layer widths.
    :param n_time_frequencies: Fourier time features ``F`` (>= 0).
    :param n_species: particle species (>= 1); more than one adds a one-hot input.
    :param activation: ``tanh``, ``silu`` or ``gelu``.
    """

    wave_vectors: Tensor  # buffer [M, d]

    def __init__(
        self,
        *,
        dim: int,
        t_final: float,
        v_max: float,
        features: str = "fourier",
        n_modes: int = 2,
        length_scale: float = 1.0,
        com_relative: bool = False,
        hidden: Sequence[int] = (32, 32),
        n_time_frequencies: int = 4,
        n_species: int = 1,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        check_int("field dim", dim)
        check_positive("t_final", t_final)
        check_positive("V_max", v_max)
        check_choice("field features", features, FIELD_FEATURES)
        check_int("field n_modes", n_modes)
        check_positive("field length_scale", length_scale)
        check_int("field n_time_frequencies", n_time_frequencies, minimum=0)
        check_int("field n_species", n_species)
        check_choice("field activation", activation, list(_ACTIVATIONS))
        self.dim = dim
        self.t_final = float(t_final)
        self.v_max = float(v_max)
        self.features = features
        self.length_scale = float(length_scale)
        self.com_relative = bool(com_relative)
        self.n_time_frequencies = n_time_frequencies
        self.n_species = n_species
        self.register_buffer("wave_vectors", _wave_vectors(dim, n_modes), persistent=False)
        n_pos = 2 * self.wave_vectors.shape[0] if features == "fourier" else dim
        n_inputs = n_pos + 1 + 2 * n_time_frequencies + (n_species if n_species > 1 else 0)
        n_in = n_inputs
        layers: list[nn.Module] = []
        for width in hidden:
            check_int("field hidden width", width)
            layers += [nn.Linear(n_in, width, dtype=torch.float64), _ACTIVATIONS[activation]()]
            n_in = width
        last = nn.Linear(n_in, 1, dtype=torch.float64)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.skip = nn.Linear(n_inputs, 1, bias=False, dtype=torch.float64)
        nn.init.zeros_(self.skip.weight)

    def position_features(self, R: Tensor, space: Space) -> Tensor:
        """``phi(R)``: ``[B, N, d]`` -> ``[B, N, n_features]`` in the network's dtype."""
        _check_dim("the field", R, self.dim)
        X = R.to(self.wave_vectors.dtype)
        if self.features == "fourier":
            if space.box is None:
                raise ControlMDError(
                    "field features = 'fourier' need a periodic box; use features = 'cartesian' "
                    "in free space"
                )
            phase = 2.0 * math.pi * (X / space.box.to(X)) @ self.wave_vectors.T
            return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)
        if space.box is not None:
            raise ControlMDError(
                "field features = 'cartesian' are not periodic; use features = 'fourier' in a "
                "periodic box"
            )
        if self.com_relative:
            X = X - X.mean(dim=1, keepdim=True)
        return X / self.length_scale

    def forward(self, phi: Tensor, t: Tensor | float, species: Tensor | None = None) -> Tensor:
        """``V`` at features ``phi`` ``[..., n_features]`` and time ``t`` (0-d) -> ``[...]``.

        :param species: integer species ``[N]`` (or broadcastable to ``phi[..., 0]``),
            needed when ``n_species > 1``.
        """
        s = torch.as_tensor(t, dtype=phi.dtype, device=phi.device) / self.t_final
        tau = _time_features(s, self.n_time_frequencies).expand(*phi.shape[:-1], -1)
        parts = [phi, tau]
        if self.n_species > 1:
            if species is None:
                raise ControlMDError(
                    f"the field has n_species = {self.n_species}: pass the particle species"
                )
            onehot = nn.functional.one_hot(species.long(), self.n_species).to(phi)
            parts.append(onehot.expand(*phi.shape[:-1], -1))
        x = torch.cat(parts, dim=-1)
        return self.v_max * torch.tanh((self.net(x) + self.skip(x))[..., 0])


class NeuralField(Potential):
    """``E(R, t) = envelope(t) sum_i V_theta(phi(r_i), t)`` for a :class:`FieldNetwork`.

    :param network: the field ``V_theta`` (its parameters are trained where it lives, e.g.
        in a ``neural_field`` protocol).
    :param space: the box (periodic for Fourier features, free for Cartesian ones).
    :param species: integer species of each particle ``[N]`` (a physical kind, never a
        particle's index); required when the network has ``n_species > 1``.
    :param envelope: ``t -> [0, 1]`` multiplying the field (a release window), or ``None``.
    """

    species: Tensor | None  # buffer [N] when given

    def __init__(
        self,
        network: FieldNetwork,
        space: Space,
        *,
        species: Sequence[int] | Tensor | None = None,
        envelope: Envelope | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(network, FieldNetwork):
            raise ControlMDError(f"network must be a FieldNetwork, got {type(network).__name__}")
        self.network = network
        self.space = space
        if species is not None:
            sp = torch.as_tensor(species)
            if sp.ndim != 1 or sp.is_floating_point():
                raise ControlMDError(f"species must be integers [N], got {sp.tolist()}")
            if bool((sp < 0).any()) or bool((sp >= network.n_species).any()):
                raise ControlMDError(
                    f"species must lie in [0, n_species = {network.n_species}), got {sp.tolist()}"
                )
            self.register_buffer("species", sp.long(), persistent=False)
        else:
            if network.n_species > 1:
                raise ControlMDError(
                    f"the field network has n_species = {network.n_species}: give species [N]"
                )
            self.species = None
        self.envelope = envelope

    def value(self, R: Tensor, t: Tensor | float) -> Tensor:
        """``envelope(t) V(r_i, t)`` of each particle ``[B, N]`` in ``R``'s dtype."""
        if self.species is not None and self.species.shape[0] != R.shape[1]:
            raise ControlMDError(
                f"species has {self.species.shape[0]} entries for N = {R.shape[1]} particles"
            )
        V: Tensor = self.network(self.network.position_features(R, self.space), t, self.species)
        if self.envelope is not None:
            V = V * torch.as_tensor(self.envelope(torch.as_tensor(t, dtype=torch.float64))).to(V)
        return V.to(R.dtype)

    def energy(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        if t is None:
            raise ControlMDError("NeuralField is time-dependent: pass the time t to energy(R, t)")
        return self.value(R, t).sum(dim=-1)


class BasisField(Potential):
    """``E(R, t) = sum_i sum_k c_k(t) b_k(r_i)``: a fixed spatial basis, coefficients from
    protocol channels ``channel .. channel + K - 1``.

    Bases (periodic box only):

    - ``"gaussian"``: ``b_k(x) = sum_images exp(-|x - x_k|^2 / (2 w^2))`` with centres
      ``x_k`` on an ``n_grid^d`` grid at ``(j + 1/2) L / n_grid`` and width ``w <= L/3``
      (nearest images summed, so ``b_k`` is smooth and periodic); ``c_k < 0`` is a well.
    - ``"fourier"``: ``cos(2 pi m . x / L)``, ``sin(2 pi m . x / L)`` for integer wave
      vectors ``0 < max|m_a| <= n_modes`` (one of each ``+-m``).

    :param space: the periodic box.
    :param protocol: the control (``[k]`` or per replica ``[B, k]``).
    :param basis: ``"gaussian"`` or ``"fourier"``.
    :param n_grid: wells per axis (gaussian).
    :param width: well width ``w`` (gaussian), length units.
    :param n_modes: highest mode per axis (fourier).
    :param channel: first protocol channel of the coefficients.
    """

    # Buffers: centres [K, d] and images [3^d, d] (gaussian) or wave_vectors [M, d] (fourier).
    centres: Tensor
    images: Tensor
    wave_vectors: Tensor

    def __init__(
        self,
        space: Space,
        protocol: Protocol | Callable[[Tensor], Tensor],
        *,
        basis: str = "gaussian",
        n_grid: int = 3,
        width: float = 1.0,
        n_modes: int = 1,
        channel: int = 0,
    ) -> None:
        super().__init__()
        check_choice("basis", basis, BASIS_KINDS)
        check_int("channel", channel, minimum=0)
        if space.box is None:
            raise ControlMDError(f"basis = {basis!r} needs a periodic box; the space is free")
        box = space.box
        self.space = space
        self.protocol = protocol
        self.basis = basis
        self.channel = channel
        d = box.shape[0]
        if basis == "gaussian":
            check_int("basis n_grid", n_grid)
            check_positive("basis width", width)
            if width > float(box.min()) / 3.0:
                raise ControlMDError(
                    f"basis width = {width:g} does not fit the box: it must be <= L/3 = "
                    f"{float(box.min()) / 3.0:g} (wider wells overlap their own periodic images)"
                )
            grid = [
                (torch.arange(n_grid, dtype=torch.float64) + 0.5) * box[a] / n_grid
                for a in range(d)
            ]
            centres = torch.stack(torch.meshgrid(*grid, indexing="ij"), dim=-1).reshape(-1, d)
            images = torch.tensor(
                list(itertools.product((-1, 0, 1), repeat=d)), dtype=torch.float64
            )
            self.register_buffer("centres", centres, persistent=False)
            self.register_buffer("images", images * box, persistent=False)
            self.width = float(width)
            self.n_basis = centres.shape[0]
        else:
            check_int("basis n_modes", n_modes)
            self.register_buffer("wave_vectors", _wave_vectors(d, n_modes), persistent=False)
            self.n_basis = 2 * self.wave_vectors.shape[0]
        self.dim = d

    def basis_values(self, R: Tensor) -> Tensor:
        """``b_k(r_i)``: ``[B, N, d]`` -> ``[B, N, K]``."""
        _check_dim("the basis field", R, self.dim)
        if self.basis == "gaussian":
            dR = self.space.displacement(R.unsqueeze(-2), self.centres.to(R))  # [B, N, K, d]
            dR = dR.unsqueeze(-2) + self.images.to(R)  # [B, N, K, 3^d, d]
            r2 = (dR * dR).sum(-1)
            return torch.exp(-r2 / (2.0 * self.width**2)).sum(-1)
        box = self.space.box
        if box is None:
            raise ControlMDError("basis = 'fourier' needs a periodic box; the space is free")
        phase = 2.0 * math.pi * (R / box.to(R)) @ self.wave_vectors.to(R).T
        return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)

    def coefficients(self, t: Tensor | float | None, like: Tensor) -> Tensor:
        """``c(t)`` broadcastable against ``[B, N, K]``: ``[1, 1, K]`` or ``[B, 1, K]``."""
        u = _control_at(self.protocol, t, like, "BasisField")
        k = u.shape[-1] if u.ndim else 1
        if k < self.channel + self.n_basis:
            raise ControlMDError(
                f"the basis field needs protocol channels {self.channel}..{self.channel + self.n_basis - 1} "
                f"({self.n_basis} coefficients), but the protocol has {k}"
            )
        c = u[..., self.channel : self.channel + self.n_basis]
        return c.reshape(-1, 1, self.n_basis)

    def value(self, R: Tensor, t: Tensor | float | None) -> Tensor:
        """``V(r_i, t)`` of each particle ``[B, N]``."""
        return (self.basis_values(R) * self.coefficients(t, R)).sum(-1)

    def energy(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        return self.value(R, t).sum(dim=-1)

    def max_abs_sum(self, n: int = 64) -> float:
        """``max_x sum_k |b_k(x)|`` on an ``n^d`` grid of the box: with coefficients bounded
        by ``|c_k| <= a``, ``max |V| <= a`` times this."""
        assert self.space.box is not None
        axes = [
            torch.arange(n, dtype=torch.float64) * self.space.box[a] / n for a in range(self.dim)
        ]
        X = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(1, -1, self.dim)
        return float(self.basis_values(X).abs().sum(-1).max())


class _CentredField(Potential):
    """A field about a centre ``c`` driven by protocol channels from ``channel`` on: the
    shared state of :class:`Confinement` and :class:`RadialWave` and the minimum-image
    offsets ``r_i - c``."""

    center: Tensor  # buffer [d] (or [1] in free space by default)

    def __init__(
        self,
        space: Space,
        protocol: Protocol | Callable[[Tensor], Tensor],
        *,
        channel: int = 0,
        center: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        check_int("channel", channel, minimum=0)
        self.space = space
        self.protocol = protocol
        self.channel = channel
        if center is None:
            c = space.box / 2.0 if space.box is not None else torch.zeros(1, dtype=torch.float64)
        else:
            c = torch.as_tensor(center, dtype=torch.float64)
            if c.ndim != 1 or not bool(torch.isfinite(c).all()):
                raise ControlMDError(f"center must be a finite [d] vector, got {c.tolist()}")
        self.register_buffer("center", c, persistent=False)

    def offsets(self, R: Tensor) -> Tensor:
        """``r_i - c`` (minimum image) ``[B, N, d]``."""
        if self.center.shape[0] not in (1, R.shape[-1]):
            raise ControlMDError(
                f"center has {self.center.shape[0]} components, but the positions have d = {R.shape[-1]}"
            )
        return self.space.displacement(R, self.center.to(R))


class Confinement(_CentredField):
    """``E(R, t) = 0.5 k(t) sum_i |r_i - c|^2``, ``r_i - c`` the minimum image in a periodic
    box (so the field is a periodic array of wells, with a cusp where ``|r_a - c_a| = L_a/2``).

    :param space: the box.
    :param protocol: the control; channel ``channel`` is the stiffness ``k`` (energy /
        length^2).
    :param channel: which protocol channel is ``k``.
    :param center: ``c`` ``[d]`` (default: the box centre ``L/2``; the origin in free space).
    """

    def stiffness_at(self, t: Tensor | float | None, like: Tensor) -> Tensor:
        """``k(t)``: ``[]`` or ``[B]``."""
        u = _control_at(self.protocol, t, like, "Confinement")
        k = u.shape[-1] if u.ndim else 1
        if k <= self.channel:
            raise ControlMDError(f"channel = {self.channel} but the protocol has {k} channel(s)")
        return u[..., self.channel]

    def energy(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        dR = self.offsets(R)
        return 0.5 * self.stiffness_at(t, R) * (dR * dR).sum(dim=(-1, -2))


class RadialWave(_CentredField):
    """``E(R, t) = sum_i A(t) g(d_i) (1 - cos(2 pi (d_i + s(t)) / lambda)) / 2`` with ``d_i``
    the distance of particle ``i`` to the centre ``c`` (minimum image in a periodic box).

    The troughs sit at ``d = m lambda - s(t)`` (integer ``m``): as the phase ``s`` grows
    they travel inward at speed ``ds/dt``, carrying particles with them while the force
    ``<= pi A / lambda`` outpaces diffusion. ``g`` is a smoothstep from 0 at ``d = r_in``
    to 1 at ``d = r_in + lambda / 2``, so the troughs fade out around a core of radius
    ``r_in`` where the gathered particles are left alone. ``0 <= V <= A`` everywhere.

    :param space: the box (or free space, then ``c`` is the origin).
    :param protocol: the control; channel ``channel`` is the amplitude ``A`` (energy) and
        ``channel + 1`` the phase ``s`` (length).
    :param wavelength: ``lambda`` (length).
    :param inner_radius: ``r_in`` (length), ``>= 0``.
    :param channel: the amplitude's protocol channel.
    :param center: ``c`` ``[d]`` (default: the box centre; the origin in free space).
    """

    def __init__(
        self,
        space: Space,
        protocol: Protocol | Callable[[Tensor], Tensor],
        *,
        wavelength: float,
        inner_radius: float,
        channel: int = 0,
        center: Sequence[float] | Tensor | None = None,
    ) -> None:
        check_positive("wave wavelength", wavelength)
        if not (math.isfinite(inner_radius) and inner_radius >= 0):
            raise ControlMDError(f"wave inner_radius must be >= 0, got {inner_radius!r}")
        super().__init__(space, protocol, channel=channel, center=center)
        self.wavelength = float(wavelength)
        self.inner_radius = float(inner_radius)

    def amplitude_and_phase(self, t: Tensor | float | None, like: Tensor) -> tuple[Tensor, Tensor]:
        """``A(t)``, ``s(t)``: each ``[]`` or ``[B]``."""
        u = _control_at(self.protocol, t, like, "RadialWave")
        k = u.shape[-1] if u.ndim else 1
        if k < self.channel + 2:
            raise ControlMDError(
                f"the radial wave needs protocol channels {self.channel} (amplitude) and "
                f"{self.channel + 1} (phase), but the protocol has {k}"
            )
        return u[..., self.channel], u[..., self.channel + 1]

    def value(self, R: Tensor, t: Tensor | float | None) -> Tensor:
        """``V(r_i, t)`` of each particle ``[B, N]``."""
        dR = self.offsets(R)
        # The offset keeps the gradient finite at d = 0, where g (hence V) is flat anyway.
        d = torch.sqrt((dR * dR).sum(-1) + 1e-12)
        A, s = self.amplitude_and_phase(t, R)
        if A.ndim:
            A, s = A.unsqueeze(-1), s.unsqueeze(-1)
        x = ((d - self.inner_radius) / (0.5 * self.wavelength)).clamp(0.0, 1.0)
        g = x * x * (3.0 - 2.0 * x)
        return A * g * 0.5 * (1.0 - torch.cos(2.0 * math.pi * (d + s) / self.wavelength))

    def energy(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        return self.value(R, t).sum(dim=-1)


def mean_square_force(potential: Potential, R: Tensor, t: Tensor | float) -> Tensor:
    """``mean_i |F_i|^2`` of ``potential`` at ``(R, t)``: ``[B]`` (force units squared), the
    integrand of the field cost ``integral_0^T mean_i |F_i(t)|^2 dt``. Differentiable (the
    force graph is kept when gradients are enabled)."""
    _, F = potential.energy_and_forces(R, t, create_graph=torch.is_grad_enabled())
    return (F * F).sum(-1).mean(-1)
