"""Learning a pair potential from a target radial distribution function (RDF).

The "learning" half of Wang, Axelrod & Gómez-Bombarelli (arXiv:2003.00868): the object
optimized is the Hamiltonian itself, not a control protocol. The RDF of short Nosé–Hoover
trajectories is differentiated, through the simulation, with respect to the parameters of
a pair potential (Lennard-Jones epsilon and sigma, Morse, soft sphere, or a neural
``u(r)``) so that it matches a target RDF.

System
    ``N`` identical particles of mass 1 in a cubic periodic box at number density
    ``density``, started on a lattice (``fcc``), interacting through one pair potential
    with cutoff ``r_cut`` (absolute, in the reference sigma). Dynamics: Nosé–Hoover chain
    NVT (:class:`~controlmd.dynamics.nose_hoover.NoseHooverChain`) at ``kT``, time step
    ``dt``. One rollout = ``n_burn`` steps without gradient (re-equilibration to the
    current parameters) + ``n_sample`` sampled steps (gradient path chosen by the
    trainer: ``truncated`` windows in the experiments), so ``n_steps = n_burn + n_sample``.

Control channels
    None: this task learns the parameters of H0, which :meth:`RDFInverse.parameters`
    exposes to the trainer; the protocol (``[protocol] kind = "none"``) is empty.

Observation
    None (the task has no gymnasium environment).

Outcome
    Surrogate loss (minimized): ``MSE(mean_b g_b, g*)`` over the ``n_bins`` bins of the
    Gaussian-smeared RDF (:func:`controlmd.observables.rdf`, width ``smearing``), where
    ``g_b`` is the frame average of replica ``b`` over the sampled part of the rollout and
    ``g*`` the equally smeared target; the replica average is taken before the square, so
    the sampling-noise bias of the loss shrinks as 1/B. ``loss = "js"`` uses the
    Jensen–Shannon divergence of the pair-distance distributions ``p_k ~ g_k r_k^2``
    instead. ``split_halves = true`` replaces the MSE by ``mean_k (g_A - g*)(g_B - g*)``
    with ``g_A``, ``g_B`` the averages over two halves of the replicas: independent
    trajectories, so its expectation is exactly the squared mismatch of the mean RDF and
    its gradient carries no correlation between the noise of ``g`` and of ``dg/dtheta``
    (which otherwise shifts the minimum along weakly determined directions such as epsilon
    at high density); its value can be slightly negative.
    Exact metric ``rdf_mse`` (reported, never the surrogate): per replica, the mean over
    bins of ``(g_hist - g*_hist)^2`` with ``g_hist`` the exact histogram RDF
    (:func:`controlmd.observables.rdf_histogram`, same bins) averaged over the frames of an
    evaluation rollout (``eval_steps`` sampled steps); it includes a sampling-noise floor
    that shrinks with ``eval_steps``.

Target
    ``target = "simulate"``: the reference potential (``reference``, default LJ with
    epsilon = sigma = 1) is simulated with the same engine, ``target_frames`` (>= 4000)
    frames pooled over ``target_replicas`` replicas; its smeared RDF and its histogram RDF
    are the targets (computed lazily, on first use). ``target = "path/to/file.csv"``: a
    histogram RDF in the CSV format below (paths relative to the working directory); the
    same Gaussian smearing is applied to it by :func:`smear_rdf`, which computes the
    expectation of :func:`controlmd.observables.rdf` for that g(r), so simulated and file
    RDFs are compared consistently.

Starting state
    Lattice positions (identical for all replicas) with Maxwell–Boltzmann momenta at
    ``kT`` drawn from ``replica_seed(seed, first_replica + i)``; rollouts first equilibrate
    ``n_equilibrate`` steps without gradient, the first half at ``2 kT`` so that the
    lattice melts whatever the current potential, the second half at ``kT``. With
    ``states = "continue"`` (default) each training rollout continues from the final
    states of the previous one (only the first one equilibrates from the lattice; the seed
    then only matters for that one), so the sampled states follow the parameters as they
    change; ``states = "restart"`` restarts every training rollout from the states
    equilibrated once at the initial parameters.
    Evaluation rollouts (``gradient = "none"``) always equilibrate fresh replicas from
    their own seed.

Episode end
    Truncation after ``n_steps = n_burn + n_sample`` steps; no termination.

Units
    Reduced LJ units: lengths in sigma, energies in epsilon (of the reference LJ), mass 1,
    time tau = sigma sqrt(m / epsilon); kT in epsilon; density in sigma^-3.

Arguments
    ================  =====  ===========  ====================================================
    name              type   default      effect
    ================  =====  ===========  ====================================================
    n_particles       int    108          particles per replica
    density           float  0.83         number density (sigma^-3)
    kT                float  1.0          thermostat temperature (epsilon)
    dt                float  0.005        time step (tau)
    lattice           str    "fcc"        starting lattice (:data:`controlmd.lattice.LATTICES`)
    potential         str    "lj"         learned family: lj, morse, soft_sphere, neural
    init              table  {}           constructor values of that family (LJ: epsilon,
                                          sigma; neural: hidden, n_basis, sigma_prior, ...)
    learn             list   all          parameters learned (parametric families)
    r_cut             float  2.5          pair cutoff (sigma), <= half the box
    shift             str    "energy"     cutoff treatment of parametric families
    target            str    "simulate"   "simulate" or a CSV file of a histogram RDF
    reference         table  LJ(1, 1)     potential simulated for ``target = "simulate"``
    target_replicas   int    16           replicas of the target simulation
    target_frames     int    4000         frames of the target simulation (>= 4000)
    target_every      int    10           steps between target frames
    target_seed       int    2024         seed of the target simulation
    r_max             float  2.3          RDF range; ``r_max + 4 smearing`` <= half the box
    n_bins            int    46           RDF bins, centres ``(k + 1/2) r_max / n_bins``
    smearing          float  bin width    Gaussian width of the smeared RDF (sigma); 0.05
                                          overlaps the first peaks of a start as far off
                                          as sigma = 0.8, so the gradient moves the peak
                                          (0.02 gives a gradient that only lowers it)
    loss              str    "mse"        "mse" or "js" (Jensen–Shannon)
    split_halves      bool   false        unbiased cross-product MSE over replica halves
    n_equilibrate     int    1000         steps equilibrating fresh replicas
    n_burn            int    50           steps without gradient at each rollout start
    n_sample          int    100          sampled (differentiated) steps per rollout
    record_every      int    5            steps between RDF frames
    eval_steps        int    500          sampled steps of evaluation rollouts
    final_replicas    int    8            replicas of the final pooled evaluation (artifacts)
    final_frames      int    200          frames per replica of that evaluation
    states            str    "continue"   "continue" or "restart" (Starting state)
    chain_length      int    3            Nosé–Hoover chain length
    tau               float  0.5          thermostat time scale (tau)
    dtype             str    "float64"    "float64" or "float32"
    average_last      int    20           reported parameters: mean of the last iterates
    ================  =====  ===========  ====================================================

CSV format of RDF targets (``experiments/data/*.csv``)
    UTF-8 text with two comma-separated columns, the pair distance ``r`` (sigma) and
    ``g(r)`` (dimensionless)::

        # controlmd RDF target
        # density = 0.83
        # kT = 1.0
        # smearing_width = 0
        r,g
        0.005000,0.000000
        0.015000,0.000000
        ...

    Lines starting with ``#`` are comments; ``# key = value`` comments are metadata
    (``density``, ``kT``, ``n_particles``, ``source``, ...; the task checks ``density`` and
    ``kT`` against its own when present). Blank lines are ignored. One optional header
    line of non-numeric fields (``r,g``) may precede the data. Every data line holds
    exactly two finite numbers; ``r`` is >= 0 and strictly increasing; ``g`` is >= 0; at
    least three rows. ``smearing_width`` 0 (or absent) marks a histogram RDF (bin centres
    in ``r``), as MD codes and experiments give it; a positive value marks an RDF already
    smeared with that width (loadable, but the task asks for the unsmeared histogram so
    that it can smear it consistently). Make one with::

        python experiments/data/make_target.py --density 0.83 --kT 1.0 --out target.csv

Version history
    v0: initial version.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from controlmd._validation import check_choice, check_int, check_positive
from controlmd.checkpoint import atomic_write_text
from controlmd.dynamics.base import Integrator, State
from controlmd.dynamics.nose_hoover import NoseHooverChain
from controlmd.errors import ControlMDError
from controlmd.lattice import LATTICES, lattice
from controlmd.numerics import interp
from controlmd.observables import rdf, rdf_histogram
from controlmd.potentials.base import Potential
from controlmd.potentials.factory import (
    PAIR_FAMILIES,
    PAIR_FILE_FORMAT,
    load_pair_potential,
    make_pair_potential,
    save_pair_potential,
)
from controlmd.potentials.pair import PairPotential
from controlmd.protocols import Protocol
from controlmd.rng import ReplicaRNG
from controlmd.simulate import simulate
from controlmd.space import periodic
from controlmd.tasks.base import ControlChannels, Task, TaskCapabilities
from controlmd.tasks.rdf_targets import (
    LOSSES,
    RDFTarget,
    load_rdf_csv,
    rdf_loss,
    save_rdf_csv,
    smear_rdf,
)
from controlmd.tasks.registry import register_task

Tensor = torch.Tensor

__all__ = [
    "LOSSES",
    "PAIR_FAMILIES",
    "PAIR_FILE_FORMAT",
    "RDFInverse",
    "RDFTarget",
    "load_pair_potential",
    "load_rdf_csv",
    "make_pair_potential",
    "make_target",
    "rdf_loss",
    "save_pair_potential",
    "save_rdf_csv",
    "smear_rdf",
]


STATE_MODES = ("continue", "restart")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


# --------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class _Targets:
    """Target RDFs on the task's bins: smeared ``[K]`` (loss) and histogram ``[K]`` (metric)."""

    smeared: Tensor
    hist: Tensor
    source: str
    md_steps: int = 0


@register_task
class RDFInverse(Task[State]):
    """Fit a pair potential so that the simulated RDF matches a target RDF.

    See the module docstring for the system, outcome, target and arguments.

    Example:
        >>> import torch
        >>> task = RDFInverse(n_particles=32, density=0.5, r_cut=1.9, r_max=1.5, n_bins=30,
        ...                   init={"epsilon": 1.0, "sigma": 0.9}, n_equilibrate=20,
        ...                   target_replicas=40, target_frames=4000, target_every=1)
        >>> [name for name, _ in task.named_parameters()]
        ['sigma', 'epsilon']
        >>> state = task.rollout(None, 2, seed=0, gradient="truncated", window=10)
        >>> loss = task.loss(state)
        >>> loss.backward()
        >>> bool(task.pair.sigma.grad != 0)
        True
    """

    name = "rdf_inverse"
    metric_name = "rdf_mse"
    higher_is_better = False
    units = "reduced LJ units: sigma, epsilon, mass 1, tau = sigma sqrt(m/epsilon); kT in epsilon"
    capabilities = TaskCapabilities(estimators=("pathwise",), env=False)
    replica_mean_loss = False  # the loss is a function of the replica-averaged RDF

    def __init__(
        self,
        *,
        n_particles: int = 108,
        density: float = 0.83,
        kT: float = 1.0,
        dt: float = 0.005,
        lattice: str = "fcc",
        potential: str = "lj",
        init: dict[str, Any] | None = None,
        learn: list[str] | None = None,
        r_cut: float = 2.5,
        shift: str = "energy",
        target: str = "simulate",
        reference: dict[str, Any] | None = None,
        target_replicas: int = 16,
        target_frames: int = 4000,
        target_every: int = 10,
        target_seed: int = 2024,
        r_max: float = 2.3,
        n_bins: int = 46,
        smearing: float | None = None,
        loss: str = "mse",
        split_halves: bool = False,
        n_equilibrate: int = 1000,
        n_burn: int = 50,
        n_sample: int = 100,
        record_every: int = 5,
        eval_steps: int = 500,
        final_replicas: int = 8,
        final_frames: int = 200,
        states: str = "continue",
        chain_length: int = 3,
        tau: float = 0.5,
        dtype: str = "float64",
        average_last: int = 20,
    ) -> None:
        check_int("n_particles", n_particles, minimum=2)
        for name, value in (
            ("density", density),
            ("kT", kT),
            ("dt", dt),
            ("r_cut", r_cut),
            ("r_max", r_max),
            ("tau", tau),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ControlMDError(f"{name} must be a number, got {value!r}")
            check_positive(name, value)
        check_choice("lattice", lattice, list(LATTICES))
        check_choice("loss", loss, LOSSES)
        check_choice("states", states, STATE_MODES)
        check_choice("dtype", dtype, list(_DTYPES))
        check_int("n_bins", n_bins, minimum=3)
        check_int("n_equilibrate", n_equilibrate, minimum=0)
        check_int("n_burn", n_burn, minimum=0)
        for name, value in (
            ("n_sample", n_sample),
            ("record_every", record_every),
            ("eval_steps", eval_steps),
            ("target_replicas", target_replicas),
            ("final_replicas", final_replicas),
            ("final_frames", final_frames),
            ("target_every", target_every),
            ("chain_length", chain_length),
            ("average_last", average_last),
        ):
            check_int(name, value)
        check_int("target_frames", target_frames, minimum=4000)
        check_int("target_seed", target_seed, minimum=0)
        if n_sample < record_every or eval_steps < record_every:
            raise ControlMDError(
                f"n_sample = {n_sample} and eval_steps = {eval_steps} must be >= record_every = "
                f"{record_every} (each rollout needs at least one RDF frame)"
            )
        if not isinstance(split_halves, bool):
            raise ControlMDError(f"split_halves must be true or false, got {split_halves!r}")
        if split_halves and loss != "mse":
            raise ControlMDError(f"split_halves applies to loss = 'mse' only, got loss = {loss!r}")
        if init is not None and not isinstance(init, dict):
            raise ControlMDError(f"init must be a table of parameter values, got {init!r}")
        if learn is not None and (
            not isinstance(learn, list) or not all(isinstance(x, str) for x in learn)
        ):
            raise ControlMDError(f"learn must be a list of parameter names, got {learn!r}")
        self.n_particles = n_particles
        self.density = float(density)
        self.kT = float(kT)
        self.dt = float(dt)
        self.dtype = _DTYPES[dtype]
        self.lattice_kind = lattice
        self.loss_kind = loss
        self.split_halves = split_halves
        self.states = states
        self.n_equilibrate = n_equilibrate
        self.n_burn = n_burn
        self.n_sample = n_sample
        self.n_steps = n_burn + n_sample
        self.record_every = record_every
        self.eval_steps = eval_steps
        self.final_replicas = final_replicas
        self.final_frames = final_frames
        self.average_last = average_last
        self.r_max = float(r_max)
        self.n_bins = n_bins
        self.smearing = float(r_max) / n_bins if smearing is None else float(smearing)
        check_positive("smearing", self.smearing)
        self.controls = ControlChannels((), (), (), ())

        R0, box = _lattice(lattice, n_particles, density)
        self._R0 = R0
        self.space = periodic(box)
        self.space.check_cutoff("r_cut", float(r_cut))
        self.space.check_cutoff("r_max + 4 smearing", self.r_max + 4.0 * self.smearing)
        self.centers = (torch.arange(n_bins, dtype=torch.float64) + 0.5) * (self.r_max / n_bins)
        self.r_cut = float(r_cut)
        self.shift = shift
        self.potential_kind = potential
        family = PAIR_FAMILIES.get(potential)
        if family is None:
            check_choice("potential", potential, list(PAIR_FAMILIES))
        learn_names: Sequence[str] | bool = True if learn is None else learn
        self.pair = make_pair_potential(
            potential, self.space, params=init, learn=learn_names, r_cut=r_cut, shift=shift
        )
        self.pair_spec: dict[str, Any] = {
            "potential": potential,
            "params": dict(init or {}),
            "learn": learn_names,
            "r_cut": self.r_cut,
            "shift": shift,
        }
        reference = (
            {"potential": "lj", "epsilon": 1.0, "sigma": 1.0}
            if reference is None
            else dict(reference)
        )
        ref_kind = reference.pop("potential", "lj")
        self.reference_spec = {"potential": ref_kind, **reference}
        self.reference = make_pair_potential(
            ref_kind, self.space, params=reference, r_cut=r_cut, shift=shift
        )
        self.chain_length = chain_length
        self.tau = float(tau)
        self._dynamics = self._nose_hoover(self.pair)
        self.target_spec = target
        self.target_replicas = target_replicas
        self.target_frames = target_frames
        self.target_every = target_every
        self.target_seed = target_seed
        self._targets: _Targets | None = None
        self._target_file: RDFTarget | None = None
        if target != "simulate":
            self._targets = self._file_targets(Path(target))

        self._initial_values = self._parameter_vector()
        self._carry: State | None = None
        self._pool: State | None = None
        self.history: list[dict[str, float]] = []
        self._iterates: list[Tensor] = []
        self.budget = {"train": 0, "equilibrate": 0, "eval": 0, "target": 0}
        self.final_evaluation: dict[str, Any] | None = None

    # ------------------------------------------------------------------ construction helpers

    def _nose_hoover(self, potential: Potential, kT: float | None = None) -> NoseHooverChain:
        """The task's Nose-Hoover chain on ``potential``, at the task's ``kT`` unless given."""
        return NoseHooverChain(
            potential,
            dt=self.dt,
            kT=self.kT if kT is None else kT,
            space=self.space,
            chain_length=self.chain_length,
            tau=self.tau,
        )

    def target_histogram(self, r: Tensor) -> Tensor:
        """The target's histogram RDF at distances ``r [M]`` (linear interpolation of the
        finest grid available: the file's, else the task's bins); 0 below that grid."""
        if self._target_file is not None:
            tr, tg = self._target_file.r, self._target_file.g
        else:
            tr, tg = self.centers, self.targets.hist
        r = torch.as_tensor(r, dtype=torch.float64)
        return torch.where(r < tr[0], torch.zeros_like(r), interp(r, tr, tg))

    def _file_targets(self, path: Path) -> _Targets:
        t = load_rdf_csv(path)
        self._target_file = t
        if t.smearing_width > 0:
            raise ControlMDError(
                f"{path}: the target is already smeared (smearing_width = {t.smearing_width:g}); "
                "give the histogram RDF (smearing_width = 0): the task smears it itself"
            )
        for key, mine in (("density", self.density), ("kT", self.kT)):
            if key in t.meta:
                try:
                    theirs = float(t.meta[key])
                except ValueError:
                    raise ControlMDError(
                        f"{path}: metadata {key} = {t.meta[key]!r} is not a number"
                    ) from None
                if not math.isclose(theirs, mine, rel_tol=1e-6):
                    raise ControlMDError(
                        f"{path} was made at {key} = {theirs:g}, but the task simulates {key} = {mine:g}"
                    )
        smeared = smear_rdf(t.r, t.g, self.centers, self.smearing)
        if float(t.r[-1]) + float((t.r[1:] - t.r[:-1]).max()) < float(self.centers[-1]):
            raise ControlMDError(
                f"{path} covers r <= {float(t.r[-1]):g}, less than r_max = {self.r_max:g}"
            )
        return _Targets(smeared, self.target_histogram(self.centers), str(path))

    # ------------------------------------------------------------------ learnable parameters

    def parameters(self) -> list[nn.Parameter]:
        """The learnable parameters of the pair potential (what the trainer optimizes)."""
        return [p for p in self.pair.parameters() if p.requires_grad]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.pair.named_parameters() if p.requires_grad]

    def set_potential(self, pair: PairPotential, spec: dict[str, Any]) -> None:
        """Replace the pair potential (IBI's table, a transferred fit); resets the carried
        states and the iterate history.

        :param pair: the new pair term (in this task's space).
        :param spec: how to rebuild it (the arguments of :func:`make_pair_potential`:
            ``potential``, ``params``, ``learn``, ``r_cut``, ``shift``), saved with it.
        """
        if not isinstance(pair, PairPotential):
            raise ControlMDError(f"pair must be a PairPotential, got {type(pair).__name__}")
        self.pair = pair
        self.pair_spec = dict(spec)
        self.potential_kind = str(spec.get("potential", type(pair).__name__))
        self._dynamics = self._nose_hoover(pair)
        self._initial_values = self._parameter_vector()
        self._carry = self._pool = None
        self._iterates = []

    def _parameter_vector(self) -> Tensor:
        params = self.parameters()
        if not params:
            return torch.zeros(0, dtype=torch.float64)
        return nn.utils.parameters_to_vector(params).detach().to(torch.float64).clone()

    def averaged_parameters(self) -> Tensor:
        """Mean of the last ``average_last`` training iterates (flat vector; the current
        values when no training rollout was made)."""
        if not self._iterates:
            return self._parameter_vector()
        return torch.stack(self._iterates[-self.average_last :]).mean(dim=0)

    @contextlib.contextmanager
    def using_parameters(self, vector: Tensor) -> Iterator[None]:
        """Temporarily load a flat parameter vector into the pair potential."""
        params = self.parameters()
        if not params:
            yield
            return
        saved = nn.utils.parameters_to_vector(params).detach().clone()
        with torch.no_grad():
            nn.utils.vector_to_parameters(vector.to(saved), params)
        try:
            yield
        finally:
            with torch.no_grad():
                nn.utils.vector_to_parameters(saved, params)

    def scalar_parameters(self, vector: Tensor | None = None) -> dict[str, float]:
        """Named scalar parameters of a parametric family (``epsilon``, ``sigma``, ...):
        learned ones from the flat ``vector`` (default: the current values), fixed ones from
        the potential; empty for the neural and tabulated families."""
        names = PAIR_FAMILIES.get(self.potential_kind, ())
        if not names or not all(getattr(self.pair, n, None) is not None for n in names):
            return {}
        values = {n: float(getattr(self.pair, n).detach().reshape(-1)[0]) for n in names}
        if vector is not None:
            learned = [n for n, _ in self.named_parameters()]
            values.update({n: float(x) for n, x in zip(learned, vector)})
        return values

    # ------------------------------------------------------------------ targets

    @property
    def targets(self) -> _Targets:
        """Target RDFs on the task's bins (simulated on first use for ``target = "simulate"``)."""
        if self._targets is None:
            n_per = math.ceil(self.target_frames / self.target_replicas)
            sample = self.sample_rdf(
                self.reference,
                n_replicas=self.target_replicas,
                n_frames=n_per,
                every=self.target_every,
                seed=self.target_seed,
            )
            self.budget["target"] += sample["md_steps"]
            source = (
                f"simulated: {self.reference_spec}, {n_per * self.target_replicas} frames "
                f"every {self.target_every} steps, seed {self.target_seed}"
            )
            self._targets = _Targets(sample["smeared"], sample["hist"], source, sample["md_steps"])
        return self._targets

    def sample_rdf(
        self,
        potential: PairPotential | None = None,
        *,
        n_replicas: int,
        n_frames: int,
        every: int,
        seed: int,
        r_max: float | None = None,
        n_bins: int | None = None,
        smeared: bool = True,
    ) -> dict[str, Any]:
        """Equilibrate fresh replicas and pool RDF frames (no gradient).

        :param potential: the pair potential (default: the task's current one).
        :param n_replicas: replicas.
        :param n_frames: frames per replica, ``every`` steps apart, after ``n_equilibrate``.
        :param seed: batch seed of the momenta.
        :param r_max, n_bins: histogram grid (default: the task's).
        :param smeared: also pool the smeared RDF on the task's bins.
        :return: ``smeared [K]`` (if asked) and ``hist`` (pooled), ``r_hist``, ``md_steps``.
        """
        dynamics = self._dynamics if potential is None else self._nose_hoover(potential)
        r_max = self.r_max if r_max is None else r_max
        n_bins = self.n_bins if n_bins is None else n_bins
        observables = {
            "hist": lambda s: rdf_histogram(s.R, self.space, r_max=r_max, n_bins=n_bins)[1]
        }
        if smeared:
            observables["smeared"] = self._smeared_rdf
        with torch.no_grad():
            state = self._fresh(dynamics, n_replicas, seed, 0)
            traj = simulate(
                dynamics,
                state,
                n_frames * every,
                gradient="none",
                record_every=every,
                observables=observables,
            )
        pooled = {
            name: v[1:].mean(dim=(0, 1)).to(torch.float64) for name, v in traj.records.items()
        }
        return {
            **pooled,
            "r_hist": (torch.arange(n_bins, dtype=torch.float64) + 0.5) * (r_max / n_bins),
            "md_steps": n_replicas * (self.n_equilibrate + n_frames * every),
        }

    # ------------------------------------------------------------------ Task interface

    def initial_state(self, n_replicas: int, seed: int, *, first_replica: int = 0) -> State:
        """Lattice positions for every replica, Maxwell–Boltzmann momenta at kT (seeded)."""
        return self._lattice_state(self._dynamics, n_replicas, seed, first_replica)

    def integrator(self, protocol: Protocol | None = None) -> Integrator:
        """Nosé–Hoover chain NVT with the task's (learnable) pair potential; no control."""
        return self._dynamics

    def rollout(
        self,
        protocol: Protocol | None,
        n_replicas: int,
        seed: int,
        *,
        first_replica: int = 0,
        **simulate_options: Any,
    ) -> State:
        """One rollout: start states (see *Starting state*), ``n_burn`` steps without
        gradient, then the sampled steps with RDF frames every ``record_every`` steps.

        Training rollouts (a gradient path other than ``"none"``, grad enabled) sample
        ``n_sample`` steps and continue/restart as ``states`` says; evaluation rollouts
        sample ``eval_steps`` steps from freshly equilibrated replicas. The final state's
        ``aux`` holds the frame-averaged ``rdf`` ``[B, K]`` (smeared, differentiable) and
        ``rdf_hist`` ``[B, K]`` (histogram).
        """
        training = simulate_options.get("gradient", "direct") != "none" and torch.is_grad_enabled()
        return self.sample(
            n_replicas,
            seed,
            first_replica=first_replica,
            carry=training,
            n_sample=self.n_sample if training else self.eval_steps,
            **simulate_options,
        )

    def sample(
        self,
        n_replicas: int,
        seed: int,
        *,
        first_replica: int = 0,
        carry: bool,
        n_sample: int,
        observables: dict[str, Any] | None = None,
        **simulate_options: Any,
    ) -> State:
        """The rollout machinery: ``carry`` marks a training step (continue/restart states,
        history and iterates recorded; IBI samples this way without gradient). Extra
        ``observables`` (name -> function of the state) are frame-averaged into ``aux``."""
        check_int("n_sample", n_sample, minimum=self.record_every)
        start = self._start(n_replicas, seed, first_replica, carry)
        if carry:
            self._iterates.append(self._parameter_vector())
        with torch.no_grad():
            burned = simulate(self._dynamics, start, self.n_burn, gradient="none").final
        traj = simulate(
            self._dynamics,
            burned,
            n_sample,
            record_every=self.record_every,
            observables={
                "rdf": self._smeared_rdf,
                "rdf_hist": self._hist_rdf,
                **(observables or {}),
            },
            **simulate_options,
        )
        steps = n_replicas * (self.n_burn + n_sample)
        self.budget["train" if carry else "eval"] += steps
        final = traj.final
        g = traj.records["rdf"][1:].mean(dim=0)
        g_hist = traj.records["rdf_hist"][1:].mean(dim=0)
        if carry:
            self._carry = final.detach()
            with torch.no_grad():
                self.history.append(
                    {
                        "iteration": len(self.history),
                        "md_steps": self.budget["train"] + self.budget["equilibrate"],
                        "rdf_mse": float(rdf_loss(g.mean(dim=0), self.targets.smeared)),
                        "rdf_hist_mse": float(rdf_loss(g_hist.mean(dim=0), self.targets.hist)),
                        **self.scalar_parameters(),
                    }
                )
        averages = {name: traj.records[name][1:].mean(dim=0) for name in observables or {}}
        return final.replace(aux={**final.aux, "rdf": g, "rdf_hist": g_hist, **averages})

    def loss(self, state: State) -> Tensor:
        """``rdf_loss`` of the replica-averaged smeared RDF against the smeared target; with
        ``split_halves``, ``mean_k (g_A - g*)(g_B - g*)`` over two halves A, B of the replicas."""
        g = state.aux["rdf"]
        target = self.targets.smeared.to(g)
        if self.split_halves and g.shape[0] >= 2:
            half = g.shape[0] // 2
            return (
                (g[:half].mean(dim=0) - target) * (g[half : 2 * half].mean(dim=0) - target)
            ).mean()
        return rdf_loss(g.mean(dim=0), target, kind=self.loss_kind, r=self.centers)

    def metric(self, state: State) -> Tensor:
        """Per replica: mean squared error of the frame-averaged histogram RDF ``[B]``."""
        g = state.aux["rdf_hist"].detach()
        return ((g - self.targets.hist.to(g)) ** 2).mean(dim=-1).to(torch.float64)

    def extras(self) -> dict[str, Any]:
        """Learned parameters (mean of the last ``average_last`` iterates under the keys
        ``epsilon``, ``sigma``, ... and in ``learned``), the target and the task's own MD
        budget (equilibration, evaluation and target steps the trainer does not count)."""
        averaged = self.averaged_parameters()
        scalars = self.scalar_parameters(averaged)
        learned: dict[str, Any] = {
            "potential": self.potential_kind,
            "average_last": min(self.average_last, len(self._iterates)),
            "iterates": len(self._iterates),
            "averaged": scalars,
            "last": self.scalar_parameters(),
            "initial": self.scalar_parameters(self._initial_values),
            "n_parameters": int(averaged.numel()),
        }
        out: dict[str, Any] = {
            **scalars,
            "learned": learned,
            "reference": self.reference_spec,
            "target": self._targets.source if self._targets is not None else self.target_spec,
            "state_point": {
                "n_particles": self.n_particles,
                "density": self.density,
                "kT": self.kT,
            },
            "task_md_steps": dict(self.budget),
        }
        if self.history:
            out["rdf_mse_last_iterations"] = [
                h["rdf_mse"] for h in self.history[-self.average_last :]
            ]
        if self.final_evaluation is not None:
            out["final_evaluation"] = self.final_evaluation
        return out

    def state_dict(self) -> dict[str, Any]:
        """What a resumed training needs besides the parameters: carried states, iterates,
        history, MD budget and (simulated) targets."""
        return {
            "carry": _state_to_dict(self._carry),
            "pool": _state_to_dict(self._pool),
            "iterates": [v.clone() for v in self._iterates],
            "history": [dict(h) for h in self.history],
            "budget": dict(self.budget),
            "targets": None if self._targets is None else vars(self._targets).copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._carry = _state_from_dict(state["carry"])
        self._pool = _state_from_dict(state["pool"])
        self._iterates = list(state["iterates"])
        self.history = [dict(h) for h in state["history"]]
        self.budget = dict(state["budget"])
        if state.get("targets") is not None:
            self._targets = _Targets(**state["targets"])

    # ------------------------------------------------------------------ evaluation, artifacts

    def evaluate_rdf(
        self,
        *,
        n_replicas: int | None = None,
        n_frames: int | None = None,
        seed: int = 7,
        vector: Tensor | None = None,
    ) -> dict[str, Any]:
        """Pooled RDF of fresh replicas (default ``final_replicas``, each ``final_frames``
        frames ``record_every`` steps apart) under the current (or given) parameters, and
        its errors against the targets: ``rdf_mse`` (smeared) and ``rdf_hist_mse``."""
        n_replicas = self.final_replicas if n_replicas is None else n_replicas
        n_frames = self.final_frames if n_frames is None else n_frames
        context = self.using_parameters(vector) if vector is not None else contextlib.nullcontext()
        with context:
            sample = self.sample_rdf(
                n_replicas=n_replicas, n_frames=n_frames, every=self.record_every, seed=seed
            )
        self.budget["eval"] += sample["md_steps"]
        return {
            "rdf_mse": float(rdf_loss(sample["smeared"], self.targets.smeared)),
            "rdf_hist_mse": float(rdf_loss(sample["hist"], self.targets.hist)),
            "replicas": n_replicas,
            "frames": n_frames * n_replicas,
            "smeared": sample["smeared"],
            "hist": sample["hist"],
        }

    def finish_run(self, run_dir: str | Path, logger: Any = None, step: int = 0) -> dict[str, Any]:
        """Evaluate the initial and the reported (averaged) parameters and write
        ``rdf.png``, ``u_r.png``, ``loss.png``, ``rdf.csv``, ``u_r.csv``, ``history.json``
        and ``potential.pt`` (the averaged parameters) into ``run_dir`` (figures also to
        ``logger`` under ``rdf/...``). The live parameters stay the last iterate, so a
        resumed training continues from them."""
        from controlmd.plotting import (
            plot_pair_potentials,
            plot_rdf_history,
            plot_rdfs,
            save_figure,
        )

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        averaged = self.averaged_parameters()
        before = self.evaluate_rdf(vector=self._initial_values)
        after = self.evaluate_rdf(vector=averaged)
        self.final_evaluation = {
            "rdf_mse_initial": before["rdf_mse"],
            "rdf_hist_mse_initial": before["rdf_hist_mse"],
            "rdf_mse": after["rdf_mse"],
            "rdf_hist_mse": after["rdf_hist_mse"],
            "frames": after["frames"],
        }
        r = self.centers
        rdfs = {
            "target (smeared)": self.targets.smeared,
            "initial": before["smeared"],
            "fitted": after["smeared"],
        }
        r_u = torch.linspace(
            0.8 * float(self.reference_spec.get("sigma", 1.0)), self.r_cut, 300, dtype=torch.float64
        )
        with torch.no_grad(), self.using_parameters(self._initial_values):
            u_initial = self.pair_energy(self.pair, r_u)
        with torch.no_grad(), self.using_parameters(averaged):
            u_fit = self.pair_energy(self.pair, r_u)
            save_pair_potential(run_dir / "potential.pt", self.pair, self.pair_spec)
        with torch.no_grad():
            u_ref = self.pair_energy(self.reference, r_u)
        figures = {
            "rdf": plot_rdfs(r, rdfs, title=f"g(r) at density {self.density:g}, kT {self.kT:g}"),
            "u_r": plot_pair_potentials(
                r_u, {"reference": u_ref, "initial": u_initial, "fitted": u_fit}
            ),
            "loss": plot_rdf_history(self.history),
        }
        for name, fig in figures.items():
            save_figure(fig, run_dir / f"{name}.png")
            if logger is not None:
                logger.record_figure(f"rdf/{name}", fig, step)
        _write_columns(
            run_dir / "rdf.csv",
            {
                "r": r,
                "target_smeared": self.targets.smeared,
                "target_hist": self.targets.hist,
                "initial_smeared": before["smeared"],
                "fitted_smeared": after["smeared"],
                "fitted_hist": after["hist"],
            },
        )
        _write_columns(
            run_dir / "u_r.csv",
            {"r": r_u, "u_reference": u_ref, "u_initial": u_initial, "u_fitted": u_fit},
        )
        (run_dir / "history.json").write_text(
            json.dumps(self.history, indent=1) + "\n", encoding="utf-8"
        )
        return self.final_evaluation

    @staticmethod
    @torch.no_grad()
    def pair_energy(pair: PairPotential, r: Tensor) -> Tensor:
        """``u(r)`` of a pair term, cut and shifted as in simulations, on distances ``r [M]``
        (no gradient; for tables and plots)."""
        dR = torch.zeros(r.shape[0], 3, dtype=torch.float64)
        dR[:, 0] = r
        return pair.pair_energies(dR)

    # ------------------------------------------------------------------ internals

    def _smeared_rdf(self, state: State) -> Tensor:
        return rdf(state.R, self.space, r_max=self.r_max, n_bins=self.n_bins, sigma=self.smearing)[
            1
        ]

    def _hist_rdf(self, state: State) -> Tensor:
        return rdf_histogram(state.R, self.space, r_max=self.r_max, n_bins=self.n_bins)[1]

    def _lattice_state(
        self, dynamics: NoseHooverChain, n_replicas: int, seed: int, first_replica: int
    ) -> State:
        check_int("n_replicas", n_replicas)
        R = self._R0.to(self.dtype).expand(n_replicas, -1, -1).clone()
        rng = ReplicaRNG(seed, n_replicas, first_replica=first_replica)
        with torch.no_grad():
            return dynamics.init(R, rng=rng)

    def _fresh(
        self, dynamics: NoseHooverChain, n_replicas: int, seed: int, first_replica: int
    ) -> State:
        """Lattice -> half of ``n_equilibrate`` steps at ``2 kT`` (melts the lattice even
        under a potential that would keep a superheated crystal) -> the other half at kT."""
        hot = self._nose_hoover(dynamics.potential, kT=2.0 * self.kT)
        state = self._lattice_state(hot, n_replicas, seed, first_replica)
        melt = self.n_equilibrate // 2
        with torch.no_grad():
            state = simulate(hot, state, melt, gradient="none").final
            if state.P is None:
                raise RuntimeError("a Nose-Hoover state must carry momenta")
            state = dynamics.init(state.R, P=state.P * math.sqrt(0.5))
            return simulate(dynamics, state, self.n_equilibrate - melt, gradient="none").final

    def _start(self, n_replicas: int, seed: int, first_replica: int, carry: bool) -> State:
        if carry:
            kept = self._carry if self.states == "continue" else self._pool
            if kept is not None and kept.n_replicas == n_replicas:
                return kept
        state = self._fresh(self._dynamics, n_replicas, seed, first_replica)
        if carry:
            self.budget["equilibrate"] += n_replicas * self.n_equilibrate
            self._pool = state
        else:
            self.budget["eval"] += n_replicas * self.n_equilibrate
        return state


def _state_to_dict(state: State | None) -> dict[str, Any] | None:
    if state is None:
        return None
    return {"R": state.R, "P": state.P, "t": state.t, "step": state.step, "aux": dict(state.aux)}


def _state_from_dict(d: dict[str, Any] | None) -> State | None:
    return (
        None
        if d is None
        else State(R=d["R"], P=d["P"], t=d["t"], step=d["step"], aux=dict(d["aux"]))
    )


def _lattice(kind: str, n: int, density: float) -> tuple[Tensor, Tensor]:
    R, box = lattice(kind, n, density=density)
    if R.shape[-1] != 3:
        raise ControlMDError(
            f"rdf_inverse simulates 3-D fluids; lattice {kind!r} is {R.shape[-1]}-D"
        )
    return R, box


def _write_columns(path: Path, columns: dict[str, Tensor]) -> None:
    names = list(columns)
    rows = torch.stack(
        [columns[n].detach().to(torch.float64).flatten() for n in names], dim=1
    ).tolist()
    text = (
        ",".join(names) + "\n" + "".join(",".join(f"{x:.6g}" for x in row) + "\n" for row in rows)
    )
    atomic_write_text(path, text)


# --------------------------------------------------------------------------- target files CLI


def make_target(
    out: str | Path,
    *,
    n_particles: int = 108,
    density: float = 0.83,
    kT: float = 1.0,
    frames: int = 40000,
    replicas: int = 16,
    every: int = 10,
    seed: int = 2024,
    bin_width: float = 0.005,
    reference: dict[str, Any] | None = None,
    r_cut: float = 2.5,
    n_equilibrate: int = 1000,
) -> RDFTarget:
    """Simulate a reference potential and write its histogram RDF as a target CSV.

    The histogram reaches the largest multiple of ``bin_width`` below half the box.
    """
    side = (n_particles / density) ** (1.0 / 3.0)
    task = RDFInverse(
        n_particles=n_particles,
        density=density,
        kT=kT,
        reference=reference,
        r_cut=r_cut,
        n_equilibrate=n_equilibrate,
        r_max=min(2.3, 0.5 * side - 0.2),
    )
    box = task.space.box
    if box is None:
        raise RuntimeError("the RDF task's space must be a periodic box")
    half = 0.5 * float(box.min())
    n_bins = math.floor(half / bin_width + 1e-9)
    n_per = math.ceil(frames / replicas)
    sample = task.sample_rdf(
        task.reference,
        n_replicas=replicas,
        n_frames=n_per,
        every=every,
        seed=seed,
        r_max=n_bins * bin_width,
        n_bins=n_bins,
        smeared=False,
    )
    meta = {
        "density": density,
        "kT": kT,
        "n_particles": n_particles,
        "smearing_width": 0,
        "reference": json.dumps(task.reference_spec),
        "r_cut": r_cut,
        "frames": n_per * replicas,
        "frame_every_steps": every,
        "dt": task.dt,
        "seed": seed,
        "thermostat": "Nose-Hoover chain",
        "source": "python experiments/data/make_target.py",
    }
    save_rdf_csv(out, sample["r_hist"], sample["hist"], meta=meta)
    return load_rdf_csv(out)
