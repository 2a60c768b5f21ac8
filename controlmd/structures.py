"""Target geometries and structural analysis: helices, hairpins and the compact heptamer,
Kabsch alignment and RMSD, bond graphs and cluster identification.

Native contacts and the fraction Q live in :mod:`controlmd.observables`
(``native_contacts``, ``native_contact_fraction``).

Units: reduced LJ units (lengths in sigma). Every function is batched over replicas:
positions ``R`` are ``[B, N, d]``; per-replica results are ``[B]``; a reference
structure is ``[N, d]``. Functions marked *exact* count discrete events (a contact is
formed or not, a bond exists or not) and carry no useful gradient; their *smooth*
counterparts replace each indicator by a logistic switch of width ``width`` and are
differentiable.

References:
    W. Kabsch, Acta Cryst. A 32, 922 (1976); A 34, 827 (1978) (optimal rotation).
    W. Wang, S. Axelrod, R. Gómez-Bombarelli, arXiv:2003.00868 (22-bead helix target).
"""

from __future__ import annotations

import math

import torch

from controlmd._validation import check_int, check_positions, check_positive
from controlmd.errors import ControlMDError
from controlmd.space import Space, free

Tensor = torch.Tensor

__all__ = [
    "bond_graph",
    "cluster_labels",
    "hairpin",
    "helix",
    "hexagonal_cluster",
    "kabsch_align",
    "kabsch_rmsd",
    "smooth_bond_count",
    "target_cluster_fraction",
]


# --------------------------------------------------------------------------- geometries


def helix(
    n_beads: int = 22,
    *,
    radius: float = 0.97,
    rise: float = 0.166,
    n_half_turns: float = 5.0,
    bond_length: float = 0.97,
) -> Tensor:
    """A right-handed helix of ``n_beads`` points, scaled so that every bond has ``bond_length``.

    Bead ``i`` (``i = 0 .. n-1``) sits at angle ``phi_i = i * pi * n_half_turns / (n - 1)``
    (the chain spans ``n_half_turns`` half-turns exactly), at ``(radius cos phi_i,
    radius sin phi_i, rise * i)``; the whole curve is then scaled uniformly so that the
    bond length (equal for all bonds) is ``bond_length``. The defaults are the paper's
    target: 22 beads, radius 0.97, rise 0.166 per bead, 5 half-turns; after scaling the
    radius is 1.29 sigma, the rise 0.221 sigma per bead and there are 8.4 beads per turn,
    so the native contacts (distance < 2.2) are the 42 pairs one turn apart
    (``|i - j| = 7, 8, 9``).

    :return: positions ``[n_beads, 3]`` float64, centred at the origin.
    """
    check_int("n_beads", n_beads, minimum=2)
    for name, value in (
        ("radius", radius),
        ("rise", rise),
        ("n_half_turns", n_half_turns),
        ("bond_length", bond_length),
    ):
        check_positive(name, value)
    i = torch.arange(n_beads, dtype=torch.float64)
    phi = i * math.pi * n_half_turns / (n_beads - 1)
    R = torch.stack([radius * torch.cos(phi), radius * torch.sin(phi), rise * i], dim=-1)
    b = (R[1:] - R[:-1]).norm(dim=-1).mean()
    R = R * (bond_length / b)
    return R - R.mean(dim=0)


def hairpin(
    n_strand: int = 10,
    *,
    n_turn: int = 2,
    bond_length: float = 0.97,
    bond_angle: float = 120.0,
) -> Tensor:
    """A beta-hairpin: two antiparallel zigzag strands joined by a semicircular turn.

    Geometry (``b`` = ``bond_length``, ``theta`` = ``bond_angle`` in degrees): every bead
    ``k`` has height ``z_k = h (-1)^k`` with ``2 h = b cos(theta/2)``, so each strand is a
    planar zigzag with bond angle ``theta`` and an in-plane step ``a = b sin(theta/2)``.
    Strand A runs along +x at ``y = 0`` (beads ``0 .. m-1``); the ``n_turn`` turn beads lie on
    a semicircle of radius ``rho = a / (2 sin(pi / (2 (n_turn + 1))))`` whose projected
    chords also equal ``a``; strand B runs back along -x at ``y = 2 rho`` (beads
    ``m + n_turn .. 2m + n_turn - 1``). All bonds have length ``b`` exactly. With the
    defaults (10 + 2 + 10 = 22 beads, 120 degrees) the strands are 1.68 sigma apart and each
    strand bead touches its partner (1.75 sigma) and the partner's two neighbours
    (1.88 sigma): 30 native pairs (``|i - j| >= 3``, distance < 2.2).

    :return: positions ``[2 n_strand + n_turn, 3]`` float64, centred at the origin.
    """
    check_int("n_strand", n_strand, minimum=2)
    check_int("n_turn", n_turn, minimum=1)
    check_positive("bond_length", bond_length)
    if not 60.0 < bond_angle < 180.0:
        raise ControlMDError(f"bond_angle must be in (60, 180) degrees, got {bond_angle}")
    half = math.radians(bond_angle) / 2
    a = bond_length * math.sin(half)
    h = 0.5 * bond_length * math.cos(half)
    rho = a / (2.0 * math.sin(math.pi / (2 * (n_turn + 1))))
    x_end = (n_strand - 1) * a
    xy = [(i * a, 0.0) for i in range(n_strand)]
    for j in range(1, n_turn + 1):
        ang = -math.pi / 2 + j * math.pi / (n_turn + 1)
        xy.append((x_end + rho * math.cos(ang), rho + rho * math.sin(ang)))
    xy += [(x_end - i * a, 2 * rho) for i in range(n_strand)]
    n = len(xy)
    z = [h * (-1) ** k for k in range(n)]
    R = torch.tensor([[x, y, zk] for (x, y), zk in zip(xy, z)], dtype=torch.float64)
    return R - R.mean(dim=0)


def hexagonal_cluster(spacing: float = 1.0, *, dim: int = 2) -> Tensor:
    """The compact heptamer: one disk at the origin surrounded by six at ``spacing``.

    Its contact graph at any cutoff in ``(spacing, sqrt(3) spacing)`` has 12 bonds (6
    spokes and 6 rim bonds), the maximum for 7 non-overlapping disks.

    :return: positions ``[7, dim]`` float64 (``dim`` 2, or 3 with z = 0).
    """
    check_positive("spacing", spacing)
    if dim not in (2, 3):
        raise ControlMDError(f"dim must be 2 or 3, got {dim}")
    ang = torch.arange(6, dtype=torch.float64) * math.pi / 3
    ring = spacing * torch.stack([torch.cos(ang), torch.sin(ang)], dim=-1)
    R = torch.cat([torch.zeros(1, 2, dtype=torch.float64), ring])
    if dim == 3:
        R = torch.cat([R, torch.zeros(7, 1, dtype=torch.float64)], dim=-1)
    return R


# ---------------------------------------------------------------------------- Kabsch


def kabsch_align(R: Tensor, target: Tensor) -> Tensor:
    """Each replica of ``R`` ``[B, N, d]`` optimally superimposed on ``target`` ``[N, d]``
    (translation, then the proper rotation that minimises the RMSD; reflections are not
    allowed, so a mirror image does not align).

    :return: aligned positions ``[B, N, d]``, in the frame of ``target``.
    """
    check_positions("R", R)
    if target.ndim != 2 or target.shape != R.shape[1:]:
        raise ControlMDError(
            f"target has shape {tuple(target.shape)}, expected {tuple(R.shape[1:])} "
            "(same bead count and dimension as R)"
        )
    T = target.to(R)
    t0 = T.mean(dim=0)
    X = R - R.mean(dim=1, keepdim=True)
    Y = T - t0
    H = X.transpose(1, 2) @ Y  # [B, d, d] covariance
    U, _, Vh = torch.linalg.svd(H)
    sign = torch.sign(torch.linalg.det(U @ Vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    D = torch.ones(R.shape[0], R.shape[-1], dtype=R.dtype, device=R.device)
    D[:, -1] = sign
    rot = U @ torch.diag_embed(D) @ Vh  # X @ rot ~ Y
    return X @ rot + t0


def kabsch_rmsd(R: Tensor, target: Tensor) -> Tensor:
    """Root-mean-square deviation ``[B]`` after optimal proper superposition on ``target``."""
    aligned = kabsch_align(R, target)
    return ((aligned - target.to(R)) ** 2).sum(-1).mean(-1).sqrt()


# ------------------------------------------------------------------ bond graphs, clusters


def bond_graph(R: Tensor, cutoff: float, space: Space | None = None) -> Tensor:
    """Exact bond graph: ``A[b, i, j]`` is True when particles ``i != j`` are closer than
    ``cutoff`` (minimum image in a periodic ``space``).

    :return: adjacency ``[B, N, N]`` bool, symmetric, zero diagonal.
    """
    check_positive("cutoff", cutoff)
    space = space if space is not None else free()
    dR = space.displacement(R[:, :, None, :], R[:, None, :, :])
    r2 = (dR * dR).sum(-1)
    n = R.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=R.device)
    return (r2 < cutoff * cutoff) & ~eye


def smooth_bond_count(
    R: Tensor, cutoff: float, *, width: float = 0.05, space: Space | None = None
) -> Tensor:
    """Differentiable number of bonds ``[B]``: ``sum_{i<j} sigmoid((cutoff - r_ij) / width)``."""
    check_positive("cutoff", cutoff)
    check_positive("width", width)
    space = space if space is not None else free()
    n = R.shape[1]
    i, j = torch.triu_indices(n, n, offset=1, device=R.device)
    dR = space.displacement(R[:, i], R[:, j])
    r = torch.sqrt((dR * dR).sum(-1) + 1e-30)
    return torch.sigmoid((cutoff - r) / width).sum(-1)


def cluster_labels(adjacency: Tensor) -> Tensor:
    """Connected components of each replica's bond graph.

    :param adjacency: ``[B, N, N]`` bool.
    :return: labels ``[B, N]`` long: the smallest particle index in each particle's cluster.
    """
    B, n, _ = adjacency.shape
    linked = adjacency | torch.eye(n, dtype=torch.bool, device=adjacency.device)
    labels = torch.arange(n, device=adjacency.device).expand(B, n).clone()
    big = torch.full_like(labels, n)
    for _ in range(n):
        new = torch.where(linked, labels[:, None, :], big[:, None, :]).min(dim=-1).values
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def target_cluster_fraction(
    adjacency: Tensor, *, size: int, n_bonds: int, max_degree: int | None = None
) -> Tensor:
    """Exact fraction ``[B]`` of particles that belong to a target cluster: a connected
    component of exactly ``size`` particles with exactly ``n_bonds`` internal bonds (and,
    when given, a particle of degree ``max_degree``). For the compact heptamer
    ``size=7, n_bonds=12, max_degree=6``; with 7 particles per replica the fraction is
    1 or 0, i.e. the replica's yield.
    """
    n = adjacency.shape[1]
    check_int("size", size)
    if size > n:
        raise ControlMDError(f"cluster size must be <= the particle count {n}, got {size}")
    check_int("n_bonds", n_bonds, minimum=0)
    labels = cluster_labels(adjacency)
    onehot = (labels[:, :, None] == torch.arange(n, device=labels.device)).to(
        torch.float64
    )  # [B, i, c]
    A = adjacency.to(torch.float64)
    degree = A.sum(-1)  # [B, i]
    comp_size = onehot.sum(1)  # [B, c]
    comp_bonds = 0.5 * (degree[:, :, None] * onehot).sum(1)  # bonds never cross clusters
    ok = (comp_size == size) & (comp_bonds == n_bonds)
    if max_degree is not None:
        comp_maxdeg = (degree[:, :, None] * onehot).amax(1)
        ok = ok & (comp_maxdeg == max_degree)
    member = (onehot * ok[:, None, :].to(torch.float64)).sum(-1)  # [B, i]
    return member.mean(-1)
