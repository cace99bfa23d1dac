"""Models in from other toolkits: ONNX files and PyTorch modules.

>>> net = relprop.from_onnx("resnet.onnx")                    # doctest: +SKIP
>>> net = relprop.from_torch(model, torch.zeros(1, 3, 32, 32))  # doctest: +SKIP

Both return an ordinary relprop net (:func:`relprop.nets.from_spec`): save/load, every
method, every backend.  ``onnx`` and ``torch`` are optional and imported only inside these
functions (the ``onnx`` and ``peers`` extras).
"""
from .onnx import SUPPORTED_OPS, from_onnx, to_spec
from .torch import from_torch

__all__ = ["from_onnx", "from_torch", "to_spec", "SUPPORTED_OPS"]
