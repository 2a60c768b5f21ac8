"""Energy terms: each an ``nn.Module`` with ``energy(R [B, N, d], t) -> [B]``."""

from controlmd.potentials.base import Potential, SumPotential, energy_and_forces

__all__ = ["Potential", "SumPotential", "energy_and_forces"]
