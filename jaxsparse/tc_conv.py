"""Tensor-core sparse convolution over a `TensorCorePlan` (issue 14; experimental).

``tc_conv(x, filter)`` computes `jaxsparse.sparse_conv`'s convolution (any kernel size,
strides, padding, dilation; NHWC / NWC) on the GPU with tensor cores: the filter's output
channels in groups of 16 (the plan's clustering), each group's union of nonzero columns
(tap, input channel) gathered from shared memory, ``mma.sync`` with float32 accumulation.
The default CUDA design ('chunked', `DESIGNS`) is direct: it streams each filter tap's
input pixels through shared memory, with no im2col; the first design ('slab') takes 1x1
stride-1 unpadded convolutions only. ``tc_conv1x1(x, filter)`` is the 1x1 case for any
``(..., Cin)`` input. float32 inputs use TF32 products, so ``precision=HIGHEST`` (exact
float32) is refused; bfloat16/float16 products are exact at every precision. `sparse_conv`
never chooses it; a `jaxsparse.nn.SparseConv` layer holding a plan
(`SparseConv.plan_tensor_cores`, or `sparsify(policy='auto')` where it times fastest) runs
it for the calls `tensor_core_ineligible` allows. Differentiable: the derivative is
computed by XLA from the plan's dense kernel (a custom JVP; the kernel itself has no
derivative). On other platforms it computes the plan's dense kernel with XLA (the same
result up to rounding). The union semantics differ from ``sparse_conv`` for non-finite
inputs: see `jaxsparse.tc_plan`.
"""

from __future__ import annotations

import collections
import math

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from jaxsparse import geometry, options
from jaxsparse.format import SparseFilter
from jaxsparse.lowering import conv_attributes
from jaxsparse.ops import _check_kernel_fits, _relu_flag
from jaxsparse.reference import dense_conv_nhwc
from jaxsparse.tc_plan import TensorCorePlan, TensorCorePlanError, _filter_fingerprint, tensor_core_plan

TARGET = "jaxsparse_tc_spmm"
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# The CUDA kernel designs (cuda/gpu/sparse_conv_tensorcore.h, TensorCoreDesign):
# 'slab' stages all Cin channels of a pixel tile (the first design; 1x1 stride 1 only);
# 'chunked' streams the (tap, Cin) columns in chunks, a group of 16 channels per warp, 128
# output channels per block.
DESIGNS = {"slab": 1, "chunked": 2}
DEFAULT_DESIGN = "chunked"
# Output channels of a chunked block: a plan clustered within windows of this many channels
# lets the block write one contiguous run of each pixel's channels.
BLOCK_CHANNELS = 128
DEFAULT_WINDOW = BLOCK_CHANNELS


def k_multiple_for(dtype) -> int:
    """The mma k of a dtype: 8 for TF32 (float32 inputs), 16 for bfloat16/float16."""
    return 8 if jnp.dtype(dtype) == jnp.float32 else 16


_PLANS: "collections.OrderedDict[tuple, TensorCorePlan]" = collections.OrderedDict()
_PLAN_CACHE_SIZE = 64


def plan_for(filt: SparseFilter, window: int = DEFAULT_WINDOW) -> TensorCorePlan:
    """The tensor-core plan of a concrete filter, for its dtype's mma k, clustered within
    ``window`` output channels (0: all; see `tensor_core_plan`): built once per sparsity
    pattern and window (cached by the pattern's fingerprint, the last 64)."""
    if isinstance(filt.indices, jax.core.Tracer) or isinstance(filt.indptr, jax.core.Tracer):
        raise TensorCorePlanError("the tensor-core plan needs a concrete sparsity pattern: build it "
                                  "outside jit with plan_for(filter) and pass it as tc_conv(x, f, plan)")
    k = k_multiple_for(filt.data.dtype)
    key = (_filter_fingerprint(filt), k, int(window))
    plan = _PLANS.get(key)
    if plan is None:
        plan = tensor_core_plan(filt, rows=16, k_multiple=k, window=window)
        _PLANS[key] = plan
        while len(_PLANS) > _PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


def _default_plan(filt: SparseFilter, design: str) -> TensorCorePlan:
    """`plan_for` with the window the design gains from: 128 channels for 'chunked'
    (contiguous block outputs), none for 'slab' (a smaller union)."""
    return plan_for(filt, window=DEFAULT_WINDOW if design == "chunked" else 0)


def kernel_window(plan: TensorCorePlan) -> int:
    """The chunked kernel's ``window`` attribute: `BLOCK_CHANNELS` when each block's groups hold
    one contiguous run of channels (a plan windowed to it or to a divisor of it, or Cout within
    one block), else 0."""
    contiguous = plan.window and BLOCK_CHANNELS % plan.window == 0  # windows tile each block
    return BLOCK_CHANNELS if contiguous or plan.out_channels <= BLOCK_CHANNELS else 0


def tf32_forbidden(dtype, precision) -> bool:
    """Whether tensor cores may not run this call: float32 at ``HIGHEST`` (they would use TF32)."""
    return jnp.dtype(dtype) == jnp.float32 and options.canonical_precision(precision) == lax.Precision.HIGHEST


def tensor_core_ineligible(dtype, precision) -> str | None:
    """Why a convolution cannot run on `tc_conv` (None: it can): float32, bfloat16 or float16,
    and for float32 at a precision that allows TF32 (not ``HIGHEST``). Any geometry."""
    dt = jnp.dtype(dtype)
    if dt not in map(jnp.dtype, _DTYPES):
        return f"dtype {dt} is not float32, bfloat16 or float16"
    if tf32_forbidden(dt, precision):
        return "float32 at precision HIGHEST (tensor cores would use TF32)"
    return None


def _check(x, filt: SparseFilter, plan: TensorCorePlan, bias, precision, design, tile_pixels):
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {sorted(DESIGNS)}, got {design!r}")
    if tile_pixels not in (None, 16, 32, 64):
        raise ValueError(f"tile_pixels must be None, 16, 32 or 64, got {tile_pixels!r}")
    if tile_pixels is not None and design != "chunked":
        raise ValueError(f"tile_pixels applies to design='chunked', not {design!r}")
    dt = jnp.dtype(x.dtype)
    if dt not in map(jnp.dtype, _DTYPES):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {dt}")
    if jnp.dtype(filt.data.dtype) != dt:
        raise TypeError(f"filter dtype {filt.data.dtype} differs from x dtype {dt}")
    if x.ndim < 2 or x.shape[-1] != filt.in_channels:
        raise ValueError(f"x must end in Cin = {filt.in_channels} channels, got shape {x.shape}")
    if plan.rows != 16 or plan.k_multiple != k_multiple_for(dt):
        raise ValueError(f"the plan must have rows=16 and k_multiple={k_multiple_for(dt)} for {dt}, "
                         f"got rows={plan.rows}, k_multiple={plan.k_multiple}")
    if bias is not None and (jnp.shape(bias) != (filt.out_channels,) or jnp.dtype(bias.dtype) != dt):
        raise ValueError(f"bias must be ({filt.out_channels},) of dtype {dt}")
    if tf32_forbidden(dt, precision):
        raise ValueError("tensor-core convolutions use TF32 products for float32 inputs, which "
                         "precision=HIGHEST forbids: use sparse_conv for exact float32, or precision=None/'default'")
    if plan.col_offsets[-1] > np.iinfo(np.int32).max // 16:
        raise ValueError("the plan is too large for 32-bit tile offsets")


def _tc_conv2d(x, filt: SparseFilter, plan: TensorCorePlan, *, kernel_hw, strides, pads, dilation, bias, relu,
               design, tile_pixels):
    """The kernel call on NHWC ``x`` (2-D geometry, `geometry.as_2d` of a 1-D one; explicit padding
    pairs; checked operands):
    the CUDA target on GPUs, elsewhere XLA's convolution with the plan's dense kernel; a custom
    JVP differentiates it through that dense kernel."""
    packed, _ = plan.pack(filt)  # NaN-poisoned for a traced filter of another pattern
    out_shape = geometry.conv_output_shape(x.shape, kernel_hw, strides, pads, dilation, filt.out_channels)
    columns = jnp.asarray(plan.columns, jnp.int32)
    col_offsets = jnp.asarray(plan.col_offsets.astype(np.int32))
    channels = jnp.asarray(plan.channels.reshape(-1), jnp.int32)
    b = jnp.zeros((0,), x.dtype) if bias is None else bias
    attrs = {k: np.asarray(v, np.int64) for k, v in conv_attributes(kernel_hw, strides, pads, dilation).items()}

    def on_cuda(x, packed, b):
        call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(out_shape, x.dtype))
        return call(x, packed, columns, col_offsets, channels, b, **attrs, relu=np.int64(relu),
                    design=np.int64(DESIGNS[design]), window=np.int64(kernel_window(plan)),
                    tile_pixels=np.int64(tile_pixels or 0))

    def elsewhere(x, packed, b, relu=relu):  # the plan's dense kernel
        kernel = plan.unpack(packed).reshape(kernel_hw + (filt.in_channels, filt.out_channels))
        return dense_conv_nhwc(x, kernel, b, strides=strides, padding=pads, dilation=dilation, relu=relu)

    @jax.custom_jvp
    def apply(x, packed, b):
        if math.prod(out_shape) == 0 or x.size == 0:
            return elsewhere(x, packed, b)
        return lax.platform_dependent(x, packed, b, cuda=on_cuda, default=elsewhere)

    @apply.defjvp
    def apply_jvp(primals, tangents):
        # The derivative by XLA from the plan's dense kernel: linear in the tangents (so
        # reverse mode transposes it), masked by the fused ReLU where it is active.
        (x, packed, b), (dx, dpacked, db) = primals, tangents
        y = apply(x, packed, b)
        dy = elsewhere(dx, packed, db, relu=False) + elsewhere(x, dpacked, jnp.zeros_like(db), relu=False)
        return y, (jnp.where(y > 0, dy, jnp.zeros_like(dy)) if relu else dy)

    return apply(x, packed, b)


def tc_conv1x1(x, filt: SparseFilter, plan: TensorCorePlan | None = None, *, bias=None,
               activation: str | None = None, precision=None, design: str = DEFAULT_DESIGN,
               tile_pixels: int | None = None):
    """1x1 sparse convolution of NHWC (or NWC, or any ``(..., Cin)``) ``x`` on tensor cores;
    see the module. ``design``: the CUDA kernel, one of `DESIGNS` (any plan runs on either);
    ``tile_pixels``: the chunked kernel's pixels per block (16, 32 or 64; None: its own
    choice), a benchmarking knob."""
    x = jnp.asarray(x)
    if not isinstance(filt, SparseFilter):
        raise TypeError(f"filter must be a SparseFilter, got {type(filt).__name__}")
    if tuple(filt.kernel_size) not in ((1, 1), (1,)):
        raise ValueError(f"tc_conv1x1 takes 1x1 filters, got kernel_size {filt.kernel_size}: use tc_conv")
    plan = _default_plan(filt, design) if plan is None else plan
    _check(x, filt, plan, bias, precision, design, tile_pixels)
    pixels = math.prod(x.shape[:-1])
    y = _tc_conv2d(x.reshape(1, 1, pixels, filt.in_channels), filt, plan, kernel_hw=(1, 1), strides=(1, 1),
                   pads=((0, 0), (0, 0)), dilation=(1, 1), bias=bias, relu=_relu_flag(activation), design=design,
                   tile_pixels=tile_pixels)
    return y.reshape(x.shape[:-1] + (filt.out_channels,))


def tc_conv(x, filt: SparseFilter, plan: TensorCorePlan | None = None, *, strides=1, padding="SAME",
            rhs_dilation=1, bias=None, activation: str | None = None, precision=None,
            design: str = DEFAULT_DESIGN, tile_pixels: int | None = None):
    """`jaxsparse.sparse_conv`'s convolution (same arguments and layouts: NHWC / NWC, padding
    'SAME', 'VALID' or pairs) on tensor cores, over ``plan`` (the filter's `plan_for` if None).
    The chunked design runs any geometry directly; the slab design 1x1, stride-1, unpadded
    ones only. ``design`` and ``tile_pixels`` as for `tc_conv1x1`. Non-finite inputs follow
    the union semantics of `jaxsparse.tc_plan`."""
    if not isinstance(filt, SparseFilter):
        raise TypeError(f"filter must be a SparseFilter, got {type(filt).__name__}")
    x = jnp.asarray(x)
    ndim = len(filt.kernel_size)
    if x.ndim != ndim + 2:
        raise ValueError(f"x must have rank {ndim + 2} (batch, {ndim} spatial axes, channels) for a "
                         f"{ndim}-D filter, got shape {x.shape}")
    strides = geometry.normalize_ints(strides, ndim, "strides")
    dilation = geometry.normalize_ints(rhs_dilation, ndim, "rhs_dilation")
    pads = geometry.normalize_padding(padding, x.shape[1:-1], filt.kernel_size, strides, dilation)
    plan = _default_plan(filt, design) if plan is None else plan
    _check(x, filt, plan, bias, precision, design, tile_pixels)
    if design != "chunked" and not geometry.is_pointwise(filt.kernel_size, strides, pads):
        raise ValueError(f"design {design!r} takes 1x1, stride-1, unpadded convolutions only: use 'chunked'")
    if x.size:
        _check_kernel_fits(x.shape[1:-1], filt.kernel_size, pads, dilation)
    kernel_hw, strides, pads, dilation = geometry.as_2d(filt.kernel_size, strides, pads, dilation)
    y = _tc_conv2d(x[:, None] if ndim == 1 else x, filt, plan, kernel_hw=kernel_hw, strides=strides, pads=pads,
                   dilation=dilation, bias=bias, relu=_relu_flag(activation), design=design, tile_pixels=tile_pixels)
    return y[:, 0] if ndim == 1 else y  # 1-D: images one pixel high
