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
#   peers tc tc_bench auto_check nn sharding_gpu (a machine of 2+ GPUs) train_kim
# and "bundle" (tar everything under $OUT into all.tgz: at most 8 files come back).
# Other knobs:
#   NCU_LAYER, NCU_FAMILIES, NCU_DTYPE, NCU_B1_ONLY, NCU_B32_FAMILIES (profiled one launch each),
#   NCU_SOURCE (a family: its per-instruction SASS counts; summarise with tools/ncu_hot_loops.py)
#   NCU_TC, NCU_TC_LAYERS, NCU_TC_ONLY (tensor-core designs, e.g. tc-slab,tc-chunked, on DLMC layers, batch 32, 0.95)
#   WM_MODELS, WM_MODES, WM_SPARSITY, WM_AUTO (whole_model_b*: models, modes, sparsities; WM_AUTO=1 adds policy='auto')
#   VGG_B1, B1_BUDGET, B1_TIMEOUT (sweep_vgg_b1: its layers, time budget and timeout; with the tensor-core family a layer takes ~110 s)
#   TC_VARIANTS, TC_VGG (tools/tc_bench.py --variants, --vgg), TC_SANITIZE_CASES (tools/sanitize_layers.py TC_CASES of the TensorCore sanitizer pass)
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
  export XLA_PYTHON_CLIENT_ALLOCATOR=platform
  # kns matches a substring of the kernel name: the tiled (plain, staged, cluster, half-width) and naive kernels
  # contain "SparseConv", the opt-in row-bucketed ones "RowBucket" (checked in their own pass).
  DEFAULT_CASES="direct3x3_f32 direct3x3_bf16 direct_s2_f16 kim_w5_f32 spmm1x1_f32 spmm1x1_bf16 proj1x1_s2_f32 naive3x3_f32 staged3x3_f32 staged_s2_bf16 staged1x1_f32 staged1x1_f16 staged_kim_w3_f32 cluster3x3_f32 cluster_s2_bf16 cluster_odd_f16 cluster1x1_f32 cluster1x1_bf16 cluster_kim_w5_f32 halfwin3x3_bf16 halfwin_odd_f16 halfwin1x1_bf16 halfwin_kim_w5_f16 malformed"
  PASSES=${SANITIZE_PASSES:-"SparseConv RowBucket TensorCore"}
  for pass in "SparseConv:$DEFAULT_CASES" "RowBucket:rowbucket3x3_f32 rowbucket3x5_bf16 malformed" \
              "TensorCore:${TC_SANITIZE_CASES:-tc_bf16 tc_f16_odd tc_tf32 tc_empty_rows tc_staged_bf16 tcc_bf16_np64 tcc_tf32_np32 tcc_f32_scatter_odd tcc_f16_odd tcc_empty_rows tcd3x3_bf16_c64 tcd3x3_tf32_s2 tcd_kim_f16_odd tcd1x1_s2_bf16}"; do
    [[ " $PASSES " == *" ${pass%%:*} "* ]] || continue
    kernels=${pass%%:*}; cases=${pass#*:}
    for tool in memcheck racecheck; do
      start=$(date +%s)
      log="$OUT/sanitize_${tool}_${kernels}.log"
      (cd /tmp && timeout ${SANITIZE_TIMEOUT:-240} compute-sanitizer --tool $tool --error-exitcode 99 \
         --kernel-name kns=$kernels python3 "$REPO/tools/sanitize_layers.py" $cases) > "$log" 2>&1
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
  start=$(date +%s)
  (cd /tmp && XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout ${SANITIZE_TIMEOUT:-120} compute-sanitizer --tool memcheck \
     --error-exitcode 99 --kernel-name kns=FilterGrad python3 "$REPO/tools/sanitize_grad.py") > "$OUT/sanitize_grad.log" 2>&1
  note "sanitize_grad memcheck rc=$? ($(( $(date +%s) - start )) s): $(grep -E 'ERROR SUMMARY' "$OUT/sanitize_grad.log" | tail -1)"
fi

if has quickbench; then
  (cd /tmp && timeout ${QB_TIMEOUT:-240} python3 "$REPO/tools/quickbench.py" --families=${QB_FAMILIES:-auto} \
     --sparsity=${QB_SPARSITY:-0.9,0.95} --dtypes=${QB_DTYPES:-float32,bfloat16} --layers=${QB_LAYERS:-}) > "$OUT/quickbench.log" 2>&1
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
VGG_B1=${VGG_B1:-vgg.conv3_2,vgg.conv4_2,vgg.conv5_1,vgg.conv2_2,vgg.conv1_2,vgg.conv3_1,vgg.conv4_1,vgg.conv2_1,vgg.conv1_1}
VGG_B32=vgg.conv3_2,vgg.conv4_2,vgg.conv5_1,vgg.conv2_2,vgg.conv4_1,vgg.conv3_1,vgg.conv2_1,vgg.conv1_2,vgg.conv1_1
R50_KIM=kim.w3,kim.w4,kim.w5,r50.g1.reduce,r50.g2.reduce,r50.g3.reduce,r50.g4.reduce,r50.g2.shortcut,r50.g3.shortcut,r50.g4.shortcut,r50.g1.shortcut
if has ncu; then
  # XLA preallocates most of the GPU; ncu would then save and restore it around every replay pass.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
  SECTIONS="--section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats --section SchedulerStats --section MemoryWorkloadAnalysis --section InstructionStats"
  [ -n "${NCU_TC_ONLY:-}" ] || run_step ncu_b1 ${NCU_TIMEOUT:-60} $NCU --clock-control none -k "regex:RowBucket|SparseConv" $SECTIONS python3 tools/ncu_layer.py \
    --families=${NCU_FAMILIES:-auto,rowbucket} --layer=${NCU_LAYER:-conv3_2} --dtype=${NCU_DTYPE:-float32}
  if [ -n "${NCU_SOURCE:-}" ]; then  # per-SASS-instruction counts and stall samples of one launch
    run_step ncu_source 90 $NCU --clock-control none -k "regex:SparseConv" --launch-skip 1 --launch-count 1 \
      --section SourceCounters --section WarpStateStats --page source --print-source sass --csv python3 tools/ncu_layer.py \
      --families=${NCU_SOURCE} --layer=${NCU_LAYER:-conv3_2} --dtype=${NCU_DTYPE:-float32}
  fi
  if [ -n "${NCU_TC:-}" ]; then  # tensor-core 1x1 designs (e.g. tc-slab,tc-chunked) on DLMC layers at batch 32
    for layer in ${NCU_TC_LAYERS:-bottleneck_1_block_group3_1_1}; do
      run_step ncu_tc_${layer#bottleneck_} ${NCU_TIMEOUT:-60} $NCU --clock-control none -k "regex:TensorCore" $SECTIONS \
        python3 tools/ncu_layer.py --families=$NCU_TC --dlmc=$layer --sparsity=0.95 --batch=32 --dtype=${NCU_DTYPE:-bfloat16}
    done
  fi
  # Launches alternate warm-up, run per family: skip the first warm-up, profile every one after it.
  B32_FAMS=${NCU_B32_FAMILIES:-auto}
  [ -n "${NCU_B1_ONLY:-}${NCU_TC_ONLY:-}" ] || run_step ncu_b32 ${NCU_B32_TIMEOUT:-60} $NCU --clock-control none -k "regex:SparseConv" --launch-skip 1 \
    --launch-count $(( 2 * $(echo "$B32_FAMS" | tr ',' '\n' | wc -l) - 1 )) $SECTIONS python3 tools/ncu_layer.py \
    --families=$B32_FAMS --batch=32 --layer=${NCU_LAYER:-conv3_2} --dtype=${NCU_DTYPE:-float32}
  unset XLA_PYTHON_CLIENT_PREALLOCATE
fi
has sweep_vgg_b1 && run_step sweep_vgg_b1 ${B1_TIMEOUT:-270} python3 experiments/sweep.py --model=vgg16 --layers=$VGG_B1 --batch=1 \
  --sparsity=0.5,0.7,0.8,0.9,0.95,0.98 --modes=$ALL4 --repeats=10 --budget_s=${B1_BUDGET:-190} --noprogress --out=$OUT/vgg_b1
has sweep_vgg_b32 && run_step sweep_vgg_b32 250 python3 experiments/sweep.py --model=vgg16 --layers=$VGG_B32 --batch=32 \
  --sparsity=0.7,0.8,0.9,0.95,0.98 --modes=$ALL4 --repeats=7 --k_small=2 --k_large=8 --kernel_time=unchainable \
  --budget_s=150 --noprogress --out=$OUT/vgg_b32
has sweep_r50_kim && run_step sweep_r50_kim ${R50_TIMEOUT:-280} python3 experiments/sweep.py --model=resnet50_1x1,cnn_non_static \
  --layers=$R50_KIM --pattern=dlmc --batch=1,32 --cnn_batch=50 --sparsity=0.8,0.9,0.95,0.98 --modes=$ALL4 --repeats=10 \
  --budget_s=${R50_BUDGET:-200} --noprogress --out=$OUT/r50_kim
for b in 1 32; do
  has network_b$b && run_step network_b$b ${NET_TIMEOUT:-130} python3 experiments/network.py --model=all --pattern=dlmc \
    --batch=$b --cnn_batch=$([ $b = 1 ] && echo 50 || echo "") --sparsity=0.8,0.9,0.95 \
    --modes=float32_highest,float32,bfloat16 --repeats=10 --budget_s=${NET_BUDGET:-80} --noprogress --out=$OUT/network_b$b
done
for b in 1 32; do  # ImageNet sizes; one process (and JSON) per batch so a budget cut keeps both models at batch 1
  has whole_model_b$b && run_step whole_model_b$b ${WM_TIMEOUT:-110} python3 experiments/whole_model_benchmark.py \
    --width=1 --resolution=224 --model=${WM_MODELS:-vgg16,resnet50} --modes=${WM_MODES:-float32_highest,float32,bfloat16} --batch=$b \
    --sparsity=${WM_SPARSITY:-0.8,0.9,0.95} ${WM_AUTO:+--auto} --repeats=10 --budget_s=${WM_BUDGET:-70} \
    --out=$OUT/whole_model/whole_model_h200_b$b${WM_AUTO:+_auto}.json
done
# Issue 13's peer comparison: the eight DLMC ResNet-50 1x1 matrices, jaxsparse per family,
# XLA HIGHEST dense and cuSPARSE (BCSR) kernel time in one run.
has peers && run_step peers ${PEERS_TIMEOUT:-240} python3 tools/peer_bench.py --families=${PEER_FAMILIES:-auto,cluster} \
  --out=$OUT/peers.jsonl
# Issue 14: the tensor-core 1x1 kernel, its tests (CUDA path, and through the Flax layer) and kernel
# time against XLA dense.
if has tc; then
  start=$(date +%s)
  (cd "$REPO/tests" && timeout ${TC_TESTS_TIMEOUT:-150} python3 -m pytest -q test_tc_conv.py test_tc_plan.py test_nn_tensor_cores.py -p no:cacheprovider) > "$OUT/tests_tc.log" 2>&1
  note "tests_tc rc=$? ($(( $(date +%s) - start )) s): $(tail -1 "$OUT/tests_tc.log")"
  grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/tests_tc.log" | head -20 | tee -a "$SUMMARY"
fi
has tc_bench && run_step tc_bench ${TC_BENCH_TIMEOUT:-200} python3 tools/tc_bench.py --sparsity=${TC_SPARSITY:-0.9,0.95} \
  --variants=${TC_VARIANTS:-slab:0,chunked:0,chunked:128} --vgg=${TC_VGG:-} --out=$OUT/tc.jsonl
# Issue 11's check: VGG-16 with HIGHEST convolutions, policy='auto' at 90 %, batch 1, against dense
# and all-sparse in the same run (nnx.split + jax.jit of the pure function).
has auto_check && run_step auto_check ${AUTO_TIMEOUT:-200} python3 experiments/whole_model_benchmark.py --width=1 \
  --resolution=224 --model=vgg16 --modes=float32_highest --batch=1 --sparsity=0.9 --repeats=20 --auto \
  --out=$OUT/whole_model/auto_check_vgg16_highest_b1.json
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
if has train_kim; then  # CNN-non-static (GloVe 50-d, issue 15 protocol), 3 seeds; one process per dataset.
  # Carry .device_data with sentences/ (a copy of ../shared/data/sentences) and glove50_vocab.npz
  # (python3 experiments/embeddings.py --out=.device_data/glove50_vocab.npz, on a machine with the package).
  export JAXSPARSE_SENTENCES_ROOT=${JAXSPARSE_SENTENCES_ROOT:-$(pwd)/.device_data/sentences}
  for ds in mr sst2; do
    run_step train_kim_$ds ${KIM_TIMEOUT:-240} python3 experiments/train_kim.py --datasets=$ds \
      --embeddings=glove50 --embeddings_file=.device_data/glove50_vocab.npz --seeds=${KIM_SEEDS:-0,1,2} \
      --feature_maps=100 --noprogress --out=$OUT/kim_$ds
  done
fi
if has bundle; then
  (cd "$OUT" && tar czf /tmp/jaxsparse_all.tgz . && find . -mindepth 1 -maxdepth 1 ! -name summary.txt -exec rm -rf {} + \
     && mv /tmp/jaxsparse_all.tgz "$OUT/all.tgz")
  echo "bundled into $OUT/all.tgz"
fi
cat "$SUMMARY"
