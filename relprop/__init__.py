"""relprop: explain neural-network decisions with fast array kernels.

>>> import relprop
>>> net = relprop.nets.from_spec(spec, weights)               # doctest: +SKIP
>>> R = relprop.explain(net, x, "lrp.epsilon_plus_flat")      # doctest: +SKIP
"""
from . import kernels, nets
from .explain import Explainer, explain, known_methods, register_method
from .nets import Sequential, from_spec, load

__version__ = "0.1.0"

__all__ = ["explain", "Explainer", "known_methods", "register_method", "kernels", "nets", "Sequential",
           "from_spec", "load"]
