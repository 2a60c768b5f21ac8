"""Energy terms: each an ``nn.Module`` with ``energy(R [B, N, d], t) -> [B]``."""

from controlmd.potentials.base import Potential, SumPotential
from controlmd.potentials.bonded import CosineDihedral, FENEBond, HarmonicAngle, HarmonicBond
from controlmd.potentials.checks import energy_and_forces, validate_configuration
from controlmd.potentials.external import (
    ConstantForce,
    ExternalField,
    HarmonicTrap,
    ScaledPotential,
)
from controlmd.potentials.fields import (
    BasisField,
    Confinement,
    FieldNetwork,
    NeuralField,
    RadialWave,
    mean_square_force,
)
from controlmd.potentials.neural import NeuralPair
from controlmd.potentials.pair import (
    WCA,
    LennardJones,
    Morse,
    PairPotential,
    SoftSphere,
    lennard_jones,
    morse,
    soft_sphere,
)
from controlmd.potentials.tabulated import TabulatedPair

__all__ = [
    "WCA",
    "BasisField",
    "Confinement",
    "ConstantForce",
    "CosineDihedral",
    "ExternalField",
    "FENEBond",
    "FieldNetwork",
    "HarmonicAngle",
    "HarmonicBond",
    "HarmonicTrap",
    "LennardJones",
    "Morse",
    "NeuralField",
    "NeuralPair",
    "PairPotential",
    "Potential",
    "RadialWave",
    "ScaledPotential",
    "SoftSphere",
    "SumPotential",
    "TabulatedPair",
    "energy_and_forces",
    "lennard_jones",
    "mean_square_force",
    "morse",
    "soft_sphere",
    "validate_configuration",
]
