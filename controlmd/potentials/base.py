"""The energy contract shared by every term of a Hamiltonian.

A :class:`Potential` is an ``nn.Module`` with ``energy(R, t) -> [B]``: positions ``R`` of
shape ``[B, N, d]`` (B replicas) and a time ``t`` (scalar tensor or float, used by
time-dependent control terms; ignored by time-independent ones). Parameters that should be
learned (epsilon of a pair term, the weights of a neural pair potential, a protocol) are
ordinary ``nn.Parameter`` s, so gradients reach them through ``energy_and_forces``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from controlmd.errors import ControlMDError

Tensor = torch.Tensor

__all__ = ["Potential", "SumPotential"]


class Potential(nn.Module, ABC):
    """Base class: a (possibly time-dependent) energy term, per replica."""

    #: ``energy_and_forces`` is a closed form (no autograd pass): set by terms that have
    #: one, which are then traceable by ``torch.compile`` (used by ``FusedSteps``)
    closed_form_forces: bool = False

    @abstractmethod
    def energy(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        """Energy of each replica.

        Args:
            R: positions ``[B, N, d]``.
            t: time, for time-dependent (control) terms.

        Returns:
            Energies ``[B]``.
        """

    def energy_and_forces(
        self, R: Tensor, t: Tensor | float | None = None, *, create_graph: bool | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(E [B], F = -dE/dR [B, N, d])``, unchecked (the hot path); the checked entry point
        is :func:`controlmd.potentials.energy_and_forces`.

        Subclasses with analytic forces override this; they are tested against autograd.
        """
        return _autograd_energy_and_forces(self, R, t, create_graph=create_graph)

    def forward(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        return self.energy(R, t)

    def __add__(self, other: Potential) -> SumPotential:
        if not isinstance(other, Potential):
            return NotImplemented
        left = self.potentials() if isinstance(self, SumPotential) else [self]
        right = other.potentials() if isinstance(other, SumPotential) else [other]
        return SumPotential(left + right)


class SumPotential(Potential):
    """Sum of several energy terms, e.g. ``H0 + H_ctrl``."""

    def __init__(self, terms: list[Potential]) -> None:
        super().__init__()
        self.terms = nn.ModuleList(terms)

    def potentials(self) -> list[Potential]:
        """The terms as a list (``nn.ModuleList`` iterates as plain ``nn.Module`` s)."""
        terms: list[Potential] = []
        for term in self.terms:
            if not isinstance(term, Potential):
                raise TypeError(f"SumPotential terms must be Potentials, got {type(term).__name__}")
            terms.append(term)
        return terms

    def energy(self, R: Tensor, t: Tensor | float | None = None) -> Tensor:
        E_total: Tensor | None = None
        for term in self.potentials():
            E = term.energy(R, t)
            E_total = E if E_total is None else E_total + E
        if E_total is None:
            raise ControlMDError("SumPotential has no terms")
        return E_total

    def energy_and_forces(
        self, R: Tensor, t: Tensor | float | None = None, *, create_graph: bool | None = None
    ) -> tuple[Tensor, Tensor]:
        E_total: Tensor | None = None
        F_total: Tensor | None = None
        for term in self.potentials():
            E, F = term.energy_and_forces(R, t, create_graph=create_graph)
            E_total = E if E_total is None else E_total + E
            F_total = F if F_total is None else F_total + F
        if E_total is None or F_total is None:
            raise ControlMDError("SumPotential has no terms")
        return E_total, F_total


def _autograd_energy_and_forces(
    potential: Potential, R: Tensor, t: Tensor | float | None, *, create_graph: bool | None
) -> tuple[Tensor, Tensor]:
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        R_ = R if R.requires_grad else R.detach().requires_grad_(True)
        E = potential.energy(R_, t)
        if not E.requires_grad:  # a term independent of R (e.g. constant offset)
            return E, torch.zeros_like(R)
        (dE,) = torch.autograd.grad(E.sum(), R_, create_graph=create_graph)
    F = -dE
    if not create_graph:
        E, F = E.detach(), F.detach()
    return E, F
