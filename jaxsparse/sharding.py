"""Batch partitioning of the `sparse_conv` custom call under `jax.sharding`.

XLA cannot look inside an FFI custom call, so by default the SPMD partitioner
replicates its operands: a batch-sharded ``x`` would be all-gathered onto every
device and every device would convolve the whole batch. Here the native
lowering goes through `jax.experimental.custom_partitioning` instead:

* sharding rule (Shardy): the batch dimension of ``x`` and of the result are one
  factor, so a batch sharding passes straight through; every other dimension
  (spatial, channels, the filter's ``data``/``indices``/``indptr``, the bias) is
  a *need-replication* factor;
* partition: each device runs the same custom call on its own batch shard with
  the whole (replicated) filter. If ``x`` also arrives sharded along H, W or C,
  those dimensions are gathered first (the kernel needs whole images).

The call's attributes do not mention the batch size and the kernels read shapes
from the buffers, so the per-device call needs nothing else. On one device, or
inside a fully manual `shard_map`, `custom_partitioning` inlines the plain call.

This sits *below* the primitive (in its lowering), so `vmap`'s batching rule,
abstract evaluation and the fallback lowering are unaffected.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsparse.geometry import output_size

# operands: x (N,H,W,C), data (nnz,), indices (nnz,), indptr (Cout+1,), bias (Cout,) or (0,)
# result:   (N, OH, OW, Cout)
SHARDING_RULE = "n h w c, z, z, p, b -> n oh ow o"
NEED_REPLICATION = ("h", "w", "c", "z", "p", "b", "oh", "ow", "o")


def _ffi_call(x, data, indices, indptr, bias, params):
    """The raw FFI custom call (no primitive, so lowering it does not recurse)."""
    from jaxsparse.primitive import conv_attributes
    p = dict(params)
    n, h, w, _ = x.shape
    out_h = output_size(h, p["kernel_size"][0], p["strides"][0], p["padding"][0], p["dilation"][0])
    out_w = output_size(w, p["kernel_size"][1], p["strides"][1], p["padding"][1], p["dilation"][1])
    out = jax.ShapeDtypeStruct((n, out_h, out_w, indptr.shape[0] - 1), x.dtype)
    return jax.ffi.ffi_call(p["target"], out)(
        x, data, indices, indptr, bias, relu=np.int64(p["relu"]),
        **conv_attributes(p["kernel_size"], p["strides"], p["padding"], p["dilation"]))


@functools.partial(custom_partitioning, static_argnums=(5,))
def _partitioned_call(x, data, indices, indptr, bias, params):
    return _ffi_call(x, data, indices, indptr, bias, params)


def _batch_axes(sharding):
    """The mesh axes that shard dimension 0 of an operand (None: not sharded)."""
    spec = getattr(sharding, "spec", None)
    if spec is None or len(spec) == 0:
        return None
    return spec[0]


def _infer_sharding(params, mesh, arg_shapes, result_shape):
    return NamedSharding(mesh, P(_batch_axes(arg_shapes[0].sharding)))


def _partition(params, mesh, arg_shapes, result_shape):
    batch = _batch_axes(arg_shapes[0].sharding)
    arg_shardings = (NamedSharding(mesh, P(batch)),) + tuple(NamedSharding(mesh, P()) for _ in range(4))

    def lower(x, data, indices, indptr, bias):
        return _ffi_call(x, data, indices, indptr, bias, params)

    return mesh, lower, NamedSharding(mesh, P(batch)), arg_shardings


_partitioned_call.def_partition(
    infer_sharding_from_operands=_infer_sharding, partition=_partition,
    sharding_rule=SHARDING_RULE, need_replication_factors=NEED_REPLICATION)


def _is_partitioned(ctx) -> bool:
    """Whether this lowering is for several devices under the SPMD partitioner."""
    try:  # a private module: if it moves, fall back to the plain (replicated) call
        from jax._src import sharding_impls
    except ImportError:  # pragma: no cover - depends on the JAX version
        return False
    axis_context = ctx.module_context.axis_context
    if isinstance(axis_context, sharding_impls.ShardingContext):
        return axis_context.num_devices > 1 and axis_context.device_assignment is not None
    if isinstance(axis_context, sharding_impls.SPMDAxisContext):
        return set(axis_context.manual_axes) != set(axis_context.mesh.axis_names)
    return False


def batch_partitioned_lowering(target: str):
    """A lowering rule for the primitive to the native FFI ``target``, partitioned along the batch."""
    def lowering(ctx, x, data, indices, indptr, bias, *, kernel_size, strides, padding, dilation, relu):
        params = (("target", target), ("kernel_size", tuple(kernel_size)), ("strides", tuple(strides)),
                  ("padding", tuple(map(tuple, padding))), ("dilation", tuple(dilation)),
                  ("relu", bool(relu)))
        call = _partitioned_call if _is_partitioned(ctx) else _ffi_call
        return mlir.lower_fun(lambda *a: call(*a, params), multiple_results=False)(
            ctx, x, data, indices, indptr, bias)
    return lowering


def require_devices_during_lowering(prim) -> None:
    """Makes jit lower computations holding ``prim`` with the concrete device
    assignment, which `custom_partitioning` needs to build the partitioned call
    (as JAX does for `custom_partitioning` itself)."""
    try:  # a private hook; without it the call is still correct, only not partitioned
        from jax._src import dispatch
        dispatch.prim_requires_devices_during_lowering.add(prim)
    except (ImportError, AttributeError) as e:  # pragma: no cover - depends on the JAX version
        import warnings
        warnings.warn(f"jaxsparse: cannot mark sparse_conv for device-aware lowering ({e}); "
                      "batch-sharded inputs will be gathered", RuntimeWarning)


def output_sharding_kwargs(x) -> dict:
    """``sharding=`` for the result's abstract value under explicit sharding.

    With `AxisType.Explicit` mesh axes the sharding is part of the type: the
    result keeps ``x``'s batch sharding (the other dimensions are replicated),
    so code after the call stays batch-sharded instead of being typed (and
    gathered) as replicated. Empty when ``x`` carries no such sharding."""
    sharding = getattr(x, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or not hasattr(sharding, "update"):
        return {}
    batch = spec[0] if len(spec) else None
    try:
        return {"sharding": sharding.update(spec=P(batch, *([None] * (x.ndim - 1))))}
    except Exception:  # pragma: no cover - unusual sharding types
        return {}
