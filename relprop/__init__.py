"""relprop: explain neural-network decisions with fast array kernels.

>>> import relprop
>>> net = relprop.nets.from_spec(spec, weights)               # doctest: +SKIP
>>> R = relprop.explain(net, x, "lrp.epsilon_plus_flat")      # doctest: +SKIP
"""
import os as _os

# Numba's OpenMP workers spin for milliseconds after every parallel loop and steal the
# cores from the BLAS threads of the next convolution (measured: whole CIFAR-VGG forward at
# 0.47 of the GEMM rate with spinning, 0.59 passive).  libgomp reads this once, when it is
# loaded; a value the user set wins.  PyTorch imported first has loaded (RTLD_GLOBAL) its own
# libgomp, which read the environment then, and Numba would bind to it: so Numba's OpenMP
# layer is loaded now, deep-bound to its own libgomp (relprop.kernels.cpu._threads).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from .kernels.cpu._threads import bind_numba_openmp as _bind_numba_openmp  # noqa: E402

_bind_numba_openmp()

from . import kernels, nets  # noqa: E402
from . import metrics
from .engine import Unit
from .methods import Explainer, explain, known_methods, register_method
from .nets import Graph, Sequential, from_spec, load
from .patterns import Patterns, PatternStats, fit_patterns, load_patterns
from . import rules
from . import attribution, lime  # noqa: E402, F401  (importing a method module registers its methods)
from .rules import (AlphaBeta, Composite, DeconvNet, Epsilon, Flat, Gamma, Gradient, GuidedBackprop, WSquare, ZBox,
                    ZPlus, Zero, dtd_box, dtd_wsquare, epsilon_alpha2_beta1, epsilon_gamma_box, epsilon_plus_flat)

__version__ = "0.1.0"

__all__ = ["explain", "Explainer", "Unit", "known_methods", "register_method", "kernels", "nets", "Graph",
           "Sequential", "from_spec", "load"]
__all__ += ["rules", "Epsilon", "Zero", "Gamma", "AlphaBeta", "ZPlus", "ZBox", "WSquare", "Flat", "Gradient",
            "DeconvNet", "GuidedBackprop", "Composite", "epsilon_plus_flat", "epsilon_gamma_box",
            "epsilon_alpha2_beta1", "dtd_box", "dtd_wsquare"]
__all__ += ["fit_patterns", "load_patterns", "Patterns", "PatternStats"]
from . import viz, zoo  # noqa: E402  (numpy-only at import; matplotlib loads on first figure)
from . import concepts, visualize  # noqa: E402  (numpy-only at import; scikit-learn loads when a CAV is fitted)
__all__ += ["zoo", "viz", "metrics", "visualize", "concepts"]
from .io import from_onnx, from_torch  # noqa: E402  (onnx / torch load inside these functions)
__all__ += ["from_onnx", "from_torch"]
from .kernels._pool import clear as release_buffers  # noqa: E402
__all__ += ["release_buffers"]
