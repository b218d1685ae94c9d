#!/usr/bin/env bash
# One call on the GPU machine: build + install the package from the copied
# tree, run the GPU tests, compute-sanitizer on representative layers of each
# kernel family, and the layer benchmark. Logs and JSON go under $OUT (at most
# 8 files come back, so everything is bundled).
#
# Usage (from the repo root, through the device tool, carry [".device_data"]):
#   STEPS="install tests suite sanitize bench" bash tools/device_run.sh
# STEPS defaults to "install tests sanitize bench". Other knobs:
#   PYTEST_ARGS   extra pytest arguments for the GPU tests (e.g. "-k vgg")
#   BENCH_ARGS    arguments for experiments/layer_benchmark.py
#   BENCH_TIMEOUT seconds for the benchmark (default 300)
set -u
OUT=${OUT:-/tmp/jaxsparse_out}
mkdir -p "$OUT"
STEPS=${STEPS:-"install tests sanitize bench"}
export PYTHONUNBUFFERED=1
export JAXSPARSE_REQUIRE_CUDA=1
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-gpu}
# The DLMC files travel in the git-ignored .device_data (carry it); the installed
# package cannot find them relative to itself.
export JAXSPARSE_DLMC_ROOT=${JAXSPARSE_DLMC_ROOT:-$(pwd)/.device_data/dlmc}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }

note "== device_run $(date -u +%FT%TZ) steps: $STEPS"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>&1 | tee -a "$SUMMARY"

if has install; then
  start=$(date +%s)
  JAXSPARSE_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -v . > "$OUT/install.log" 2>&1
  rc=$?
  note "install rc=$rc ($(( $(date +%s) - start )) s)"
  grep -E "registers|spill" "$OUT/install.log" | head -40 >> "$OUT/install.log.regs" 2>/dev/null
  if [ $rc -ne 0 ]; then tail -40 "$OUT/install.log"; exit $rc; fi
fi
SITE_CHECK=$(cd /tmp && python3 -c "import jaxsparse, jax; print(jaxsparse.__file__, jaxsparse.cuda_available(), jax.devices())" 2>&1)
note "import: $SITE_CHECK"

REPO=$(pwd)

if has tests; then
  start=$(date +%s)
  # conftest.py and helpers.py live in tests/; run pytest on the repo's tests dir.
  # From tests/ (not the repo root) the installed package, with its extensions, is imported.
  (cd "$REPO/tests" && timeout ${TESTS_TIMEOUT:-420} python3 -m pytest -q -m gpu test_gpu.py -p no:cacheprovider ${PYTEST_ARGS:-}) > "$OUT/tests_gpu.log" 2>&1
  rc=$?
  note "tests_gpu rc=$rc ($(( $(date +%s) - start )) s): $(tail -1 "$OUT/tests_gpu.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests_gpu.log" | head -20 | tee -a "$SUMMARY"
fi

if has suite; then
  start=$(date +%s)
  (cd "$REPO/tests" && timeout ${SUITE_TIMEOUT:-300} python3 -m pytest -q . -p no:cacheprovider ${SUITE_ARGS:-}) > "$OUT/tests_all.log" 2>&1
  rc=$?
  note "tests_all rc=$rc ($(( $(date +%s) - start )) s): $(tail -1 "$OUT/tests_all.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests_all.log" | head -20 | tee -a "$SUMMARY"
fi

if has sanitize; then
  cat > /tmp/sanitize_layers.py <<'EOF'
# Representative layers of each kernel family, small enough for compute-sanitizer.
import os, sys
import jax, jax.numpy as jnp, numpy as np
import jaxsparse
from jaxsparse import sparse_conv
cases = [  # name, family, batch, h, w, cin, cout, kernel, stride, padding, dtype
    ("direct3x3_f32", "direct", 1, 14, 14, 64, 64, (3, 3), 1, "SAME", np.float32),
    ("direct3x3_bf16", "direct", 2, 9, 11, 24, 40, (3, 3), 1, "SAME", jnp.bfloat16),
    ("direct_s2_f16", "direct", 1, 15, 15, 16, 8, (3, 3), 2, "SAME", np.float16),
    ("kim_w5_f32", "direct", 2, 1, 56, 300, 100, (1, 5), 1, "VALID", np.float32),
    ("spmm1x1_f32", "spmm", 1, 14, 14, 256, 64, (1, 1), 1, "VALID", np.float32),
    ("spmm1x1_bf16", "spmm", 2, 7, 7, 512, 128, (1, 1), 1, "VALID", jnp.bfloat16),
    ("proj1x1_s2_f32", "direct", 1, 14, 14, 128, 256, (1, 1), 2, "VALID", np.float32),
    ("naive3x3_f32", "naive", 1, 8, 8, 16, 16, (3, 3), 1, "SAME", np.float32),
    ("rowbucket3x3_f32", "rowbucket", 1, 14, 14, 64, 64, (3, 3), 1, "SAME", np.float32),
    ("rowbucket3x5_bf16", "rowbucket", 2, 9, 11, 24, 40, (3, 5), 2, "SAME", jnp.bfloat16),
]
only = sys.argv[1:] or None
for name, fam, n, h, w, cin, cout, k, s, pad, dt in cases:
    if only and name not in only:
        continue
    if fam in ("naive", "rowbucket"):
        os.environ["JAXSPARSE_GPU_KERNEL"] = fam
    else:
        os.environ.pop("JAXSPARSE_GPU_KERNEL", None)
    jax.clear_caches()
    f = jaxsparse.random_filter(1, k, cin, cout, 0.9, dtype=dt)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, h, w, cin)).astype(np.float32)).astype(dt)
    out = jax.jit(lambda x, f: sparse_conv(x, f, strides=s, padding=pad, bias=jnp.ones(cout, dt), activation="relu"))(x, f)
    print(name, out.shape, float(jnp.abs(out.astype(jnp.float32)).mean()), flush=True)
EOF
  export XLA_PYTHON_CLIENT_ALLOCATOR=platform
  # kns matches a substring of the kernel name: the tiled and naive kernels contain
  # "SparseConv", the opt-in row-bucketed ones "RowBucket" (checked in their own pass).
  DEFAULT_CASES="direct3x3_f32 direct3x3_bf16 direct_s2_f16 kim_w5_f32 spmm1x1_f32 spmm1x1_bf16 proj1x1_s2_f32 naive3x3_f32"
  for pass in "SparseConv:$DEFAULT_CASES" "RowBucket:rowbucket3x3_f32 rowbucket3x5_bf16"; do
    kernels=${pass%%:*}; cases=${pass#*:}
    for tool in memcheck racecheck; do
      start=$(date +%s)
      log="$OUT/sanitize_${tool}_${kernels}.log"
      (cd /tmp && timeout ${SANITIZE_TIMEOUT:-240} compute-sanitizer --tool $tool --error-exitcode 99 \
         --kernel-name kns=$kernels python3 /tmp/sanitize_layers.py $cases) > "$log" 2>&1
      rc=$?
      note "sanitize $tool $kernels rc=$rc ($(( $(date +%s) - start )) s): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -2 | tr '\n' ' ')"
    done
  done
  unset XLA_PYTHON_CLIENT_ALLOCATOR
fi

if has autodiff; then
  # Gradients on the GPU: forward, transposed (input-gradient) and filter-gradient kernels.
  start=$(date +%s)
  (cd "$REPO/tests" && timeout ${AUTODIFF_TIMEOUT:-150} python3 -m pytest -q test_autodiff.py -p no:cacheprovider) > "$OUT/tests_autodiff.log" 2>&1
  rc=$?
  note "tests_autodiff rc=$rc ($(( $(date +%s) - start )) s): $(tail -1 "$OUT/tests_autodiff.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests_autodiff.log" | head -20 | tee -a "$SUMMARY"
fi

if has sanitize_grad; then
  cat > /tmp/sanitize_grad.py <<'EOF3'
# The filter-gradient kernel under compute-sanitizer: strided, padded, dilated, 1x1, 1-D, half types.
import jax, jax.numpy as jnp, numpy as np
import jaxsparse
cases = [((3, 3), 2, "SAME", 1, np.float32), ((3, 3), 1, ((2, 0), (1, 3)), 2, jnp.bfloat16),
         ((1, 1), 2, "VALID", 1, np.float16), ((5,), 1, "VALID", 1, np.float32)]
for k, s, pad, d, dt in cases:
    f = jaxsparse.random_filter(1, k, 24, 40, 0.9, dtype=dt)
    shape = (2, 13, 11, 24) if len(k) == 2 else (2, 30, 24)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape).astype(np.float32)).astype(dt)
    g = jax.jit(jax.grad(lambda x, v: jnp.sum(jaxsparse.sparse_conv(x, f.with_data(v), strides=s, padding=pad,
                rhs_dilation=d).astype(jnp.float32) ** 2), argnums=(0, 1)))(x, f.data)
    print(k, s, dt.__name__ if hasattr(dt, "__name__") else dt, [float(jnp.abs(a.astype(jnp.float32)).mean()) for a in g], flush=True)
EOF3
  start=$(date +%s)
  (cd /tmp && XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout ${SANITIZE_TIMEOUT:-120} compute-sanitizer --tool memcheck \
     --error-exitcode 99 --kernel-name kns=FilterGrad python3 /tmp/sanitize_grad.py) > "$OUT/sanitize_grad.log" 2>&1
  note "sanitize_grad memcheck rc=$? ($(( $(date +%s) - start )) s): $(grep -E 'ERROR SUMMARY' "$OUT/sanitize_grad.log" | tail -1)"
fi

if has quickbench; then
  cat > /tmp/quickbench.py <<'EOF2'
# Kernel time (profiler trace) of the sparse kernels on a few layers, f32, vs XLA dense.
import jax, jax.numpy as jnp, numpy as np
from jax import lax
import jaxsparse
from jaxsparse import sparse_conv
from jaxsparse.benchmark import kernel_time_us
layers = [("conv1_2", 1, 224, 64, 64, (3, 3)), ("conv3_2", 1, 56, 256, 256, (3, 3)), ("conv4_2", 1, 28, 512, 512, (3, 3)),
          ("conv5_1", 1, 14, 512, 512, (3, 3)), ("conv3_2", 32, 56, 256, 256, (3, 3)), ("conv4_2", 32, 28, 512, 512, (3, 3)),
          ("r50g1red", 1, 56, 256, 64, (1, 1)), ("r50g3red", 1, 14, 1024, 256, (1, 1)), ("r50g4exp", 1, 7, 512, 2048, (1, 1))]
for name, n, hw, cin, cout, k in layers:
    for sp in (0.9, 0.95):
        for dt in (jnp.float32, jnp.bfloat16):
            f = jaxsparse.random_filter(0, k, cin, cout, sp, dtype=dt)
            x = jnp.asarray(np.random.default_rng(0).standard_normal((n, hw, hw, cin)), dt)
            fs = jax.jit(lambda x, f: sparse_conv(x, f))
            ks = kernel_time_us(fs, x, f)
            w = jnp.asarray(f.todense())
            fd = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                         precision=lax.Precision.HIGHEST if dt == jnp.float32 else None))
            kd = kernel_time_us(fd, x, w)
            t = ks["total_us"]
            tf = 2 * f.nnz * n * hw * hw / t / 1e6
            print(f"{name:9s} b{n:<3d} s{sp:.2f} {jnp.dtype(dt).name:8s} sparse {t:8.1f} us {tf:6.2f} TFLOP/s  dense {kd['total_us']:8.1f} us  kernels {list(ks['kernels'])[:2]}", flush=True)
EOF2
  (cd /tmp && timeout ${QB_TIMEOUT:-200} python3 /tmp/quickbench.py) > "$OUT/quickbench.log" 2>&1
  note "quickbench rc=$?"
  cat "$OUT/quickbench.log" | grep -v Warning | tail -40
fi

if has bench; then
  if [ -f experiments/layer_benchmark.py ]; then
    start=$(date +%s)
    (cd /tmp && timeout ${BENCH_TIMEOUT:-300} python3 "$REPO/experiments/layer_benchmark.py" \
       --out "$OUT/bench.json" ${BENCH_ARGS:-}) > "$OUT/bench.log" 2>&1
    note "bench rc=$? ($(( $(date +%s) - start )) s)"
    tail -60 "$OUT/bench.log"
  else
    note "bench: experiments/layer_benchmark.py missing"
  fi
fi
cat "$SUMMARY"
