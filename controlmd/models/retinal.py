"""The two-state, two-mode model of retinal in rhodopsin (Hahn & Stock), in its H0 eigenbasis.

Hahn & Stock, J. Phys. Chem. B 104, 1146 (2000): the torsion ``phi`` and a coupling mode
``x`` (dimensionless) on a ground (0) and an excited (1) diabatic state::

    H0 = T + sum_n |n> V_n <n| + lam x (|0><1| + |1><0|)
    T  = -(inv_mass / 2) d^2/dphi^2 - (omega / 2) d^2/dx^2
    V0 = W0/2 (1 - cos phi) + omega/2 x^2
    V1 = E1 - W1/2 (1 - cos phi) + omega/2 x^2 + kappa x

with E1 = 2.48, W0 = 3.6, W1 = 1.09, omega = 0.19, kappa = 0.1, lam = 0.19 eV and
inv_mass = 4.84e-4 eV. Basis: ``cos(k phi)``, k = 0 .. n_cos - 1 (the states even under
phi -> -phi, the only ones coupled to the ground state) times ``n_osc`` harmonic-oscillator
functions of x, for both diabats (``2 n_cos n_osc`` functions); H0 is diagonalized densely
and the eigenstates below ``e_cut`` (eV above the bottom of the ground well) are kept: 716
states for the paper's model (n_cos = 121, n_osc = 24 .. 30, e_cut = 2.9). Projected on
them: the unit Condon dipole ``mu = |0><1| + |1><0|``, the projectors on the cis
(|phi| < pi/2, ground diabat) and trans (|phi| > pi/2, excited diabat) regions and on the
excited diabat.

The built model is cached on disk, keyed by a hash of its parameters
(:func:`build_retinal_model`); :func:`cached_retinal_model` also keeps one copy per
process. Used by :class:`controlmd.tasks.isomerization.Isomerization`.

Units: energies in eV; the operators are dimensionless.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from controlmd._validation import check_int, check_positive
from controlmd.checkpoint import atomic_write_bytes
from controlmd.errors import ControlMDError

Tensor = torch.Tensor

__all__ = [
    "RetinalModel",
    "RetinalParameters",
    "build_retinal_model",
    "cached_retinal_model",
    "default_cache_dir",
]

_MODEL_FORMAT = 1
_MIN_STATES = 2


@dataclass(frozen=True)
class RetinalParameters:
    """Parameters of the Hahn–Stock model and of its basis (energies in eV).

    :param n_cos: cosine functions ``cos(k phi)``, k = 0 .. n_cos - 1 (>= 2).
    :param n_osc: harmonic-oscillator functions of x (>= 1).
    :param e_cut: eigenstates below ``e_cut`` (eV above the ground-well bottom) are kept.
    """

    e1: float = 2.48
    w0: float = 3.6
    w1: float = 1.09
    omega: float = 0.19
    kappa: float = 0.1
    lam: float = 0.19
    inv_mass: float = 4.84e-4
    n_cos: int = 121
    n_osc: int = 30
    e_cut: float = 2.9

    def __post_init__(self) -> None:
        check_int("n_cos", self.n_cos, minimum=2)
        check_int("n_osc", self.n_osc)
        for name in ("omega", "inv_mass", "w0", "e_cut"):
            check_positive(name, getattr(self, name))
        for name in ("e1", "w1", "kappa", "lam"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ControlMDError(f"{name} must be finite, got {value}")

    def key(self) -> str:
        """Cache key: a hash of the parameters and the file format."""
        text = json.dumps({"format": _MODEL_FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class RetinalModel:
    """The model in the basis of its kept H0 eigenstates (``n`` states, float64).

    Attributes:
        params: what it was built from.
        energies: eigenvalues of H0 ``[n]``, eV, increasing (index 0: ground state).
        dipole: ``mu = |0><1| + |1><0|`` projected ``[n, n]``.
        p_trans: projector on |phi| > pi/2 of the excited diabat ``[n, n]``.
        p_cis: projector on |phi| < pi/2 of the ground diabat ``[n, n]``.
        p_excited: projector on the excited diabat ``[n, n]``.
        basis_size: number of basis functions diagonalized (2 n_cos n_osc).
    """

    params: RetinalParameters
    energies: Tensor
    dipole: Tensor
    p_trans: Tensor
    p_cis: Tensor
    p_excited: Tensor
    basis_size: int

    @property
    def n_states(self) -> int:
        return int(self.energies.shape[0])

    def to(self, device: torch.device | str) -> RetinalModel:
        """The same model with its tensors on ``device`` (itself when already there)."""
        if self.energies.device == torch.device(device):
            return self
        move = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **move)


def _cos_basis_operators(n_cos: int) -> tuple[np.ndarray, np.ndarray]:
    """``cos phi`` and the projector on |phi| < pi/2 in the orthonormal basis
    ``1/sqrt(2 pi)``, ``cos(k phi)/sqrt(pi)`` (k >= 1), both ``[n_cos, n_cos]``."""
    cos_phi = np.zeros((n_cos, n_cos))
    for j in range(n_cos - 1):
        cos_phi[j, j + 1] = cos_phi[j + 1, j] = 0.5
    cos_phi[0, 1] = cos_phi[1, 0] = 1.0 / math.sqrt(2.0)
    # integral_{-a}^{a} cos(j phi) cos(k phi) dphi, a = pi/2
    a = math.pi / 2
    k = np.arange(n_cos)
    diff = k[:, None] - k[None, :]
    total = k[:, None] + k[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        part_diff = np.where(diff == 0, a, np.sin(diff * a) / np.where(diff == 0, 1, diff))
        part_sum = np.where(total == 0, a, np.sin(total * a) / np.where(total == 0, 1, total))
    overlap = part_diff + part_sum
    norm = np.where(k == 0, 1.0 / math.sqrt(2.0 * math.pi), 1.0 / math.sqrt(math.pi))
    return cos_phi, overlap * norm[:, None] * norm[None, :]


def _hamiltonian(p: RetinalParameters) -> np.ndarray:
    """H0 in the product basis (diabat, cos(k phi), oscillator) ``[N, N]``, N = 2 n_cos n_osc."""
    cos_phi, _ = _cos_basis_operators(p.n_cos)
    eye_phi, eye_x = np.eye(p.n_cos), np.eye(p.n_osc)
    k = np.arange(p.n_cos)
    t_phi = np.diag(0.5 * p.inv_mass * k.astype(float) ** 2)
    v = np.arange(p.n_osc)
    x = np.zeros((p.n_osc, p.n_osc))
    x[v[:-1], v[:-1] + 1] = x[v[:-1] + 1, v[:-1]] = np.sqrt((v[:-1] + 1) / 2.0)
    h_x = np.diag(p.omega * (v + 0.5))
    h00 = np.kron(t_phi + 0.5 * p.w0 * (eye_phi - cos_phi), eye_x) + np.kron(eye_phi, h_x)
    h11 = np.kron(t_phi + p.e1 * eye_phi - 0.5 * p.w1 * (eye_phi - cos_phi), eye_x) + np.kron(
        eye_phi, h_x + p.kappa * x
    )
    h01 = np.kron(eye_phi, p.lam * x)
    return np.block([[h00, h01], [h01, h11]])


def _diagonalize(p: RetinalParameters) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of H0 below ``e_cut``: ``(energies [n], vectors [2 n_cos n_osc, n])``."""
    from scipy.linalg import eigh

    energies, vectors = eigh(
        _hamiltonian(p), subset_by_value=(-np.inf, p.e_cut), driver="evr", overwrite_a=True
    )
    if energies.shape[0] < _MIN_STATES:
        lowest = eigh(
            _hamiltonian(p), eigvals_only=True, subset_by_index=(0, _MIN_STATES - 1), driver="evr"
        )
        raise ControlMDError(
            f"e_cut = {p.e_cut} eV keeps {energies.shape[0]} eigenstate(s); at least {_MIN_STATES} are "
            f"needed and the lowest {_MIN_STATES} lie at {', '.join(f'{e:.4g}' for e in lowest)} eV: raise e_cut"
        )
    return energies, vectors


def _project(p: RetinalParameters, vectors: np.ndarray) -> dict[str, np.ndarray]:
    n = vectors.shape[1]
    _, cis = _cos_basis_operators(p.n_cos)
    u = vectors.reshape(2, p.n_cos, p.n_osc, n)
    u0, u1 = u[0].reshape(-1, n), u[1].reshape(-1, n)
    dipole = u0.T @ u1
    cis_u0 = np.einsum("pq,qxn->pxn", cis, u[0]).reshape(-1, n)
    cis_u1 = np.einsum("pq,qxn->pxn", cis, u[1]).reshape(-1, n)
    p_excited = u1.T @ u1
    return {
        "dipole": dipole + dipole.T,
        "p_cis": u0.T @ cis_u0,
        "p_trans": p_excited - u1.T @ cis_u1,
        "p_excited": p_excited,
    }


def default_cache_dir() -> Path:
    """``$CONTROLMD_CACHE`` if set, else ``~/.cache/controlmd``."""
    env = os.environ.get("CONTROLMD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "controlmd"


def build_retinal_model(
    params: RetinalParameters | None = None,
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> RetinalModel:
    """Build (or load from the cache) the retinal model in its kept eigenbasis.

    The dense diagonalization of the paper's model (7,260 functions for n_osc = 30) takes
    about half a minute to a minute, so the projected operators are stored once in
    ``cache_dir/retinal-<key>.npz``, keyed by a hash of ``params`` (written to a
    temporary file, then renamed: concurrent builders never see a partial file).

    :param params: model and basis (default: the paper's).
    :param cache_dir: default :func:`default_cache_dir`.
    :param use_cache: ``False`` builds without reading or writing the cache.
    :raises ControlMDError: when ``e_cut`` keeps fewer than 2 states.
    """
    p = params if params is not None else RetinalParameters()
    path = (Path(cache_dir) if cache_dir else default_cache_dir()) / f"retinal-{p.key()}.npz"
    arrays: dict[str, np.ndarray] | None = None
    if use_cache and path.is_file():
        with np.load(path) as data:
            if json.loads(str(data["params"])) == dataclasses.asdict(p):
                arrays = {k: data[k] for k in data.files}
    if arrays is None:
        energies, vectors = _diagonalize(p)
        arrays = {"energies": energies, **_project(p, vectors)}
        if use_cache:
            buffer = io.BytesIO()
            np.savez(
                buffer,
                allow_pickle=False,
                params=np.array(json.dumps(dataclasses.asdict(p))),
                **arrays,
            )
            atomic_write_bytes(path, buffer.getvalue())
    as_t = {
        k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
        for k, v in arrays.items()
        if k != "params"
    }
    return RetinalModel(
        params=p,
        energies=as_t["energies"],
        dipole=as_t["dipole"],
        p_trans=as_t["p_trans"],
        p_cis=as_t["p_cis"],
        p_excited=as_t["p_excited"],
        basis_size=2 * p.n_cos * p.n_osc,
    )


_MODELS: dict[tuple[RetinalParameters, str], RetinalModel] = {}


def cached_retinal_model(params: RetinalParameters, cache_dir: str = "") -> RetinalModel:
    """:func:`build_retinal_model`, kept once per process and parameters (configs build
    their task more than once).

    :param params: model and basis.
    :param cache_dir: on-disk cache folder (``""``: :func:`default_cache_dir`).
    """
    key = (params, cache_dir)
    if key not in _MODELS:
        _MODELS[key] = build_retinal_model(params, cache_dir=cache_dir or None)
    return _MODELS[key]
