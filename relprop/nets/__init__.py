"""The thin model: layers, the layer graph, traced forward, spec/state-dict I/O, BN folding."""
from .graph import Graph, Sequential, Trace, canonical
from .io import from_spec, load, save
from .layers import (AdaptiveAvgPool2d, Add, AvgPool2d, BatchNorm1d, BatchNorm2d, Concat, Conv2d, Dropout, Flatten,
                     Identity, Layer, Linear, MaxPool2d, ReLU, SumPool)

__all__ = ["from_spec", "load", "save", "Graph", "Sequential", "Trace", "canonical", "Layer", "Linear", "Conv2d",
           "ReLU", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Flatten", "SumPool", "BatchNorm1d", "BatchNorm2d",
           "Identity", "Dropout", "Add", "Concat"]
