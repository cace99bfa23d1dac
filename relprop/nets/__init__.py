"""The thin model: layers, Sequential, traced forward, spec/state-dict I/O."""
from .io import from_spec, load, save
from .layers import AvgPool2d, Conv2d, Flatten, Layer, Linear, MaxPool2d, ReLU, SumPool
from .sequential import Sequential, Trace

__all__ = ["from_spec", "load", "save", "Sequential", "Trace", "Layer", "Linear", "Conv2d", "ReLU",
           "MaxPool2d", "AvgPool2d", "Flatten", "SumPool"]
