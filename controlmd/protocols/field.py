"""A protocol that carries a neural spatiotemporal field beside its global channels."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from controlmd.potentials.fields import FieldNetwork
from controlmd.protocols.base import register_protocol
from controlmd.protocols.neural import MLPProtocol


@register_protocol("neural_field")
class NeuralFieldProtocol(MLPProtocol):
    """Global channels ``u(t)`` (an :class:`~controlmd.protocols.MLPProtocol`, ``dim >= 0``)
    plus a trainable field ``V_theta(phi(x), t)`` (:class:`~controlmd.potentials.FieldNetwork`,
    the ``field`` submodule), saved and trained together.

    A task with a ``field`` control builds a :class:`~controlmd.potentials.NeuralField` from
    ``self.field``; the release window (``release_fraction``) switches the field off with
    :meth:`release_envelope`, exactly zero from ``T (1 - f)`` on.

    Args:
        field_dim: spatial dimension ``d`` of the system.
        field_max: ``V_max`` (> 0, energy units): ``|V| <= V_max``.
        field_features: ``"fourier"`` (periodic box) or ``"cartesian"`` (free space).
        field_modes: highest Fourier mode per axis.
        field_length_scale: length unit of Cartesian features.
        field_com_relative: Cartesian features relative to the centre of mass.
        field_hidden: hidden widths of the field MLP.
        field_time_frequencies: Fourier time features of the field.
        field_species: particle species (> 1 adds a one-hot input).
        field_activation: ``tanh``, ``silu`` or ``gelu``.
        dim, t_final, hidden, n_frequencies, activation, low, high, ...: see
            :class:`~controlmd.protocols.MLPProtocol` (``dim`` may be 0: a field alone).
    """

    min_dim = 0

    def __init__(
        self,
        *,
        dim: int = 0,
        t_final: float,
        field_dim: int = 2,
        field_max: float = 3.0,
        field_features: str = "fourier",
        field_modes: int = 2,
        field_length_scale: float = 1.0,
        field_com_relative: bool = False,
        field_hidden: Sequence[int] = (32, 32),
        field_time_frequencies: int = 4,
        field_species: int = 1,
        field_activation: str = "tanh",
        **mlp: Any,
    ) -> None:
        with warnings.catch_warnings():  # dim = 0: torch warns that it cannot init [0, n]
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            super().__init__(dim=dim, t_final=t_final, **mlp)
        self.field = FieldNetwork(
            dim=field_dim,
            t_final=t_final,
            v_max=field_max,
            features=field_features,
            n_modes=field_modes,
            length_scale=field_length_scale,
            com_relative=field_com_relative,
            hidden=list(field_hidden),
            n_time_frequencies=field_time_frequencies,
            n_species=field_species,
            activation=field_activation,
        )
