"""Layers, losses and the optimiser for training networks whose convolutions are sparse matrices."""

from .layers import (ACTIVATIONS, Activation, AvgPool2d, Conv1d, Conv2d, Conv3d, Flatten, Linear, MaxPool2d, ReLU,
                     Sigmoid, Subsampling2d, SumPool2d, Tanh)
from .conv_transpose import ConvTranspose1d, ConvTranspose2d, ConvTranspose3d
from .losses import CrossEntropyLoss, MSELoss
from .module import LayerInputError, Module, Parameter, Sequential
from .optim import SGD

__all__ = [
    "ACTIVATIONS", "Activation", "AvgPool2d", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
    "ConvTranspose3d", "CrossEntropyLoss", "Flatten",
    "LayerInputError", "Linear", "MSELoss", "MaxPool2d", "Module", "Parameter", "ReLU", "SGD", "Sequential",
    "Sigmoid", "Subsampling2d", "SumPool2d", "Tanh",
]
