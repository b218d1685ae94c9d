"""Flax NNX layers, model sparsification, models and checkpoints for jaxsparse.

Needs ``flax`` (``pip install jaxsparse[nn]``).
"""

from jaxsparse.nn.layers import SparseConv, SparseStructure, conv_relu
from jaxsparse.nn.sparsify import LayerDecision, SparsifyReport, sparsify
from jaxsparse.nn.timing import LayerSpec, TimingCache
from jaxsparse.nn.checkpoint import load, save
from jaxsparse.nn import models

__all__ = ["SparseConv", "SparseStructure", "conv_relu", "sparsify", "SparsifyReport", "LayerDecision",
           "LayerSpec", "TimingCache", "save", "load", "models"]
