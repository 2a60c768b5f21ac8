"""Learnable neural pair potential with a repulsive prior and a smooth cutoff.

Units: reduced LJ units (lengths sigma, energies epsilon).

``u(r) = [epsilon_prior (sigma_prior / r)^p + MLP(phi(r))] s(r)``

- ``phi(r)``: Gaussian radial basis (``n_basis`` centres on ``[0, r_cut]``), fed to an MLP
  with SiLU activations whose last layer starts at zero, so the untrained potential is the
  prior alone (a well-posed repulsive start for RDF matching).
- ``s(r)``: C^2 switch, 1 below ``r_on``, ``1 - 10 x^3 + 15 x^4 - 6 x^5`` with
  ``x = (r - r_on) / (r_cut - r_on)`` up to ``r_cut``, 0 beyond: energy, force and force
  derivative vanish at the cutoff without a shift.

The prior dominates at short range, where an MLP trained on RDFs has no data and could
otherwise let particles overlap.

``grid_points = K`` evaluates the MLP term on ``K`` uniform nodes of ``[0, r_cut]`` (values
and exact slopes, by autograd) at each call and interpolates it to the pair distances with
a cubic Hermite spline (C^1, error O(h^4) for node spacing h), as MD codes tabulate pair
potentials. The potential is then exactly that spline of the MLP (the prior and the switch
stay analytic), and its cost per pair is a few elementwise operations instead of an MLP
pass, which also drops the per-pair activations that backprop through a trajectory stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from controlmd._validation import check_int, check_positive
from controlmd.errors import ControlMDError
from controlmd.potentials.pair import PairPotential
from controlmd.space import Space

if TYPE_CHECKING:
    from controlmd.neighbors import NeighborList

Tensor = torch.Tensor

__all__ = ["NeuralPair", "smooth_switch"]


def smooth_switch(r: Tensor, r_on: float, r_cut: float) -> Tensor:
    """C^2 switch: 1 for ``r <= r_on``, 0 for ``r >= r_cut``, quintic in between."""
    x = torch.clamp((r - r_on) / (r_cut - r_on), 0.0, 1.0)
    return 1.0 - x**3 * (10.0 - 15.0 * x + 6.0 * x * x)


class NeuralPair(PairPotential):
    """Learnable pair potential ``u(r) = [prior(r) + MLP(r)] s(r)``.

    Args:
        space: the box.
        r_cut: cutoff (> 0; <= half the box).
        r_on: switch start (0 < r_on < r_cut; default ``0.8 r_cut``).
        hidden: MLP hidden widths.
        n_basis: number of Gaussian radial basis functions.
        sigma_prior, epsilon_prior, prior_power: repulsive prior
            ``epsilon_prior (sigma_prior / r)^prior_power`` (epsilon_prior = 0 disables it).
        learn_prior: also learn ``sigma_prior`` and ``epsilon_prior``.
        seed: initial MLP weights (``torch.Generator`` seed) for reproducibility.
        grid_points: if set (>= 2), interpolate the MLP term from that many nodes (see the
            module docstring); ``None`` evaluates the MLP at every pair distance.
        pairs, exclude, neighbor_list: pair selection.
    """

    centers: Tensor  # buffer [n_basis]: centers of the Gaussian distance basis

    def __init__(
        self,
        space: Space | None = None,
        *,
        r_cut: float = 2.5,
        r_on: float | None = None,
        hidden: Sequence[int] = (64, 64),
        n_basis: int = 32,
        sigma_prior: float = 0.9,
        epsilon_prior: float = 1.0,
        prior_power: float = 12.0,
        learn_prior: bool = False,
        seed: int = 0,
        grid_points: int | None = None,
        pairs: Tensor | Sequence[Sequence[int]] | None = None,
        exclude: Tensor | Sequence[Sequence[int]] | None = None,
        neighbor_list: NeighborList | None = None,
    ) -> None:
        super().__init__(
            space,
            r_cut=r_cut,
            shift="none",
            pairs=pairs,
            exclude=exclude,
            neighbor_list=neighbor_list,
        )
        r_on = 0.8 * r_cut if r_on is None else r_on
        if not 0 < r_on < r_cut:
            raise ControlMDError(f"r_on must satisfy 0 < r_on < r_cut = {r_cut:g}, got {r_on}")
        check_int("n_basis", n_basis)
        check_positive("sigma_prior", sigma_prior)
        check_positive("epsilon_prior", epsilon_prior, allow_zero=True)
        check_positive("prior_power", prior_power)
        for w in hidden:
            check_int("hidden width", w)
        if grid_points is not None:
            check_int("grid_points", grid_points, minimum=2)
        self.grid_points = grid_points
        self.r_on = float(r_on)
        self.r_cut_value = float(r_cut)
        self.prior_power = float(prior_power)
        self._register_params(
            {"sigma_prior": sigma_prior, "epsilon_prior": epsilon_prior},
            learnable=learn_prior,
            positive=("sigma_prior",),
        )
        self.register_buffer("centers", torch.linspace(0.0, r_cut, n_basis, dtype=torch.float64))
        self.basis_width = float(r_cut) / max(n_basis - 1, 1)
        g = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        width = n_basis
        for w in hidden:
            lin = nn.Linear(width, w, dtype=torch.float64)
            _init_linear(lin, g)
            layers += [lin, nn.SiLU()]
            width = w
        last = nn.Linear(width, 1, dtype=torch.float64)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.mlp = nn.Sequential(*layers)

    def cutoff(self, params: dict[str, Tensor], like: Tensor) -> Tensor:
        return torch.as_tensor(self.r_cut_value, dtype=like.dtype)

    def pair_energy(self, r: Tensor, **params: Tensor) -> Tensor:
        prior = params["epsilon_prior"] * (params["sigma_prior"] / r) ** self.prior_power
        learned = (
            self.mlp_term(r)
            if self.grid_points is None
            else self._interpolated_mlp_term(r, self.grid_points)
        )
        return (prior + learned) * smooth_switch(r, self.r_on, self.r_cut_value)

    def mlp_term(self, r: Tensor) -> Tensor:
        """The MLP's contribution ``MLP(phi(r))`` (energy; same shape as ``r``)."""
        dtype = self._mlp_dtype()
        phi = torch.exp(
            -0.5 * ((r.to(dtype).unsqueeze(-1) - self.centers.to(dtype)) / self.basis_width) ** 2
        )
        out: Tensor = self.mlp(phi)
        return out.squeeze(-1).to(r.dtype)

    def _mlp_dtype(self) -> torch.dtype:
        """dtype of the MLP's weights (that of its first layer's weight)."""
        return next(self.mlp.parameters()).dtype

    def _interpolated_mlp_term(self, r: Tensor, grid_points: int) -> Tensor:
        K = int(grid_points)
        h = self.r_cut_value / (K - 1)
        with torch.enable_grad():
            nodes = torch.linspace(
                0.0, self.r_cut_value, K, dtype=self._mlp_dtype()
            ).requires_grad_(True)
            values = self.mlp_term(nodes)
            (slopes,) = torch.autograd.grad(values.sum(), nodes, create_graph=True)
        values, slopes = values.to(r.dtype), slopes.to(r.dtype)
        x = torch.clamp(r / h, 0.0, K - 1.0)
        k = torch.clamp(x.detach().floor().long(), max=K - 2)
        t = x - k.to(r.dtype)
        t2, t3 = t * t, t * t * t
        return (
            (2 * t3 - 3 * t2 + 1) * values[k]
            + (t3 - 2 * t2 + t) * h * slopes[k]
            + (-2 * t3 + 3 * t2) * values[k + 1]
            + (t3 - t2) * h * slopes[k + 1]
        )


def _init_linear(layer: nn.Linear, g: torch.Generator) -> None:
    bound = 1.0 / layer.in_features**0.5
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=g)
        layer.bias.uniform_(-bound, bound, generator=g)
