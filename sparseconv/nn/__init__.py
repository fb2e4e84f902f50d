"""Layers, losses and the optimiser for training networks whose convolutions are sparse matrices."""

from .conv_transpose import ConvTranspose1d, ConvTranspose2d, ConvTranspose3d
from .layers import (ACTIVATIONS, ELU, GELU, Activation, AdaptiveAvgPool1d, AdaptiveAvgPool2d, AdaptiveAvgPool3d,
                     AvgPool1d, AvgPool2d, AvgPool3d, ChannelAffine, Conv1d, Conv2d, Conv3d, Dropout, Flatten,
                     Identity, LeakyReLU, Linear, MaxPool1d, MaxPool2d, MaxPool3d, OperatorLayer, ReLU, Sigmoid,
                     Softplus, Subsampling2d, SumPool2d, Tanh, adaptive_avg_pool_matrix)
from .losses import CrossEntropyLoss, MSELoss
from .module import LAYOUTS, LayerInputError, Module, Parameter, Sequential
from .optim import SGD

__all__ = [
    "ACTIVATIONS", "LAYOUTS", "Activation", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AvgPool1d",
    "AvgPool2d", "AvgPool3d", "ChannelAffine", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
    "ConvTranspose3d", "CrossEntropyLoss", "Dropout", "ELU", "Flatten", "GELU", "Identity", "LayerInputError",
    "LeakyReLU", "Linear", "MSELoss", "MaxPool1d", "MaxPool2d", "MaxPool3d", "Module", "OperatorLayer", "Parameter",
    "ReLU", "SGD", "Sequential", "Sigmoid", "Softplus", "Subsampling2d", "SumPool2d", "Tanh",
    "adaptive_avg_pool_matrix",
]
