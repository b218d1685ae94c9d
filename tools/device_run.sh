#!/usr/bin/env bash
# One call on the GPU machine: build + install the package from the copied
# tree, run the GPU tests, compute-sanitizer on representative layers of each
# kernel family, and the layer benchmark. Logs and JSON go under $OUT (at most
# 8 files come back, so everything is bundled).
#
# Usage (from the repo root, through the device tool, carry [".device_data"]):
#   STEPS="install tests suite sanitize bench" bash tools/device_run.sh
# STEPS defaults to "install tests sanitize bench". Experiment steps (issue 4-6 results,
# each bounded by a time budget and a timeout; outputs under $OUT/<step>):
#   ncu sweep_vgg_b1 sweep_vgg_b32 sweep_r50_kim network_b1 network_b32 whole_model_b1 whole_model_b32
#   nn sharding_gpu (a machine of 2+ GPUs) train_kim
# and "bundle" (tar everything under $OUT into all.tgz: at most 8 files come back).
# Other knobs:
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
# Appends: several invocations of this script may share one $OUT (even concurrently).
touch "$SUMMARY"
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
# Malformed CSR (as a traced filter can be): poisoned rows, and no access out of bounds.
if only and "malformed" in only:
    for fam in ("direct", "naive", "rowbucket"):
        os.environ["JAXSPARSE_GPU_KERNEL"] = fam
        for variant in ("columns_and_disorder", "last_pointer_past_nnz"):
            jax.clear_caches()
            f = jaxsparse.random_filter(2, (3, 3), 24, 40, 0.5)
            ind, ptr = np.array(f.indices), np.array(f.indptr)
            if variant == "columns_and_disorder":
                ind[ptr[1]], ind[ptr[20]] = 10**6, -3
                ptr[2], ptr[3] = ptr[3], ptr[2]
            else:
                ptr[-1] += 5
            bad = jaxsparse.SparseFilter(f.data, jnp.asarray(ind), jnp.asarray(ptr), kernel_size=(3, 3),
                                         in_channels=24, out_channels=40, validate=False)
            x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 11, 24)).astype(np.float32))
            out = jax.jit(lambda x, f: sparse_conv(x, f, activation="relu"))(x, bad)
            nan_rows = np.isnan(np.asarray(out)).reshape(-1, 40).all(0)
            print("malformed", fam, variant, "NaN rows:", np.flatnonzero(nan_rows).tolist(), flush=True)
EOF
  export XLA_PYTHON_CLIENT_ALLOCATOR=platform
  # kns matches a substring of the kernel name: the tiled and naive kernels contain
  # "SparseConv", the opt-in row-bucketed ones "RowBucket" (checked in their own pass).
  DEFAULT_CASES="direct3x3_f32 direct3x3_bf16 direct_s2_f16 kim_w5_f32 spmm1x1_f32 spmm1x1_bf16 proj1x1_s2_f32 naive3x3_f32 malformed"
  PASSES=${SANITIZE_PASSES:-"SparseConv RowBucket"}
  for pass in "SparseConv:$DEFAULT_CASES" "RowBucket:rowbucket3x3_f32 rowbucket3x5_bf16 malformed"; do
    [[ " $PASSES " == *" ${pass%%:*} "* ]] || continue
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
# Kernel time (profiler trace) of the sparse kernels on a few layers vs XLA dense, per
# kernel family (QB_FAMILIES, e.g. "auto,rowbucket"), sparsity (QB_SPARSITY) and dtype.
import os
import jax, jax.numpy as jnp, numpy as np
from jax import lax
import jaxsparse
from jaxsparse import sparse_conv
from jaxsparse.benchmark import kernel_time_us
layers = [("conv1_2", 1, 224, 64, 64, (3, 3)), ("conv3_2", 1, 56, 256, 256, (3, 3)), ("conv4_2", 1, 28, 512, 512, (3, 3)),
          ("conv5_1", 1, 14, 512, 512, (3, 3)), ("conv3_2", 32, 56, 256, 256, (3, 3)), ("conv4_2", 32, 28, 512, 512, (3, 3)),
          ("conv5_1", 32, 14, 512, 512, (3, 3)), ("r50g1red", 1, 56, 256, 64, (1, 1)), ("r50g3red", 1, 14, 1024, 256, (1, 1)),
          ("r50g3red", 32, 14, 1024, 256, (1, 1)), ("r50g4exp", 1, 7, 512, 2048, (1, 1))]
families = os.environ.get("QB_FAMILIES", "auto").split(",")
sparsities = [float(s) for s in os.environ.get("QB_SPARSITY", "0.9,0.95").split(",")]
dtypes = [jnp.dtype(d) for d in os.environ.get("QB_DTYPES", "float32,bfloat16").split(",")]
for name, n, hw, cin, cout, k in layers:
    for sp in sparsities:
        for dt in dtypes:
            f = jaxsparse.random_filter(0, k, cin, cout, sp, dtype=dt)
            x = jnp.asarray(np.random.default_rng(0).standard_normal((n, hw, hw, cin)), dt)
            w = jnp.asarray(f.todense())
            fd = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                         precision=lax.Precision.HIGHEST if dt == jnp.float32 else None))
            kd = kernel_time_us(fd, x, w)
            ref = None
            for fam in families:
                if fam == "auto":
                    os.environ.pop("JAXSPARSE_GPU_KERNEL", None)
                else:
                    os.environ["JAXSPARSE_GPU_KERNEL"] = fam
                jax.clear_caches()  # the family is chosen per call; command buffers would replay the old one
                fs = jax.jit(lambda x, f: sparse_conv(x, f))
                out = np.asarray(fs(x, f).astype(jnp.float32))
                ref = out if ref is None else ref
                agree = float(np.max(np.abs(out - ref)) / (np.max(np.abs(ref)) + 1e-30))
                ks = kernel_time_us(fs, x, f)
                t = ks["total_us"]
                tf = 2 * f.nnz * n * hw * hw / t / 1e6
                print(f"{name:9s} b{n:<3d} s{sp:.2f} {dt.name:8s} {fam:9s} sparse {t:8.1f} us {tf:6.2f} TFLOP/s  "
                      f"dense {kd['total_us']:8.1f} us  x{kd['total_us'] / t:5.2f}  relerr-vs-{families[0]} {agree:.1e}  "
                      f"kernels {[k[:40] for k in ks['kernels']][:2]}", flush=True)
EOF2
  (cd /tmp && timeout ${QB_TIMEOUT:-240} python3 /tmp/quickbench.py) > "$OUT/quickbench.log" 2>&1
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

# ---- experiments -------------------------------------------------------------------
run_step() {  # name timeout command...: run from the repo root, log to $OUT/<name>.log
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  note "$name rc=$? ($(( $(date +%s) - start )) s): $(grep -E 'skipped|wall time|wrote' "$OUT/$name.log" | tail -2 | tr '\n' ' ' | cut -c1-300)"
}
ALL4=float32_highest,float32,bfloat16,float16
VGG_B1=vgg.conv3_2,vgg.conv4_2,vgg.conv5_1,vgg.conv2_2,vgg.conv1_2,vgg.conv3_1,vgg.conv4_1,vgg.conv2_1,vgg.conv1_1
VGG_B32=vgg.conv3_2,vgg.conv4_2,vgg.conv5_1,vgg.conv2_2,vgg.conv4_1,vgg.conv3_1,vgg.conv2_1,vgg.conv1_2,vgg.conv1_1
R50_KIM=kim.w3,kim.w4,kim.w5,r50.g1.reduce,r50.g2.reduce,r50.g3.reduce,r50.g4.reduce,r50.g2.shortcut,r50.g3.shortcut,r50.g4.shortcut,r50.g1.shortcut
if has ncu; then
  # XLA preallocates most of the GPU; ncu would then save and restore it around every replay pass.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
  SECTIONS="--section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats --section SchedulerStats --section MemoryWorkloadAnalysis --section InstructionStats"
  run_step ncu_b1 60 $NCU --clock-control none -k "regex:RowBucket|SparseConv" $SECTIONS python3 tools/ncu_layer.py --families=auto,rowbucket
  run_step ncu_b32 40 $NCU --clock-control none -k "regex:SparseConv" --launch-skip 1 --launch-count 1 $SECTIONS python3 tools/ncu_layer.py --families=auto --batch=32
  unset XLA_PYTHON_CLIENT_PREALLOCATE
fi
has sweep_vgg_b1 && run_step sweep_vgg_b1 270 python3 experiments/sweep.py --model=vgg16 --layers=$VGG_B1 --batch=1 \
  --sparsity=0.5,0.7,0.8,0.9,0.95,0.98 --dtype=$ALL4 --reps=10 --budget_s=190 --noprogress --out=$OUT/vgg_b1
has sweep_vgg_b32 && run_step sweep_vgg_b32 250 python3 experiments/sweep.py --model=vgg16 --layers=$VGG_B32 --batch=32 \
  --sparsity=0.7,0.8,0.9,0.95,0.98 --dtype=$ALL4 --reps=7 --k_small=2 --k_large=8 --kernel_time=unchainable \
  --budget_s=150 --noprogress --out=$OUT/vgg_b32
has sweep_r50_kim && run_step sweep_r50_kim ${R50_TIMEOUT:-280} python3 experiments/sweep.py --model=resnet50_1x1,cnn_non_static \
  --layers=$R50_KIM --pattern=dlmc --batch=1,32 --cnn_batch=50 --sparsity=0.8,0.9,0.95,0.98 --dtype=$ALL4 --reps=10 \
  --budget_s=${R50_BUDGET:-200} --noprogress --out=$OUT/r50_kim
for b in 1 32; do
  has network_b$b && run_step network_b$b ${NET_TIMEOUT:-130} python3 experiments/network.py --model=all --pattern=dlmc \
    --batch=$b --cnn_batch=$([ $b = 1 ] && echo 50 || echo "") --sparsity=0.8,0.9,0.95 \
    --dtype=float32_highest,float32,bfloat16 --reps=10 --budget_s=${NET_BUDGET:-80} --noprogress --out=$OUT/network_b$b
done
for b in 1 32; do  # ImageNet sizes; one process (and JSON) per batch so a budget cut keeps both models at batch 1
  has whole_model_b$b && run_step whole_model_b$b ${WM_TIMEOUT:-110} python3 experiments/whole_model_benchmark.py \
    --width=1 --resolution=224 --models=${WM_MODELS:-vgg16,resnet50} --modes=${WM_MODES:-float32_highest,float32,bfloat16} --batch=$b --sparsity=0.8,0.9,0.95 \
    --repeats=10 --budget_s=${WM_BUDGET:-70} --out=$OUT/whole_model/whole_model_h200_b$b.json
done
if has nn; then
  start=$(date +%s)
  (cd "$REPO/tests" && timeout ${NN_TIMEOUT:-120} python3 -m pytest -q ${NN_TESTS:-test_nn.py test_autodiff.py} -p no:cacheprovider) > "$OUT/tests_nn.log" 2>&1
  note "tests ${NN_TESTS:-test_nn.py test_autodiff.py} rc=$? ($(( $(date +%s) - start )) s): $(tail -1 "$OUT/tests_nn.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests_nn.log" | head -20 | tee -a "$SUMMARY"
fi
if has sharding_gpu; then  # on nvidia-h200-x2 / -x4: batch-sharded inference over every GPU
  start=$(date +%s)
  (cd "$REPO/tests" && XLA_PYTHON_CLIENT_PREALLOCATE=false timeout ${SHARD_TIMEOUT:-300} python3 -m pytest -q -rs test_nn_sharding.py -p no:cacheprovider) > "$OUT/tests_sharding.log" 2>&1
  note "tests_sharding rc=$? ($(( $(date +%s) - start )) s): $(tail -1 "$OUT/tests_sharding.log")"
  grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/tests_sharding.log" | head -5 | tee -a "$SUMMARY"
fi
if has train_kim; then  # full size (300-d embeddings, 100 maps); one process per dataset
  for ds in mr sst2; do
    run_step train_kim_$ds ${KIM_TIMEOUT:-120} python3 experiments/train_kim.py --datasets=$ds --embed_dim=300 \
      --feature_maps=100 --epochs=${KIM_EPOCHS:-5} --prune_epochs=${KIM_PRUNE:-3} --finetune_epochs=${KIM_FT:-2} \
      --out=$OUT/kim_$ds
  done
fi
if has bundle; then
  (cd "$OUT" && tar czf /tmp/jaxsparse_all.tgz . && find . -mindepth 1 -maxdepth 1 ! -name summary.txt -exec rm -rf {} + \
     && mv /tmp/jaxsparse_all.tgz "$OUT/all.tgz")
  echo "bundled into $OUT/all.tgz"
fi
cat "$SUMMARY"
