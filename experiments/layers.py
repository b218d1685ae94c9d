"""The layer catalogue and precision modes shared by the experiment scripts.

(Their flags, output paths and result files: ``common.py``.)

Three families, as in the paper's question:

* **VGG-16** conv1_1 ... conv5_3 at 224x224 (3x3, stride 1, SAME).
* **ResNet-50 1x1** layers, named after the DLMC files they take their patterns
  from (``../shared/data/dlmc/rn50/magnitude_pruning/<s>/<name>.smtx.gz``):
  the bottleneck reduce (``bottleneck_1_*``) and expand (``bottleneck_3_*``)
  convolutions and the shortcut projections (``bottleneck_projection_*``),
  including the stride-2 projections of groups 2-4. ResNet-50 v1.5 as in the
  DLMC: the stride sits in the 3x3 convolution and in the shortcut projection,
  so the projection block's reduce runs at the *input* resolution.
* **CNN-non-static** (Kim, 2014): filter widths 3/4/5 over a 56-word sentence of
  300-d embeddings, 100 maps each, VALID. Laid out as a (1, 56) image with 300
  channels (kernel (1, w)).

A `Layer` knows how it is timed by the chain method
(``../shared/baselines/README.md``): ``'single'`` when its output can feed its
input (Cin == Cout, stride 1, SAME), ``'pair'`` when it is chained with its
mirror layer (Cout -> Cin, same kernel size), ``'none'`` when it cannot be
chained even in pairs (stride-2 projections, the sentence CNN's VALID
convolutions); those are compared on GPU kernel time (single-call time on CPU).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

MODELS = ("vgg16", "resnet50_1x1", "cnn_non_static")


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    model: str
    cin: int
    cout: int
    kernel: tuple[int, int]
    in_hw: tuple[int, int]
    stride: int = 1
    padding: str = "SAME"
    dlmc: str | None = None          # DLMC layer name of this layer's pattern
    mirror_dlmc: str | None = None   # DLMC layer name of the mirror's pattern (Cout -> Cin)
    scalable: bool = True            # spatial size follows --scale (not the sentence length)

    # ---- geometry -----------------------------------------------------------
    @property
    def out_hw(self) -> tuple[int, int]:
        if self.padding == "SAME":
            return tuple(-(-s // self.stride) for s in self.in_hw)
        return tuple((s - k) // self.stride + 1 for s, k in zip(self.in_hw, self.kernel))

    @property
    def out_pixels(self) -> int:
        return math.prod(self.out_hw)

    @property
    def taps(self) -> int:
        return math.prod(self.kernel) * self.cin

    @property
    def dense_weights(self) -> int:
        return self.taps * self.cout

    @property
    def is_1x1(self) -> bool:
        return self.kernel == (1, 1)

    @property
    def chain_kind(self) -> str:
        if self.stride != 1 or self.padding != "SAME":
            return "none"
        return "single" if self.cin == self.cout else "pair"

    @property
    def mirror(self) -> "Layer | None":
        """The layer Cout -> Cin (same kernel, SAME, stride 1) that pairs with this one."""
        if self.chain_kind != "pair":
            return None
        return dataclasses.replace(self, name=self.name + ".mirror", cin=self.cout, cout=self.cin,
                                   dlmc=self.mirror_dlmc, mirror_dlmc=self.dlmc)

    def dense_flops(self, batch: int) -> float:
        """2 * Cin * KH * KW * Cout * N * Ho * Wo."""
        return 2.0 * self.dense_weights * batch * self.out_pixels

    def scaled(self, scale: float) -> "Layer":
        """The same layer with its spatial size divided by ``scale`` (at least 1 pixel)."""
        if scale == 1 or not self.scalable:
            return self
        hw = tuple(max(1, int(round(s / scale))) for s in self.in_hw)
        if self.stride > 1:
            hw = tuple(max(self.stride, s) for s in hw)
        return dataclasses.replace(self, in_hw=hw)

    def input_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch,) + tuple(self.in_hw) + (self.cin,)

    def describe(self) -> str:
        k = "x".join(map(str, self.kernel))
        s = f"/s{self.stride}" if self.stride > 1 else ""
        return f"{self.cin}->{self.cout} {k}{s} @{self.in_hw[0]}x{self.in_hw[1]}"


# ---- VGG-16 -----------------------------------------------------------------

_VGG16 = [  # name, cin, cout, input size
    ("conv1_1", 3, 64, 224), ("conv1_2", 64, 64, 224),
    ("conv2_1", 64, 128, 112), ("conv2_2", 128, 128, 112),
    ("conv3_1", 128, 256, 56), ("conv3_2", 256, 256, 56), ("conv3_3", 256, 256, 56),
    ("conv4_1", 256, 512, 28), ("conv4_2", 512, 512, 28), ("conv4_3", 512, 512, 28),
    ("conv5_1", 512, 512, 14), ("conv5_2", 512, 512, 14), ("conv5_3", 512, 512, 14),
]

VGG16 = tuple(Layer(f"vgg.{n}", "vgg16", cin, cout, (3, 3), (hw, hw)) for n, cin, cout, hw in _VGG16)

# Han, Pool, Tran, Dally, "Learning both Weights and Connections for Efficient
# Neural Networks", NIPS 2015, Table 4: fraction of weights *remaining* after
# pruning, per VGG-16 convolution layer (the FC layers keep 1-4 %, not used here).
HAN2015_VGG16_DENSITY = {
    "conv1_1": 0.58, "conv1_2": 0.22, "conv2_1": 0.34, "conv2_2": 0.36,
    "conv3_1": 0.53, "conv3_2": 0.24, "conv3_3": 0.42,
    "conv4_1": 0.32, "conv4_2": 0.27, "conv4_3": 0.34,
    "conv5_1": 0.35, "conv5_2": 0.29, "conv5_3": 0.36,
}


def han_sparsity(layer_name: str) -> float:
    """Sparsity of a VGG-16 layer in the Han et al. (2015) profile ('vgg.conv3_2' or 'conv3_2')."""
    return round(1.0 - HAN2015_VGG16_DENSITY[layer_name.split(".")[-1]], 4)


# ---- ResNet-50 1x1 ----------------------------------------------------------

def _r50_layers() -> tuple[Layer, ...]:
    out = []
    for g in range(1, 5):
        c = 64 * 2 ** (g - 1)
        hw = 56 // 2 ** (g - 1)
        cin_block = 64 if g == 1 else 2 * c          # channels entering the group's first block
        hw_block = hw if g == 1 else 2 * hw          # resolution entering the group's first block
        # reduce (4c -> c) of a non-first block, paired with the same block's expand (c -> 4c)
        out.append(Layer(f"r50.g{g}.reduce", "resnet50_1x1", 4 * c, c, (1, 1), (hw, hw),
                         dlmc=f"bottleneck_1_block_group{g}_1_1",
                         mirror_dlmc=f"bottleneck_3_block_group{g}_1_1"))
        # reduce of the projection block, at the group's input resolution (v1.5: stride in the 3x3)
        out.append(Layer(f"r50.g{g}.proj_reduce", "resnet50_1x1", cin_block, c, (1, 1),
                         (hw_block, hw_block),
                         dlmc=f"bottleneck_1_block_group_projection_block_group{g}"))
        # shortcut projection cin_block -> 4c (stride 2 from group 2 on)
        out.append(Layer(f"r50.g{g}.shortcut", "resnet50_1x1", cin_block, 4 * c, (1, 1),
                         (hw_block, hw_block), stride=1 if g == 1 else 2,
                         dlmc=f"bottleneck_projection_block_group_projection_block_group{g}",
                         mirror_dlmc="bottleneck_1_block_group1_1_1" if g == 1 else None))
    return tuple(out)


RESNET50_1X1 = _r50_layers()

# Blocks per group of ResNet-50 (the first one carries the projection).
RESNET50_BLOCKS = (3, 4, 6, 3)


def resnet50_block_names(g: int, i: int) -> dict[str, str]:
    """DLMC names of block ``i`` (0 = projection block) of group ``g`` (1-4)."""
    if i == 0:
        return {"reduce": f"bottleneck_1_block_group_projection_block_group{g}",
                "expand": f"bottleneck_3_block_group_projection_block_group{g}",
                "shortcut": f"bottleneck_projection_block_group_projection_block_group{g}"}
    return {"reduce": f"bottleneck_1_block_group{g}_{i}_1", "expand": f"bottleneck_3_block_group{g}_{i}_1"}


# ---- CNN-non-static -----------------------------------------------------------

SENTENCE_LENGTH = 56
EMBEDDING = 300
FEATURE_MAPS = 100
CNN_WIDTHS = (3, 4, 5)
CNN_NON_STATIC = tuple(Layer(f"kim.w{w}", "cnn_non_static", EMBEDDING, FEATURE_MAPS, (1, w),
                             (1, SENTENCE_LENGTH), padding="VALID", scalable=False)
                       for w in CNN_WIDTHS)

ALL_LAYERS = {"vgg16": VGG16, "resnet50_1x1": RESNET50_1X1, "cnn_non_static": CNN_NON_STATIC}

# A few representative layers per model: the small CPU default.
QUICK = {
    "vgg16": ("vgg.conv3_2", "vgg.conv4_1", "vgg.conv5_1"),
    "resnet50_1x1": ("r50.g2.reduce", "r50.g3.shortcut"),
    "cnn_non_static": ("kim.w3",),
}


def select(models: Sequence[str], layers: str | Sequence[str] = "all") -> list[Layer]:
    """Layers of ``models`` ('all' for every model); ``layers`` is 'all', 'quick' or names."""
    if isinstance(models, str):
        models = [models]
    if "all" in models:
        models = list(MODELS)
    unknown = [m for m in models if m not in ALL_LAYERS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {MODELS} or 'all'")
    chosen = [l for m in models for l in ALL_LAYERS[m]]
    if layers == "all" or layers == ["all"]:
        return chosen
    if layers == "quick" or layers == ["quick"]:
        names = {n for m in models for n in QUICK[m]}
        return [l for l in chosen if l.name in names]
    names = [layers] if isinstance(layers, str) else list(layers)
    by_name = {l.name: l for l in chosen}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"unknown layer(s) {missing} for models {list(models)}; "
                         f"known: {sorted(by_name)}")
    return [by_name[n] for n in names]


# ---- precisions -------------------------------------------------------------

# mode -> (dtype name, precision of the dense XLA convolution). The sparse kernels
# compute in exact float32 arithmetic at every mode (float32 accumulation for
# bfloat16/float16), so float32_highest and float32 share one sparse measurement.
MODES = {
    "float32_highest": ("float32", "HIGHEST"),
    "float32": ("float32", "DEFAULT"),      # TF32 tensor cores on recent NVIDIA GPUs
    "bfloat16": ("bfloat16", "DEFAULT"),
    "float16": ("float16", "DEFAULT"),
}


# Short names of the modes in tables and figures.
MODE_LABELS = {"float32_highest": "f32 HIGHEST", "float32": "f32 default (TF32)", "bfloat16": "bf16",
               "float16": "f16"}


def mode_dtype(mode: str):
    import jax.numpy as jnp
    return jnp.dtype(MODES[mode][0])


def mode_precision(mode: str):
    from jax import lax
    return getattr(lax.Precision, MODES[mode][1])


def check_modes(modes: Sequence[str]) -> list[str]:
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown dtype mode(s) {bad}; choose from {list(MODES)}")
    return list(modes)


# ---- filters and ops ----------------------------------------------------------

DLMC_SPARSITIES = (0.7, 0.8, 0.9, 0.95, 0.98)
PATTERNS = ("magnitude", "dlmc", "uniform")


def unit_gain(filt):
    """The filter with every row rescaled to unit L2 norm (``chain_scale(row nnz)`` times
    unit-RMS values), so a chain of these convolutions keeps activations of order one
    (no overflow in float16, no decay to zero)."""
    import jax.numpy as jnp
    import numpy as np
    from jaxsparse.benchmark import chain_scale

    data = np.asarray(filt.data, np.float32)
    counts = np.diff(np.asarray(filt.indptr))
    rows = np.repeat(np.arange(filt.out_channels), counts)
    sq = np.bincount(rows, weights=data.astype(np.float64) ** 2, minlength=filt.out_channels)
    rms = np.sqrt(sq / np.maximum(counts, 1))
    scale = np.array([chain_scale(c) for c in counts]) / np.where(rms > 0, rms, 1.0)
    return filt.with_data(jnp.asarray((data * scale[rows]).astype(np.float32)))


def border_gain(layer: Layer) -> float:
    """1 / sqrt(mean fraction of a SAME, stride-1 kernel's taps that fall inside the map).

    Zero padding drops the taps outside the map, so on small maps (7x7, 4x4) a unit-gain
    filter still shrinks activations by this factor per layer; multiplying the weights by
    it keeps long chains at order one there too."""
    if layer.padding != "SAME" or layer.stride != 1:
        return 1.0
    frac = 1.0
    for size, k in zip(layer.in_hw, layer.kernel):
        lo = (k - 1) // 2
        inside = sum(min(size - 1, p - lo + k - 1) - max(0, p - lo) + 1 for p in range(size))
        frac *= inside / (size * k)
    return 1.0 / math.sqrt(frac)


def make_filter(layer: Layer, sparsity: float, pattern: str = "magnitude", seed: int = 0):
    """A float32 `SparseFilter` for ``layer`` at ``sparsity`` with unit gain per output channel
    (times `border_gain`).

    Returns ``(filter, pattern_used)``. ``pattern='dlmc'`` loads the layer's DLMC pattern
    when the layer has one and the file exists at that sparsity; otherwise it falls back to
    magnitude pruning and says so in ``pattern_used``.
    """
    import jaxsparse
    from jaxsparse.dlmc import dlmc_path

    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; choose from {PATTERNS}")
    used = pattern
    if pattern == "dlmc":
        if layer.dlmc and dlmc_path(layer.dlmc, sparsity).is_file():
            filt = jaxsparse.load_dlmc(layer.dlmc, sparsity, kernel_size=layer.kernel, seed=seed)
            if (filt.in_channels, filt.out_channels) != (layer.cin, layer.cout):
                raise ValueError(f"DLMC {layer.dlmc} is {filt.in_channels}->{filt.out_channels}, "
                                 f"layer {layer.name} is {layer.cin}->{layer.cout}")
            filt = unit_gain(filt)
            return filt.with_data(filt.data * border_gain(layer)), "dlmc"
        used = "magnitude (no dlmc)"
        pattern = "magnitude"
    filt = unit_gain(jaxsparse.random_filter(seed, layer.kernel, layer.cin, layer.cout, sparsity,
                                             pattern=pattern))
    return filt.with_data(filt.data * border_gain(layer)), used


def dense_kernel(layer: Layer, seed: int = 0):
    """A dense random HWIO kernel with unit gain per output channel (the unpruned layer)."""
    import jax.numpy as jnp
    import numpy as np
    from jaxsparse.benchmark import chain_scale

    rng = np.random.default_rng(seed + 7919)
    w = rng.standard_normal(layer.kernel + (layer.cin, layer.cout)).astype(np.float32)
    return jnp.asarray(w * (chain_scale(layer.taps) * border_gain(layer)))


def to_dense(filt):
    """The filter's dense float32 HWIO kernel, built with NumPy (fast for large layers)."""
    import jax.numpy as jnp
    import numpy as np

    indptr = np.asarray(filt.indptr)
    rows = np.repeat(np.arange(filt.out_channels), np.diff(indptr))
    w = np.zeros((filt.taps, filt.out_channels), np.float32)
    w[np.asarray(filt.indices), rows] = np.asarray(filt.data, np.float32)
    return jnp.asarray(w.reshape(filt.kernel_size + (filt.in_channels, filt.out_channels)))


def weight_bytes(layer: Layer, nnz: int, itemsize: int) -> tuple[int, int]:
    """(dense bytes, CSR bytes = values + int32 column indices + int32 row offsets)."""
    return layer.dense_weights * itemsize, nnz * (itemsize + 4) + (layer.cout + 1) * 4


def dense_conv(x, w, layer: Layer, precision, bias=None, relu: bool = False):
    """XLA's convolution for ``layer`` (NHWC, HWIO), optionally + bias and ReLU."""
    import jax
    from jax import lax

    y = lax.conv_general_dilated(x, w, (layer.stride,) * 2, layer.padding,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return jax.nn.relu(y) if relu else y


def tensor_core_ready(layer: Layer, mode: str) -> bool:
    """Whether `jaxsparse.tc_conv` (the tensor-core family) runs ``layer`` at ``mode``: at a
    precision that allows tensor cores (not float32_highest); any geometry."""
    from jaxsparse.tc_conv import tensor_core_ineligible
    return tensor_core_ineligible(mode_dtype(mode), mode_precision(mode)) is None


def tensor_core_op(layer: Layer, *filters):
    """``op(x, f)`` running `jaxsparse.tc_conv` for ``layer`` with the plan of whichever of
    ``filters`` (concrete; a layer and its mirror, which differ in shape) ``f`` is: the plans
    are built here, outside jit, where the patterns are known."""
    from jaxsparse.tc_conv import plan_for, tc_conv
    plans = {(f.in_channels, f.out_channels): plan_for(f) for f in filters if f is not None}
    return lambda x, f: tc_conv(x, f, plans[(f.in_channels, f.out_channels)], strides=layer.stride,
                                padding=layer.padding)


def sparse_conv(x, filt, layer: Layer, bias=None, relu: bool = False):
    """`jaxsparse.sparse_conv` for ``layer``, optionally with fused bias and ReLU."""
    import jaxsparse
    return jaxsparse.sparse_conv(x, filt, strides=layer.stride, padding=layer.padding, bias=bias,
                                 activation="relu" if relu else None)
