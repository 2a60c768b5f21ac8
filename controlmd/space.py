"""Simulation boxes: displacement with minimum image, and wrapping.

Each constructor returns a :class:`Space`, which unpacks like JAX MD's pair
``displacement_fn, shift_fn = periodic(L)``. Nothing downstream of a Space knows the
boundary: potentials and neighbor lists only call ``space.displacement``.

Lengths are in the task's length unit (sigma in reduced LJ units).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from controlmd._validation import check_int, check_positive
from controlmd.errors import ControlMDError

Tensor = torch.Tensor
DisplacementFn = Callable[[Tensor, Tensor], Tensor]
ShiftFn = Callable[[Tensor, Tensor], Tensor]

__all__ = ["Space", "free", "periodic"]


@dataclass(frozen=True)
class Space:
    """A simulation box.

    Attributes:
        displacement: ``displacement(Ra, Rb) -> Ra - Rb`` for broadcastable ``[..., d]``
            tensors, under the minimum-image convention in a periodic box.
        shift: ``shift(R, dR) -> R + dR``, wrapped back into ``[0, L)`` when periodic.
        box: side lengths ``[d]`` of an orthorhombic periodic box, or ``None`` (free space).
    """

    displacement: DisplacementFn
    shift: ShiftFn
    box: Tensor | None = None

    @property
    def periodic(self) -> bool:
        return self.box is not None

    @property
    def is_free(self) -> bool:
        """Built by :func:`free`: the displacement is the plain difference ``Ra - Rb``, whose
        derivative is the identity (analytic forces use this)."""
        return self.displacement is _free_displacement and self.box is None

    def __iter__(self) -> Iterator[Callable[[Tensor, Tensor], Tensor]]:
        yield self.displacement
        yield self.shift

    def wrap(self, R: Tensor) -> Tensor:
        """Positions wrapped into the primary cell ``[0, L)``; identity in free space."""
        if self.box is None:
            return R
        box = self.box.to(R)
        return R - torch.floor(R / box) * box

    def volume(self) -> float:
        """Box volume (area in 2-D); raises in free space."""
        if self.box is None:
            raise ControlMDError("a free space has no volume; use periodic(box) for bulk systems")
        return float(torch.prod(self.box))

    def check_cutoff(self, name: str, r_cut: float) -> None:
        """Raise unless ``r_cut`` <= half the shortest box side (minimum image is then exact)."""
        if self.box is not None and r_cut > 0.5 * float(self.box.min()):
            raise ControlMDError(
                f"{name} = {r_cut:g} exceeds half the shortest box side "
                f"({0.5 * float(self.box.min()):g}); the minimum-image convention would miss "
                "interactions: use a larger box or a shorter cutoff"
            )


def _free_displacement(Ra: Tensor, Rb: Tensor) -> Tensor:
    return Ra - Rb


def _free_shift(R: Tensor, dR: Tensor) -> Tensor:
    return R + dR


def free() -> Space:
    """Free (non-periodic) space: plain differences, no wrapping."""
    return Space(_free_displacement, _free_shift, None)


def periodic(box: float | Tensor | list[float], *, dim: int | None = None) -> Space:
    """Periodic orthorhombic box.

    Args:
        box: side length (cubic box; give ``dim``, default 3) or side lengths ``[d]``.
        dim: spatial dimension when ``box`` is a scalar.

    Returns:
        A Space whose displacement applies the minimum-image convention and whose shift
        wraps into ``[0, L)``.
    """
    if dim is not None:
        check_int("dim", dim)
    b = torch.as_tensor(box, dtype=torch.float64)
    if b.ndim == 0:
        b = b.repeat(dim if dim is not None else 3)
    elif b.ndim != 1:
        raise ControlMDError(
            f"box must be a scalar or a 1-D tensor of side lengths, got shape {tuple(b.shape)}; "
            "general (triclinic) boxes are not supported"
        )
    elif dim is not None and b.shape[0] != dim:
        raise ControlMDError(f"box has {b.shape[0]} side lengths but dim = {dim}")
    check_positive("box", b)
    like: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def box_like(x: Tensor) -> Tensor:
        """``b`` in ``x``'s dtype and device, converted once (not at every step)."""
        key = (x.dtype, x.device)
        L = like.get(key)
        if L is None:
            L = like[key] = b.to(x)
        return L

    def displacement(Ra: Tensor, Rb: Tensor) -> Tensor:
        L = box_like(Ra)
        dR = Ra - Rb
        return dR - L * torch.round(dR / L)

    def shift(R: Tensor, dR: Tensor) -> Tensor:
        L = box_like(R)
        Rn = R + dR
        return Rn - torch.floor(Rn / L) * L

    return Space(displacement, shift, b)
