"""The filter-gradient kernel under compute-sanitizer: strided, padded, dilated, 1x1, 1-D, half types.

    compute-sanitizer --tool memcheck --kernel-name kns=FilterGrad python3 tools/sanitize_grad.py
"""
import jax
import jax.numpy as jnp
import numpy as np

import jaxsparse

CASES = [  # kernel, stride, padding, dilation, dtype
    ((3, 3), 2, "SAME", 1, np.float32),
    ((3, 3), 1, ((2, 0), (1, 3)), 2, jnp.bfloat16),
    ((1, 1), 2, "VALID", 1, np.float16),
    ((5,), 1, "VALID", 1, np.float32),
]

for k, s, pad, d, dt in CASES:
    f = jaxsparse.random_filter(1, k, 24, 40, 0.9, dtype=dt)
    shape = (2, 13, 11, 24) if len(k) == 2 else (2, 30, 24)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), np.float32).astype(dt)

    def loss(x, v):
        y = jaxsparse.sparse_conv(x, f.with_data(v), strides=s, padding=pad, rhs_dilation=d)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, f.data)
    print(k, s, jnp.dtype(dt).name, [float(jnp.abs(g.astype(jnp.float32)).mean()) for g in grads], flush=True)
