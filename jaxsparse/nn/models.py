"""Flax NNX models for sparsification: VGG-16, ResNet-50 and CNN-non-static (Kim 2014).

All take channels-last inputs and are written with plain `nnx.Conv` layers, so
`jaxsparse.nn.sparsify` can replace them; conv + ReLU pairs go through
`conv_relu`, which fuses the ReLU into the sparse kernel once the conv is a
`SparseConv`. Widths and resolution are configurable so tests can use tiny
versions; the defaults are the published ImageNet / sentence-classification ones.
"""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.nn.layers import conv_relu

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _w(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def _max_pool(x, window=2, stride=2, padding="VALID"):
    return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=padding)


class VGG16(nnx.Module):
    """VGG-16 (configuration D, Simonyan & Zisserman 2015), NHWC.

    ``width`` scales every channel count, ``resolution`` is the input side
    (a multiple of 32), ``hidden`` the classifier's two hidden layers.
    """

    def __init__(self, num_classes: int = 1000, *, width: float = 1.0, resolution: int = 224,
                 hidden: int = 4096, in_channels: int = 3, dropout: float = 0.5, dtype=None,
                 param_dtype=jnp.float32, precision=None, rngs: nnx.Rngs):
        if resolution % 32:
            raise ValueError(f"resolution must be a multiple of 32, got {resolution}")
        self.resolution = resolution
        convs, c_in = [], in_channels
        self.layout = tuple("M" if v == "M" else "C" for v in VGG16_CONFIG)
        for v in VGG16_CONFIG:
            if v == "M":
                continue
            c_out = _w(v, width)
            convs.append(nnx.Conv(c_in, c_out, (3, 3), padding="SAME", dtype=dtype,
                                  param_dtype=param_dtype, precision=precision, rngs=rngs))
            c_in = c_out
        self.features = nnx.List(convs)
        side = resolution // 32
        dense = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.fc1 = nnx.Linear(side * side * c_in, hidden, **dense)
        self.fc2 = nnx.Linear(hidden, hidden, **dense)
        self.head = nnx.Linear(hidden, num_classes, **dense)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x):
        convs = iter(self.features)
        for kind in self.layout:
            x = _max_pool(x) if kind == "M" else conv_relu(next(convs), x)
        x = x.reshape(x.shape[0], -1)
        x = self.dropout(jax.nn.relu(self.fc1(x)))
        x = self.dropout(jax.nn.relu(self.fc2(x)))
        return self.head(x)


class Bottleneck(nnx.Module):
    """ResNet v1.5 bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (x4), projection shortcut when needed."""

    def __init__(self, c_in: int, width: int, stride: int, *, dtype, param_dtype, precision=None, rngs):
        c_out = 4 * width
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        bn = dict(use_running_average=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = nnx.Conv(c_in, width, (1, 1), **kw)
        self.bn1 = nnx.BatchNorm(width, **bn)
        self.conv2 = nnx.Conv(width, width, (3, 3), strides=stride, padding=((1, 1), (1, 1)), **kw)
        self.bn2 = nnx.BatchNorm(width, **bn)
        self.conv3 = nnx.Conv(width, c_out, (1, 1), **kw)
        self.bn3 = nnx.BatchNorm(c_out, **bn)
        if stride != 1 or c_in != c_out:
            self.proj = nnx.Conv(c_in, c_out, (1, 1), strides=stride, **kw)
            self.proj_bn = nnx.BatchNorm(c_out, **bn)
        else:
            self.proj = nnx.data(None)
            self.proj_bn = nnx.data(None)

    def __call__(self, x):
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.proj is None else self.proj_bn(self.proj(x))
        return jax.nn.relu(y + shortcut)


class ResNet50(nnx.Module):
    """ResNet-50 v1.5 (He et al. 2016, stride on the 3x3 conv), NHWC, BatchNorm in inference mode.

    ``width`` scales every channel count; ``stage_sizes`` defaults to (3, 4, 6, 3).
    """

    def __init__(self, num_classes: int = 1000, *, width: float = 1.0,
                 stage_sizes: tp.Sequence[int] = (3, 4, 6, 3), in_channels: int = 3, dtype=None,
                 param_dtype=jnp.float32, precision=None, rngs: nnx.Rngs):
        stem = _w(64, width)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.stem = nnx.Conv(in_channels, stem, (7, 7), strides=2, padding=((3, 3), (3, 3)),
                             use_bias=False, precision=precision, **kw)
        self.stem_bn = nnx.BatchNorm(stem, use_running_average=True, **kw)
        blocks, c_in = [], stem
        for i, n in enumerate(stage_sizes):
            width_i = _w(64 * 2 ** i, width)
            for j in range(n):
                blocks.append(Bottleneck(c_in, width_i, 2 if (j == 0 and i > 0) else 1, precision=precision,
                                         **kw))
                c_in = 4 * width_i
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(c_in, num_classes, precision=precision, **kw)

    def __call__(self, x):
        x = jax.nn.relu(self.stem_bn(self.stem(x)))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


class CNNNonStatic(nnx.Module):
    """CNN-non-static sentence classifier (Kim 2014).

    Trainable word embeddings (initialised from ``embeddings`` when given), 1-D
    convolutions of widths 3, 4, 5 with 100 feature maps each (ReLU), max-over-time
    pooling, dropout 0.5 and a dense softmax layer. Input: int token ids (N, L).
    """

    def __init__(self, vocab_size: int, num_classes: int = 2, *, embed_dim: int = 300,
                 widths: tp.Sequence[int] = (3, 4, 5), feature_maps: int = 100, dropout: float = 0.5,
                 embeddings=None, dtype=None, param_dtype=jnp.float32, precision=None, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if embeddings is not None:  # pretrained word vectors (row i: token id i), fine-tuned with the rest
            embeddings = jnp.asarray(embeddings, param_dtype)
            if embeddings.shape != (vocab_size, embed_dim):
                raise ValueError(f"embeddings must have shape (vocab_size, embed_dim) = {(vocab_size, embed_dim)}, "
                                 f"got {embeddings.shape}")
            self.embed.embedding[...] = embeddings
        self.convs = nnx.List([nnx.Conv(embed_dim, feature_maps, (w,), padding="VALID", dtype=dtype,
                                        param_dtype=param_dtype, precision=precision, rngs=rngs)
                               for w in widths])
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(len(widths) * feature_maps, num_classes, dtype=dtype,
                               param_dtype=param_dtype, precision=precision, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)                                           # (N, L, E)
        pooled = [jnp.max(conv_relu(conv, x), axis=1) for conv in self.convs]  # max over time
        return self.head(self.dropout(jnp.concatenate(pooled, axis=-1)))
