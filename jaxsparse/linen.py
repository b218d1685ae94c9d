"""`jaxsparse.linen.SparseConv`: a Flax Linen module over the same sparse op.

Variables: ``params/data`` (the nonzero values, trainable), ``params/bias``,
and the structure ``sparse_structure/indices`` and ``sparse_structure/indptr``
(a separate, non-trainable collection, like ``batch_stats``). At init the
kernel is drawn with ``kernel_init`` and magnitude-pruned to
``round((1 - sparsity) * size)`` nonzeros (a static count, so init also works
under `jax.jit`). Use `variables_from_dense` to start from trained dense weights.
"""

from __future__ import annotations

import math
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxsparse.nn.layers import apply_sparse_conv, csr_from_mask, layer_geometry
from jaxsparse.format import magnitude_mask

STRUCTURE = "sparse_structure"


def _csr_top_k(kernel, nnz: int):
    """CSR leaves keeping the ``nnz`` largest |w| of an HWIO kernel (traceable)."""
    cout = kernel.shape[-1]
    rows = kernel.reshape(-1, cout).T                      # (Cout, taps)
    taps = rows.shape[1]
    _, keep = jax.lax.top_k(jnp.abs(rows.astype(jnp.float32)).ravel(), nnz)
    mask = jnp.zeros(rows.size, bool).at[keep].set(True)
    (pos,) = jnp.nonzero(mask, size=nnz)                  # row-major: rows, then columns ascending
    counts = mask.reshape(cout, taps).sum(axis=1)
    indptr = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
    return rows.ravel()[pos], (pos % taps).astype(jnp.int32), indptr


class SparseConv(nn.Module):
    """Linen convolution with an unstructured-sparse filter (fields as `flax.linen.Conv`).

    Geometry (``kernel_size``, ``strides``, ``padding``, ``kernel_dilation``) takes the
    NNX layer's rules (`jaxsparse.nn.layers.layer_geometry`): integers only, never rounded
    (a float or bool raises ``TypeError`` when the module is first called)."""
    features: int
    kernel_size: int | tp.Sequence[int]
    strides: int | tp.Sequence[int] = 1
    padding: tp.Any = "SAME"
    kernel_dilation: int | tp.Sequence[int] = 1
    use_bias: bool = True
    dtype: tp.Any = None
    param_dtype: tp.Any = jnp.float32
    precision: tp.Any = None  # as linen.Conv (jaxsparse.options): HIGHEST keeps float32 exact
    kernel_init: tp.Callable = nn.initializers.lecun_normal()
    bias_init: tp.Callable = nn.initializers.zeros_init()
    sparsity: float = 0.9
    activation: str | None = None
    kernel_family: str | None = None  # the static kernel option of sparse_conv (None: its default)

    @nn.compact
    def __call__(self, inputs, activation: str | None | tp.Literal[False] = False):
        # the NNX layer's checks: integers only, never rounded
        ks, strides, padding, dilation = layer_geometry(self.kernel_size, self.strides, self.padding,
                                                        self.kernel_dilation)
        cin = inputs.shape[-1]
        shape = ks + (cin, self.features)
        nnz = int(round((1.0 - float(self.sparsity)) * math.prod(shape)))
        init = {}
        if self.has_variable("params", "data"):  # e.g. from variables_from_dense: any nnz
            nnz = int(self.get_variable("params", "data").shape[0])
        else:
            dense = self.kernel_init(self.make_rng("params"), shape, self.param_dtype)
            init = dict(zip(("data", "indices", "indptr"), _csr_top_k(dense, nnz)))
        # (Linen also evaluates a param's init abstractly at apply time, to check shapes)
        data = self.param("data", lambda _: init["data"] if init else
                          jnp.zeros((nnz,), self.param_dtype))
        indices = self.variable(STRUCTURE, "indices", lambda: init["indices"]).value
        indptr = self.variable(STRUCTURE, "indptr", lambda: init["indptr"]).value
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        return apply_sparse_conv(
            inputs, data, indices, indptr, bias, kernel_size=ks, in_features=cin,
            out_features=self.features, strides=strides, padding=padding, kernel_dilation=dilation,
            dtype=self.dtype, activation=self.activation if activation is False else activation,
            precision=self.precision, kernel_family=self.kernel_family)


def variables_from_dense(kernel, bias=None, *, sparsity: float | None = None, mask=None, param_dtype=None):
    """``{'params': ..., 'sparse_structure': ...}`` for `SparseConv` from a dense HWIO kernel
    (e.g. a trained `linen.Conv`'s), pruned by ``mask``, by magnitude to ``sparsity``, or
    keeping its nonzeros."""
    kernel = np.asarray(kernel)
    if mask is None:
        mask = magnitude_mask(kernel, sparsity) if sparsity is not None else kernel != 0
    data, indices, indptr = csr_from_mask(kernel, mask, np.dtype(param_dtype or kernel.dtype))
    params = {"data": jnp.asarray(data)}
    if bias is not None:
        params["bias"] = jnp.asarray(bias)
    return {"params": params, STRUCTURE: {"indices": jnp.asarray(indices), "indptr": jnp.asarray(indptr)}}
