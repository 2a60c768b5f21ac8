"""Write a target RDF (histogram CSV, the format of controlmd/tasks/rdf_inverse.py) by
simulating the reference Lennard-Jones fluid with controlmd's engine.

The shipped targets were made with::

    python experiments/data/make_target.py --density 0.83 --kT 1.0 --out experiments/data/lj_rho0.83_kT1.0.csv
    python experiments/data/make_target.py --density 0.3 --kT 1.2 --out experiments/data/lj_rho0.30_kT1.2.csv

(108 particles, 16 replicas x 2500 frames 10 steps apart after 1000 equilibration steps,
dt = 0.005, Nosé–Hoover chain, LJ epsilon = sigma = 1 cut at 2.5 with energy shift,
histogram bins of 0.005 sigma up to half the box; seed 2024).
"""

from controlmd.tasks.rdf_inverse import main

if __name__ == "__main__":
    main()
