"""Energy terms: each an ``nn.Module`` with ``energy(R [B, N, d], t) -> [B]``."""

from controlmd.potentials.base import Potential, SumPotential, energy_and_forces
from controlmd.potentials.external import (
    ConstantForce,
    ExternalField,
    HarmonicTrap,
    ScaledPotential,
)
from controlmd.potentials.pair import (
    WCA,
    LennardJones,
    Morse,
    PairPotential,
    SoftSphere,
    lennard_jones,
    morse,
    soft_sphere,
    validate_configuration,
)

__all__ = [
    "WCA",
    "ConstantForce",
    "ExternalField",
    "HarmonicTrap",
    "LennardJones",
    "Morse",
    "PairPotential",
    "Potential",
    "ScaledPotential",
    "SoftSphere",
    "SumPotential",
    "energy_and_forces",
    "lennard_jones",
    "morse",
    "soft_sphere",
    "validate_configuration",
]
