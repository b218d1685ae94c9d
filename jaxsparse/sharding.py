"""Batch partitioning of the native custom calls under `jax.sharding`.

XLA cannot look inside an FFI custom call, so by default the SPMD partitioner
replicates its operands: a batch-sharded ``x`` would be all-gathered onto every
device and every device would work on the whole batch. The native lowerings go
through `jax.experimental.custom_partitioning` instead, described per primitive
by a `BatchRule`:

* sharding rule (Shardy): the batch dimension of the batched operands (and of
  the result, for the forward call) is one factor, so a batch sharding passes
  straight through; every other dimension is a *need-replication* factor;
* partition: each device runs the same custom call on its own batch shard with
  the whole (replicated) filter. If an operand also arrives sharded along H, W
  or C, those dimensions are gathered first (the kernels need whole images).
  A result that sums over the batch (the filter gradient) is summed over the
  devices (``psum``) after the local call.

The call's attributes do not mention the batch size and the kernels read shapes
from the buffers, so the per-device call needs nothing else. On one device, or
inside a fully manual `shard_map`, the plain call is emitted.

This sits *below* the primitives (in their lowerings): it knows nothing of
them, so `vmap`, abstract evaluation and the fallback lowering are unaffected.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class BatchRule:
    """How one custom call partitions along the batch."""
    sharding_rule: str                  # Shardy einsum-like rule over the operands and the result
    need_replication: tuple[str, ...]   # every factor but the batch
    batch_operands: tuple[int, ...]     # operands whose dimension 0 is the batch
    sums_batch: bool                    # the result sums over the batch (no batch dimension)


@dataclasses.dataclass(frozen=True)
class NativeCall:
    """One FFI custom call: target, attributes (hashable), result type; callable on operands."""
    target: str
    attributes: tuple                   # ((name, int | tuple of ints), ...)
    rule: BatchRule
    result_shape: tuple[int, ...]       # the global result shape
    result_dtype: str

    def __call__(self, *operands):
        shape = self.result_shape
        if not self.rule.sums_batch:  # a local batch shard gives a local result shard
            shape = (operands[0].shape[0],) + tuple(shape[1:])
        attrs = {k: np.asarray(v, np.int64) if isinstance(v, tuple) else np.int64(v)
                 for k, v in self.attributes}
        result = jax.ShapeDtypeStruct(shape, np.dtype(self.result_dtype))
        return jax.ffi.ffi_call(self.target, result)(*operands, **attrs)


def _batch_axes(sharding):
    """The mesh axes that shard dimension 0 of an operand (None: not sharded)."""
    spec = getattr(sharding, "spec", None)
    if spec is None or len(spec) == 0:
        return None
    return spec[0]


def _result_spec(call: NativeCall, batch):
    return P() if call.rule.sums_batch else P(batch)


def _infer_sharding(call, mesh, arg_shapes, result_shape):
    return NamedSharding(mesh, _result_spec(call, _batch_axes(arg_shapes[0].sharding)))


def _partition(call, mesh, arg_shapes, result_shape):
    batch = _batch_axes(arg_shapes[0].sharding)
    arg_shardings = tuple(NamedSharding(mesh, P(batch) if i in call.rule.batch_operands else P())
                          for i in range(len(arg_shapes)))

    def lower(*operands):
        out = call(*operands)
        if call.rule.sums_batch and batch is not None:
            out = jax.lax.psum(out, batch)  # each device summed only its own images
        return out

    return mesh, lower, NamedSharding(mesh, _result_spec(call, batch)), arg_shardings


def _def_partition(rule: BatchRule):
    # custom_partitioning keeps one rule per function, so each BatchRule gets its own copy.
    fn = custom_partitioning(lambda call, *operands: call(*operands), static_argnums=(0,))
    fn.def_partition(infer_sharding_from_operands=_infer_sharding, partition=_partition,
                     sharding_rule=rule.sharding_rule, need_replication_factors=rule.need_replication)
    return fn


_PARTITIONED: dict[BatchRule, object] = {}


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


def lower_native_call(ctx, target: str, rule: BatchRule, attributes: dict, *operands):
    """Lowers the FFI call ``target`` on ``operands``, partitioned along the batch where
    the computation spans several devices. ``attributes``: name -> int or tuple of ints."""
    aval = ctx.avals_out[0]
    call = NativeCall(target, tuple(sorted(attributes.items())), rule, tuple(aval.shape),
                      np.dtype(aval.dtype).name)
    if _is_partitioned(ctx):
        if rule not in _PARTITIONED:
            _PARTITIONED[rule] = _def_partition(rule)
        fn = functools.partial(_PARTITIONED[rule], call)
    else:
        fn = call
    return mlir.lower_fun(fn, multiple_results=False)(ctx, *operands)


def require_devices_during_lowering(prim) -> None:
    """Makes jit lower computations holding ``prim`` with the concrete device
    assignment, which `custom_partitioning` needs to build the partitioned call
    (as JAX does for `custom_partitioning` itself)."""
    try:  # a private hook; without it the call is still correct, only not partitioned
        from jax._src import dispatch
        dispatch.prim_requires_devices_during_lowering.add(prim)
    except (ImportError, AttributeError) as e:  # pragma: no cover - depends on the JAX version
        import warnings
        warnings.warn(f"jaxsparse: cannot mark {prim} for device-aware lowering ({e}); "
                      "batch-sharded inputs will be gathered", RuntimeWarning)


def output_sharding_kwargs(x, *, batched: bool = True, ndim: int | None = None) -> dict:
    """``sharding=`` for a result's abstract value under explicit sharding.

    With `AxisType.Explicit` mesh axes the sharding is part of the type. A
    ``batched`` result keeps ``x``'s batch sharding (the other dimensions are
    replicated), so code after the call stays batch-sharded instead of being
    typed (and gathered) as replicated; otherwise the result (of rank ``ndim``)
    is replicated. Empty when ``x`` carries no such sharding."""
    sharding = getattr(x, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or not hasattr(sharding, "update"):
        return {}
    if batched:
        new_spec = P(spec[0] if len(spec) else None, *([None] * (x.ndim - 1)))
    else:
        new_spec = P(*([None] * ndim))
    try:
        return {"sharding": sharding.update(spec=new_spec)}
    except Exception:  # pragma: no cover - unusual sharding types
        return {}
