"""Physical models that tasks are built on (core layer: imports no task, trainer or CLI).

- :mod:`controlmd.models.retinal`: the two-state, two-mode retinal model of Hahn & Stock
  in its H0 eigenbasis (used by the isomerization task).
"""
