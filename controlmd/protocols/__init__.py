"""Time-dependent control fields u(t) in R^k (and feedback fields u(t, obs)).

A :class:`Protocol` maps time ``t`` (0-d tensor, or ``[T]``) to control values ``[k]``
(or ``[T, k]``), squashed smoothly into physical bounds ``[low, high]``. Time is in the
task's time unit; u in the control channel's unit (the task states both).

Kinds (names of the registry used by ``[protocol] kind = ...`` in experiment files):

==================== ===================================================================
``mlp``              MLP of Fourier time features ``[s, cos(pi j s), sin(pi j s)]``, s = t/T
``fourier``          ``a + b s + sum_j (c_j cos(2 pi j s) + d_j sin(2 pi j s))``
``chebyshev``        ``sum_j c_j T_j(2 s - 1)``
``spline``           natural cubic spline through ``K`` equally spaced knots
``piecewise_constant`` ``K`` equal pieces (the gymnasium env's K-step episode)
``table``            replay of a sampled table (linear interpolation or hold)
``feedback_mlp``     u(t, obs): MLP of time features and task observations
``neural_field``     ``mlp`` channels plus a trainable field V_theta(x, t) (spatial control)
``none``             no channels (tasks without control that learn their Hamiltonian)
``endpoints``        any kind inside, with fixed values before ``t = 0`` and after ``T``
                     (jumps at both ends, counted as work by the integrators)
==================== ===================================================================

Every kind takes ``low``/``high`` (tanh squashing into the bounds), optional fixed
endpoints ``start``/``end`` (exact, by a linear correction in unsquashed space) and a
``fluence_weight`` for the penalty ``w * integral_0^T |u(t)|^2 dt``. Protocols save to a
file (:meth:`Protocol.save`, :func:`load_protocol`) and sample to a table
(:meth:`Protocol.sample`, :meth:`Protocol.write_table`).
"""

from controlmd.protocols.base import (
    PROTOCOL_FILE_FORMAT,
    InitSpec,
    Protocol,
    load_protocol,
    make_protocol,
    protocol_class,
    protocol_names,
    register_protocol,
)
from controlmd.protocols.basis import ChebyshevSeries, CubicSpline, FourierSeries
from controlmd.protocols.endpoints import Endpoints
from controlmd.protocols.field import NeuralFieldProtocol
from controlmd.protocols.fixed import HeldControl, NoControl
from controlmd.protocols.neural import FeedbackMLP, MLPProtocol
from controlmd.protocols.piecewise import PiecewiseConstant, Tabulated

__all__ = [
    "PROTOCOL_FILE_FORMAT",
    "ChebyshevSeries",
    "CubicSpline",
    "Endpoints",
    "FeedbackMLP",
    "FourierSeries",
    "HeldControl",
    "InitSpec",
    "MLPProtocol",
    "NeuralFieldProtocol",
    "NoControl",
    "PiecewiseConstant",
    "Protocol",
    "Tabulated",
    "load_protocol",
    "make_protocol",
    "protocol_class",
    "protocol_names",
    "register_protocol",
]
