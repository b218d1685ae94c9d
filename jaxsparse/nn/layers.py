"""`SparseConv`: a Flax NNX convolution layer with an unstructured-sparse filter.

Constructor and call follow `flax.nnx.Conv` (HWIO kernel semantics,
channels-last inputs, any number of leading batch dimensions, promotion to
``dtype``). The filter is stored in `jaxsparse.SparseFilter` CSR form:

* ``self.data``: the nonzero values, an `nnx.Param` (trainable);
* ``self.indices``, ``self.indptr``: the sparsity structure, `SparseStructure`
  variables (not `nnx.Param`, so optimizers and ``nnx.Param`` filters skip them).

A layer may also hold a `jaxsparse.TensorCorePlan` of its pattern
(``self.tensor_core_plan``, static: part of the graph definition, not of the
state; `plan_tensor_cores`, or `sparsify(policy='auto')` where the tensor-core
kernel times fastest). Calls the plan fits then run `jaxsparse.tc_conv`
(any geometry; bf16/f16, or float32 at a precision allowing TF32; the plan's mma
k matching the computed dtype); every other call runs `sparse_conv`. `jaxsparse.nn.save` stores the plan with the layer.
"""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.nnx.nn import initializers

from jaxsparse.format import SUPPORTED_DTYPES, SparseFilter, magnitude_mask
from jaxsparse.geometry import PADDING_STRINGS as GEOMETRY_PADDING_STRINGS
from jaxsparse.geometry import (as_static_int, as_static_ints, dilated_size, is_scalar, normalize_ints,
                                padding_pairs)
from jaxsparse.ops import sparse_conv
from jaxsparse.options import canonical_precision, check_kernel, precision_from_json, precision_to_json
from jaxsparse.tc_conv import k_multiple_for, plan_for, tc_conv, tensor_core_ineligible
from jaxsparse.tc_plan import TensorCorePlan, TensorCorePlanError

default_kernel_init = initializers.lecun_normal()
default_bias_init = initializers.zeros_init()

# sparse_conv's padding strings, and those nnx.Conv handles by padding the input first.
PADDING_STRINGS = GEOMETRY_PADDING_STRINGS + ("CIRCULAR", "REFLECT", "CAUSAL")


class SparseStructure(nnx.Variable):
    """Non-trainable integer state describing a sparse filter's structure."""


def _as_tuple(value, n: int, name: str) -> tuple[int, ...]:
    """None (1), an int or `n` ints; floats, strings and bools raise (`geometry.normalize_ints`)."""
    return normalize_ints(1 if value is None else value, n, f"SparseConv: {name}")


def canonicalize_padding(padding, rank: int):
    """As `nnx.Conv`: a string (`PADDING_STRINGS`, any case; returned in upper case), an
    int, or ``rank`` ints / (low, high) pairs of ints (`geometry.padding_pairs`)."""
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in PADDING_STRINGS:
            raise ValueError(f"SparseConv: unsupported padding {padding!r}; use one of "
                             f"{PADDING_STRINGS} or explicit (low, high) pairs")
        if mode == "CAUSAL" and rank != 1:
            raise ValueError("Causal padding is only implemented for 1D convolutions.")
        return mode
    return padding_pairs(padding, rank, name="SparseConv: padding", int_per_dimension=True)


def layer_geometry(kernel_size, strides, padding, kernel_dilation):
    """(kernel_size, strides, padding, kernel_dilation) of a layer, checked and canonical: the
    one normalisation of the NNX and the Linen `SparseConv`. ``kernel_size``: an int (1-D)
    or 1 or 2 ints; ``strides``, ``kernel_dilation``: None, an int or one int per
    dimension (`geometry.normalize_ints`: never rounded); ``padding``: `canonicalize_padding`."""
    name = "SparseConv: kernel_size"
    if is_scalar(kernel_size):
        kernel_size = (as_static_int(kernel_size, name),)
    else:
        kernel_size = as_static_ints(kernel_size, name)
    if len(kernel_size) not in (1, 2):
        raise ValueError(f"SparseConv supports 1-D and 2-D kernels, got kernel_size={kernel_size}")
    if any(k < 1 for k in kernel_size):
        raise ValueError(f"SparseConv: kernel_size must be positive, got {kernel_size}")
    nd = len(kernel_size)
    return (kernel_size, _as_tuple(strides, nd, "strides"), canonicalize_padding(padding, nd),
            _as_tuple(kernel_dilation, nd, "kernel_dilation"))


def csr_from_mask(kernel: np.ndarray, mask: np.ndarray, dtype):
    """(data, indices, indptr) of an HWIO/WIO ``kernel`` keeping the entries where ``mask``.

    Unlike `SparseFilter.from_dense(sparsity=None)`, kept entries that happen to
    be zero stay in the structure (they remain trainable)."""
    kernel = np.asarray(kernel, np.float32)
    mask = np.broadcast_to(np.asarray(mask, bool), kernel.shape)
    cout = kernel.shape[-1]
    rows, rmask = kernel.reshape(-1, cout).T, mask.reshape(-1, cout).T
    counts = rmask.sum(axis=1)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    _, cols = np.nonzero(rmask)
    return rows[rmask].astype(dtype), cols.astype(np.int32), indptr


class SparseConv(nnx.Module):
    """Convolution with an unstructured-sparse filter, the sparse counterpart of `nnx.Conv`.

    Args:
      in_features, out_features, kernel_size, strides, padding, kernel_dilation,
        use_bias, dtype, param_dtype, precision, kernel_init, bias_init, rngs:
        as `nnx.Conv`. ``padding``: 'SAME', 'VALID', 'SAME_LOWER', 'CIRCULAR',
        'REFLECT', 'CAUSAL' (1-D; `PADDING_STRINGS`, any case), an int, or
        per-dimension ints / (low, high) pairs. Geometry is integers only
        (`layer_geometry`: never rounded).
        ``param_dtype`` must be float32, bfloat16 or float16. ``precision`` is
        passed to `jaxsparse.sparse_conv` (``HIGHEST``: exact float32, never
        TF32; `jaxsparse.options`).
      sparsity: fraction of the initial (``kernel_init``) weights pruned by
        magnitude (ignored when ``mask`` is given).
      mask: optional boolean mask of the kernel's shape: the nonzero pattern.
      activation: None or 'relu': applied after the bias, fused in the kernel
        (``__call__`` can override it per call).
      kernel_family: the static ``kernel`` option of `jaxsparse.sparse_conv`
        ('auto', or a forced family such as 'direct'); None: its default.
      input_dilation, feature_group_count: only the default 1 is supported.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int | tp.Sequence[int],
                 strides: int | tp.Sequence[int] | None = 1, *, padding="SAME",
                 input_dilation: int | tp.Sequence[int] | None = 1,
                 kernel_dilation: int | tp.Sequence[int] | None = 1, feature_group_count: int = 1,
                 use_bias: bool = True, mask=None, dtype=None, param_dtype=jnp.float32,
                 precision=None, kernel_init=default_kernel_init, bias_init=default_bias_init,
                 sparsity: float = 0.9, activation: str | None = None,
                 kernel_family: str | None = None, rngs: nnx.Rngs | None = None,
                 _weights=None, _nnz: int | None = None):
        # _weights=(kernel, mask, bias) and _nnz are private: used by from_dense / from_structure.
        self._setup(kernel_size, in_features, out_features, strides, padding, input_dilation,
                    kernel_dilation, feature_group_count, dtype, param_dtype, precision, activation,
                    kernel_family)
        if _nnz is not None:
            self.data = nnx.Param(jnp.zeros((_nnz,), self.param_dtype))
            self.indices = SparseStructure(jnp.zeros((_nnz,), jnp.int32))
            self.indptr = SparseStructure(jnp.zeros((self.out_features + 1,), jnp.int32))
            self.use_bias = bool(use_bias)
            self.bias = (nnx.Param(jnp.zeros((self.out_features,), self.param_dtype)) if use_bias
                         else nnx.data(None))
            return
        if _weights is None:
            if rngs is None:
                raise TypeError("SparseConv needs rngs= to initialise its kernel")
            kernel = kernel_init(rngs.params(), self.kernel_shape, param_dtype)
            bias = bias_init(rngs.params(), (out_features,), param_dtype) if use_bias else None
            if mask is None:
                mask = magnitude_mask(np.asarray(kernel, np.float32), sparsity)
            _weights = (np.asarray(kernel), mask, None if bias is None else np.asarray(bias))
        self._set_weights(*_weights)

    # ---- construction helpers ------------------------------------------------
    def _setup(self, kernel_size, in_features, out_features, strides, padding, input_dilation,
               kernel_dilation, feature_group_count, dtype, param_dtype, precision, activation,
               kernel_family):
        kernel_size, strides, padding, kernel_dilation = layer_geometry(kernel_size, strides, padding,
                                                                        kernel_dilation)
        if feature_group_count != 1:
            raise NotImplementedError("SparseConv: feature_group_count != 1 (grouped/depthwise "
                                      "convolution) is not supported")
        if _as_tuple(input_dilation, len(kernel_size), "input_dilation") != (1,) * len(kernel_size):
            raise NotImplementedError("SparseConv: input_dilation != 1 (transposed convolution) "
                                      "is not supported")
        if np.dtype(param_dtype) not in SUPPORTED_DTYPES:
            raise TypeError(f"SparseConv: param_dtype must be float32, bfloat16 or float16, got "
                            f"{np.dtype(param_dtype)}")
        if dtype is not None and np.dtype(dtype) not in SUPPORTED_DTYPES:
            raise TypeError(f"SparseConv: dtype must be None, float32, bfloat16 or float16, got "
                            f"{np.dtype(dtype)}")
        self.kernel_size = kernel_size
        self.in_features = as_static_int(in_features, "SparseConv: in_features")
        self.out_features = as_static_int(out_features, "SparseConv: out_features")
        self.kernel_shape = self.kernel_size + (self.in_features, self.out_features)
        self.strides = strides
        self.padding = padding
        self.input_dilation = 1
        self.kernel_dilation = kernel_dilation
        self.feature_group_count = 1
        self.dtype = dtype
        self.param_dtype = param_dtype
        canonical_precision(precision)  # a bad value fails here, not at the first call
        self.precision = precision
        self.kernel_family = None if kernel_family is None else check_kernel(kernel_family)
        self.tensor_core_plan: TensorCorePlan | None = None
        self.activation = activation
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")

    def _set_weights(self, kernel, mask, bias):
        data, indices, indptr = csr_from_mask(kernel, mask, np.dtype(self.param_dtype))
        self.data = nnx.Param(jnp.asarray(data))
        self.indices = SparseStructure(jnp.asarray(indices))
        self.indptr = SparseStructure(jnp.asarray(indptr))
        self.use_bias = bias is not None
        self.bias = nnx.Param(jnp.asarray(bias, self.param_dtype)) if bias is not None else nnx.data(None)
        self.sparse_filter  # validates the structure

    @classmethod
    def from_dense(cls, conv: nnx.Conv, sparsity: float | None = None, *, mask=None,
                   activation: str | None = None, kernel_family: str | None = None) -> "SparseConv":
        """A `SparseConv` computing ``conv`` with a pruned kernel.

        Exactly one way of choosing the kept weights: ``mask`` (a boolean array of
        the kernel's shape), ``sparsity`` (magnitude pruning of this layer), or
        neither (keep the kernel's nonzeros). ``conv.mask``, if set, is applied first.
        """
        if not isinstance(conv, nnx.Conv):
            raise TypeError(f"from_dense expects an nnx.Conv, got {type(conv).__name__}")
        if mask is not None and sparsity is not None:
            raise ValueError("pass either sparsity or mask, not both")
        if conv.promote_dtype is not nnx_dtypes.promote_dtype:
            raise NotImplementedError("SparseConv.from_dense: a custom promote_dtype is not supported")
        if conv.conv_general_dilated is not jax.lax.conv_general_dilated:
            raise NotImplementedError("SparseConv.from_dense: a custom conv_general_dilated is not supported")
        kernel = np.asarray(conv.kernel[...])
        if np.dtype(kernel.dtype) not in SUPPORTED_DTYPES:
            raise TypeError(f"SparseConv: kernel dtype {kernel.dtype} is not supported")
        if conv.mask is not None:
            kernel = kernel * np.asarray(conv.mask)
        if mask is not None:
            mask = np.asarray(mask, bool)
            if mask.shape != kernel.shape:
                raise ValueError(f"mask has shape {mask.shape}, the kernel {kernel.shape}")
        elif sparsity is not None:
            mask = magnitude_mask(kernel, sparsity)
        else:
            mask = kernel != 0
        bias = np.asarray(conv.bias[...]) if conv.bias is not None else None
        return cls(conv.in_features, conv.out_features, tuple(conv.kernel_size), conv.strides,
                   padding=conv.padding, input_dilation=conv.input_dilation,
                   kernel_dilation=conv.kernel_dilation, feature_group_count=conv.feature_group_count,
                   use_bias=bias is not None, dtype=conv.dtype, param_dtype=kernel.dtype,
                   precision=conv.precision, activation=activation, kernel_family=kernel_family,
                   _weights=(kernel, mask, bias))

    @classmethod
    def from_structure(cls, config: dict, nnz: int) -> "SparseConv":
        """An uninitialised layer (zeros, empty rows) with ``nnz`` slots, for loading checkpoints."""
        c = config
        return cls(c["in_features"], c["out_features"], tuple(c["kernel_size"]), tuple(c["strides"]),
                   padding=_padding_from_json(c["padding"]), kernel_dilation=tuple(c["kernel_dilation"]),
                   use_bias=c["use_bias"], dtype=c["dtype"] and np.dtype(c["dtype"]),
                   param_dtype=np.dtype(c["param_dtype"]), activation=c["activation"],
                   precision=precision_from_json(c.get("precision")), kernel_family=c.get("kernel_family"),
                   _nnz=int(nnz))

    def config(self) -> dict:
        """JSON-serialisable constructor arguments (for checkpoints)."""
        return dict(kernel_size=list(self.kernel_size), in_features=self.in_features,
                    out_features=self.out_features, strides=list(self.strides),
                    padding=self.padding if isinstance(self.padding, str) else
                    [list(p) for p in self.padding],
                    kernel_dilation=list(self.kernel_dilation), use_bias=self.use_bias,
                    dtype=None if self.dtype is None else np.dtype(self.dtype).name,
                    param_dtype=np.dtype(self.param_dtype).name, activation=self.activation,
                    precision=precision_to_json(self.precision), kernel_family=self.kernel_family)

    # ---- tensor cores --------------------------------------------------------------
    def plan_tensor_cores(self, plan: TensorCorePlan | None = None) -> TensorCorePlan:
        """Attaches a tensor-core plan of this layer's pattern (built for the mma k of the
        dtype it computes in, ``dtype`` or else ``param_dtype``, unless given) and returns it; see the module docstring. Needs the concrete
        pattern (not inside a transformation). Raises `TensorCorePlanError` for a plan of
        another pattern and ``ValueError`` for a layer the plan can never serve."""
        compute = jnp.dtype(self.param_dtype if self.dtype is None else self.dtype)
        why = tensor_core_ineligible(compute, self.precision)
        if why is not None:
            raise ValueError(f"SparseConv: no tensor-core plan for this layer: {why}")
        filt = self.sparse_filter.astype(compute)  # the plan's mma k follows the computed dtype
        plan = plan_for(filt) if plan is None else plan.check(filt)
        if plan.k_multiple != k_multiple_for(compute):
            raise TensorCorePlanError(f"the plan has k_multiple={plan.k_multiple}, the layer computes in "
                                      f"{compute.name} (k_multiple={k_multiple_for(compute)})")
        self.tensor_core_plan = plan
        return plan

    # ---- views ---------------------------------------------------------------
    @property
    def sparse_filter(self) -> SparseFilter:
        """The filter as a `SparseFilter` (validated when concrete)."""
        leaves = (self.data[...], self.indices[...], self.indptr[...])
        if all(not isinstance(a, jax.core.Tracer) for a in leaves):
            return SparseFilter(*leaves, kernel_size=self.kernel_size, in_channels=self.in_features,
                                out_channels=self.out_features)
        return SparseFilter(*leaves, kernel_size=self.kernel_size, in_channels=self.in_features,
                            out_channels=self.out_features, validate=False)

    @property
    def nnz(self) -> int:
        return int(self.data.shape[0])

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / float(np.prod(self.kernel_shape))

    @property
    def kernel(self) -> jax.Array:
        """The equivalent dense HWIO kernel (computed, not stored)."""
        return self.sparse_filter.todense()

    def to_dense(self, *, rngs: nnx.Rngs | None = None) -> nnx.Conv:
        """An `nnx.Conv` with the same (pruned) weights."""
        conv = nnx.Conv(self.in_features, self.out_features, self.kernel_size, self.strides,
                        padding=self.padding, kernel_dilation=self.kernel_dilation,
                        use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                        precision=self.precision, rngs=rngs or nnx.Rngs(0))
        conv.kernel[...] = self.kernel.astype(self.param_dtype)
        if self.use_bias:
            conv.bias[...] = self.bias[...]
        return conv

    # ---- call ----------------------------------------------------------------
    def __call__(self, inputs: jax.Array, *, activation: str | None | tp.Literal[False] = False) -> jax.Array:
        """Applies the convolution to channels-last ``inputs`` (like `nnx.Conv.__call__`).

        ``activation``: None or 'relu' to override the layer's ``activation``
        for this call (default: the layer's).
        """
        activation = self.activation if activation is False else activation
        return apply_sparse_conv(
            inputs, self.data[...], self.indices[...], self.indptr[...],
            self.bias[...] if self.use_bias else None, kernel_size=self.kernel_size,
            in_features=self.in_features, out_features=self.out_features, strides=self.strides,
            padding=self.padding, kernel_dilation=self.kernel_dilation, dtype=self.dtype,
            activation=activation, precision=self.precision, kernel_family=self.kernel_family,
            tensor_core_plan=self.tensor_core_plan)


def apply_sparse_conv(inputs, data, indices, indptr, bias, *, kernel_size, in_features, out_features,
                      strides, padding, kernel_dilation, dtype, activation, precision=None,
                      kernel_family=None, tensor_core_plan=None):
    """The `nnx.Conv`-style call shared by the NNX and Linen layers.

    ``padding`` is canonical (`canonicalize_padding`); leading batch dimensions
    are flattened and restored; inputs, values and bias are promoted to ``dtype``
    (or their common type) as `nnx.Conv` does. With a ``tensor_core_plan`` the calls it
    fits run `tc_conv` (see the module docstring).
    """
    nd = len(kernel_size)
    batch_dims = inputs.ndim - (nd + 1)
    if batch_dims < 0:
        raise ValueError(f"inputs of shape {inputs.shape} have too few dimensions for a "
                         f"{nd}-D convolution")
    if batch_dims != 1:
        batch_shape = inputs.shape[:batch_dims]
        inputs = jnp.reshape(inputs, (-1,) + inputs.shape[batch_dims:])

    inputs, data, bias = nnx_dtypes.promote_dtype((inputs, data, bias), dtype=dtype)
    if np.dtype(inputs.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(f"SparseConv computes in float32, bfloat16 or float16, not {inputs.dtype}; "
                        "set dtype= on the layer")

    if padding in ("CIRCULAR", "REFLECT"):
        dilated = [dilated_size(k, d) for k, d in zip(kernel_size, kernel_dilation)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        inputs = jnp.pad(inputs, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
        padding = "VALID"
    elif padding == "CAUSAL":
        left = dilated_size(kernel_size[0], kernel_dilation[0]) - 1
        inputs = jnp.pad(inputs, [(0, 0), (left, 0), (0, 0)])
        padding = "VALID"

    concrete = all(not isinstance(a, jax.core.Tracer) for a in (data, indices, indptr))
    filt = SparseFilter(data, indices, indptr, kernel_size=kernel_size, in_channels=in_features,
                        out_channels=out_features, validate=concrete)
    if (tensor_core_plan is not None and tensor_core_plan.k_multiple == k_multiple_for(inputs.dtype)
            and tensor_core_ineligible(inputs.dtype, precision) is None):
        # The plan is static; a traced pattern that differs from it is poisoned (NaN) by its packing.
        y = tc_conv(inputs, filt, tensor_core_plan, strides=strides, padding=padding, rhs_dilation=kernel_dilation,
                    bias=bias, activation=activation, precision=precision)
    else:
        y = sparse_conv(inputs, filt, strides=strides, padding=padding, rhs_dilation=kernel_dilation,
                        bias=bias, activation=activation, precision=precision, kernel=kernel_family)
    if batch_dims != 1:
        y = jnp.reshape(y, batch_shape + y.shape[1:])
    return y


def _padding_from_json(padding):
    return padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)


def conv_relu(conv, x):
    """``relu(conv(x))``, with the ReLU fused into the kernel when ``conv`` is a `SparseConv`."""
    if isinstance(conv, SparseConv):
        return conv(x, activation="relu")
    return jax.nn.relu(conv(x))
