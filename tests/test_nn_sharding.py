"""Data-parallel inference with the batch sharded over several devices.

On the CPU: 4 host devices. The device count must be set before JAX starts, so the
checks run in a subprocess with ``--xla_force_host_platform_device_count=4``.
On a machine with 2 or more GPUs the same script runs over all of them
(``test_batch_sharded_inference_on_gpus``; skipped with fewer than 2 GPUs).
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("flax")

SCRIPT = textwrap.dedent(r"""
    import re
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import jaxsparse
    from jaxsparse.nn import models, sparsify

    jax.config.update("jax_default_matmul_precision", "highest")  # GPUs: no TF32 in the dense head
    D = len(jax.devices())
    assert D in (2, 4), jax.devices()  # 8 images, a vmapped axis of 4 split D ways
    # GPUs: the tiled kernel may pick another launch shape for the local batch, and XLA another
    # dense algorithm, so the summation order can differ from the unsharded run (a few ulps).
    # A gathered or mis-partitioned batch is off by O(1), far above either tolerance.
    ON_GPU = jax.devices()[0].platform == "gpu"
    OP_TOL = dict(rtol=2e-5, atol=2e-5) if ON_GPU else dict(rtol=1e-6, atol=1e-6)
    MODEL_TOL = dict(rtol=1e-4, atol=1e-5) if ON_GPU else dict(rtol=1e-5, atol=1e-6)
    LOCAL = 8 // D  # the batch of 8 images split over D devices
    print("devices:", jax.devices())
    rng = np.random.default_rng(0)

    def check_hlo(fn, *args, local_batch):
        hlo = fn.lower(*args).compile().as_text()
        assert "all-gather" not in hlo and "all-to-all" not in hlo, "batch gathered"
        calls = [l for l in hlo.splitlines() if 'custom_call_target="jaxsparse_sparse_conv"' in l]
        assert calls, "no sparse_conv custom call"
        for line in calls:  # every call convolves only this device's images
            shape = re.search(r"= \w+\[(\d+),", line)
            assert shape and int(shape.group(1)) == local_batch, line
        return len(calls)

    # 1. the op alone, explicit and auto meshes, bias + fused ReLU
    f = jaxsparse.random_filter(0, (3, 3), 8, 16, 0.8)
    b = jnp.asarray(rng.standard_normal(16), jnp.float32)
    x = jnp.asarray(rng.standard_normal((8, 10, 10, 8)), jnp.float32)
    ref = np.asarray(jaxsparse.sparse_conv(x, f, bias=b, activation="relu"))
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((D,), ("data",), axis_types=(axis_type,))
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        fn = jax.jit(lambda x, f, b: jaxsparse.sparse_conv(x, f, bias=b, activation="relu"))
        y = fn(xs, f, b)
        np.testing.assert_allclose(np.asarray(y), ref, **OP_TOL)
        assert y.sharding.spec[0] == "data", y.sharding
        check_hlo(fn, xs, f, b, local_batch=LOCAL)

    # 2. input sharded along H as well: correct (H is gathered, the batch is not)
    mesh2 = jax.make_mesh((2, D // 2), ("data", "h"), axis_types=(AxisType.Auto,) * 2)
    xs = jax.device_put(x, NamedSharding(mesh2, P("data", "h")))
    y = jax.jit(lambda x: jaxsparse.sparse_conv(x, f, bias=b, activation="relu"))(xs)
    np.testing.assert_allclose(np.asarray(y), ref, **OP_TOL)

    # 3. a sparsified VGG-16, batch sharded, under jax.jit
    model = models.VGG16(5, width=1 / 16, resolution=32, hidden=16, rngs=nnx.Rngs(0))
    model.eval()
    sparse, _ = sparsify(model, 0.9)
    x = jnp.asarray(rng.standard_normal((8, 32, 32, 3)), jnp.float32)
    graphdef, state = nnx.split(sparse)
    fwd = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    ref = np.asarray(fwd(state, x))
    mesh = jax.make_mesh((D,), ("data",), axis_types=(AxisType.Explicit,))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    state_r = jax.device_put(state, NamedSharding(mesh, P()))
    y = fwd(state_r, xs)
    np.testing.assert_allclose(np.asarray(y), ref, **MODEL_TOL)
    n = check_hlo(fwd, state_r, xs, local_batch=LOCAL)
    assert n == 13, n
    # 4. vmap folds into the native call under sharding, auto and explicit meshes, with the
    # batch sharded (vmapped axis in front) or the vmapped axis itself sharded
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((D,), ("data",), axis_types=(axis_type,))
        with jax.set_mesh(mesh):
            fv = jax.jit(jax.vmap(lambda s, x: nnx.merge(graphdef, s)(x), in_axes=(None, 0)))
            xv = jax.device_put(x.reshape(2, 4, 32, 32, 3), NamedSharding(mesh, P(None, "data")))
            # with D devices: the vmapped axis (2) is unsharded, the batch (4) split D ways
            yv = fv(state, xv)
            np.testing.assert_allclose(np.asarray(yv).reshape(8, -1), ref, **MODEL_TOL)
            if axis_type == AxisType.Explicit:
                assert yv.sharding.spec[:2] == (None, "data"), yv.sharding
                check_hlo(fv, state, xv, local_batch=LOCAL)
            xg = jax.device_put(x.reshape(D, 8 // D, 32, 32, 3), NamedSharding(mesh, P("data")))
            yg = fv(state, xg)
            np.testing.assert_allclose(np.asarray(yg).reshape(8, -1), ref, **MODEL_TOL)
            if axis_type == AxisType.Explicit:
                check_hlo(fv, state, xg, local_batch=LOCAL)
    # 5. gradients with the batch sharded: the filter gradient runs on the local images and
    # the per-device sums are all-reduced (no gather of the batch)
    f = jaxsparse.random_filter(1, (3, 3), 8, 16, 0.8)
    x = jnp.asarray(rng.standard_normal((8, 10, 10, 8)), jnp.float32)

    def loss(data, x):
        return jnp.sum(jaxsparse.sparse_conv(x, f.with_data(data), precision="highest") ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    ref_d, ref_x = (np.asarray(g) for g in grad(f.data, x))
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((D,), ("data",), axis_types=(axis_type,))
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        dr = jax.device_put(f.data, NamedSharding(mesh, P()))
        gd, gx = grad(dr, xs)
        np.testing.assert_allclose(np.asarray(gd), ref_d, rtol=1e-4, atol=1e-4 * np.abs(ref_d).max())
        np.testing.assert_allclose(np.asarray(gx), ref_x, **OP_TOL)
        hlo = grad.lower(dr, xs).compile().as_text()
        assert "all-gather" not in hlo and "all-to-all" not in hlo, "batch gathered"
        calls = [l for l in hlo.splitlines() if 'custom_call_target="jaxsparse_sparse_conv_filter_grad"' in l]
        # the operand shapes: inline "(f32[...]" or, for named operands, the layout constraints
        batch = [re.search(r"(?:\(|operand_layout_constraints=\{)f32\[(\d+),", l) for l in calls]
        assert calls and all(b and b.group(1) == str(LOCAL) for b in batch), calls
        assert "all-reduce" in hlo
    print("SHARDING OK")
""")


def test_batch_sharded_inference_partitions_along_batch():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd="/")
    assert proc.returncode == 0 and "SHARDING OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]


def _gpu_count() -> int:
    """Counted in a child process: initialising the GPU backend here would preallocate most of
    every GPU's memory in the pytest process, leaving too little for the child that runs the checks."""
    probe = "import jax\ntry:\n    print(len(jax.devices('gpu')))\nexcept RuntimeError:\n    print(0)"
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                              timeout=120, cwd="/")
        return int(proc.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return 0


@pytest.mark.skipif(_gpu_count() < 2, reason="needs 2 or more GPUs (the multi-GPU machine kinds)")
def test_batch_sharded_inference_on_gpus():
    """The same checks over every GPU of the machine: the custom call partitions along the batch."""
    env = dict(os.environ, JAXSPARSE_REQUIRE_CUDA="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, cwd="/")
    assert proc.returncode == 0 and "SHARDING OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
