"""PyTorch modules -> relprop nets: :func:`from_torch` (exports to ONNX in memory, then :func:`from_onnx`)."""
from __future__ import annotations

import io
import warnings

__all__ = ["from_torch", "to_onnx"]


def from_torch(module, example_input):
    """Convert a PyTorch ``nn.Module`` into a relprop net.

    The module is exported to ONNX in memory with PyTorch's TorchScript exporter
    (``torch.onnx.export(..., dynamo=False)``) in eval mode, keeping BatchNorm as its own
    layer (``training=TrainingMode.PRESERVE``: the weights, running statistics and ε come
    across exactly, nothing is folded), and the graph is read by :func:`relprop.from_onnx`.
    Every module whose export uses only :data:`relprop.io.SUPPORTED_OPS` converts: nested
    ``nn.Sequential``, VGG (with and without BN), ResNet (BasicBlock, Bottleneck), ...
    ``torch`` and ``onnx`` are imported only here (the ``peers`` and ``onnx`` extras).

    Parameters
    ----------
    module : torch.nn.Module
        Set to eval mode for the export; its own mode is restored afterwards.
    example_input : torch.Tensor or numpy array
        One input batch, (N, C, H, W) or (N, D), batch first; fixes the input shape the
        export traces (the relprop net takes any batch size).  Its dtype fixes the net's:
        float64 for a float64 module.

    Returns
    -------
    relprop.nets net
    """
    from .onnx import from_onnx

    return from_onnx(to_onnx(module, example_input))


def to_onnx(module, example_input):
    """The ONNX bytes :func:`from_torch` reads: ``module`` exported in eval mode, BatchNorm kept."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("relprop.from_torch needs torch (the 'peers' extra)") from exc

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch: module must be a torch.nn.Module, got {type(module).__name__}")
    x = example_input
    if not isinstance(x, torch.Tensor):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"from_torch: example_input must be a torch.Tensor or an array, got {type(x).__name__}")
        x = torch.as_tensor(x)
    if not x.is_floating_point():
        raise TypeError(f"from_torch: example_input has dtype {x.dtype}; expected a float tensor")
    if x.ndim not in (2, 4):
        raise ValueError(f"from_torch: example_input has shape {tuple(x.shape)}; expected (N, C, H, W) or (N, D)")
    was_training = module.training
    module.eval()
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
            torch.onnx.export(module, (x,), buf, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                              input_names=["input"], output_names=["output"])
    finally:
        module.train(was_training)
    return buf.getvalue()
