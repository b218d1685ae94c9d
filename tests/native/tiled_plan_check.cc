// Host check of the tiled planner (cuda/gpu/tiled_plan.cu): for many random geometries, every
// variant and element size, the plan's invariants that the CUDA kernels rely on to stay in
// bounds (compute-sanitizer covers a few layers on the GPU; this covers the planner's whole
// range on any machine). Built and run by tests/test_tiled_plan.py:
//   g++ -O1 -std=c++17 -I cuda -x c++ cuda/gpu/tiled_plan.cu tests/native/tiled_plan_check.cc
// Prints "checked N plans" and exits 0, or prints every violation and exits 1.
#include <cstdint>
#include <cstdio>
#include <random>

#include "gpu/tiled_plan.h"

using jaxsparse::ConvGeometry;
using namespace jaxsparse::tiled;

namespace {

int failures = 0;
int planned[4][2] = {};  // plans found per variant and element size (4 or 2 bytes)

void Fail(const char* what, const ConvGeometry& g, Variant v, int elem_bytes) {
  if (++failures <= 30)
    std::printf("VIOLATION %s: variant %d elem %d batch %lld in %lldx%lldx%lld out %lldx%lldx%lld k %lldx%lld "
                "s %lldx%lld d %lldx%lld pad %lld,%lld nnz %lld\n",
                what, static_cast<int>(v), elem_bytes, (long long)g.batch, (long long)g.in_h, (long long)g.in_w,
                (long long)g.in_c, (long long)g.out_h, (long long)g.out_w, (long long)g.out_c,
                (long long)g.kernel_h, (long long)g.kernel_w, (long long)g.stride_h, (long long)g.stride_w,
                (long long)g.dilation_h, (long long)g.dilation_w, (long long)g.pad_h_lo, (long long)g.pad_w_lo,
                (long long)g.nnz);
}

#define CHECK(cond) \
  do {              \
    if (!(cond)) Fail(#cond, g, v, elem_bytes); \
  } while (0)

void CheckPlan(const ConvGeometry& g, Variant v, int elem_bytes, const DeviceLimits& limits) {
  const Plan p = ChooseTilePlan(g, elem_bytes, limits, v);
  if (v == Variant::kHalfWindow && elem_bytes == 4) {
    CHECK(!p.ok);  // float32 has no half-width window
    return;
  }
  if (!p.ok) return;
  ++planned[static_cast<int>(v)][elem_bytes == 2];
  const TileArgs& a = p.args;
  const bool half = v == Variant::kHalfWindow, cluster = v == Variant::kCluster, staged = v == Variant::kStaged;
  const int64_t P = p.pixels_per_thread;
  // Shared memory: what the kernel carves up, within the device's limit.
  int64_t smem = 4 * (int64_t{a.tile_floats} + a.out_floats) + kMetaBytes;
  if (staged) smem += 4 * int64_t{a.ptr_ints} + 8 * int64_t{a.meta_cap};
  CHECK(smem == p.smem_bytes);
  CHECK(p.smem_bytes <= limits.max_smem_block);
  // Tiles, groups and chunks cover the output exactly once.
  CHECK(int64_t{a.tiles_h} * a.tile_h >= g.out_h && int64_t{a.tiles_h - 1} * a.tile_h < g.out_h);
  CHECK(int64_t{a.tiles_w} * a.tile_w >= g.out_w && int64_t{a.tiles_w - 1} * a.tile_w < g.out_w);
  CHECK(int64_t{a.groups} * a.rows_per_group >= g.out_c && int64_t{a.groups - 1} * a.rows_per_group < g.out_c);
  CHECK(a.out_pitch >= a.rows_per_group && int64_t{a.out_floats} >= int64_t{a.tile_h} * a.tile_w * a.out_pitch);
  const int64_t chunks_c = cluster ? a.cin_chunks : 1, cc = cluster ? a.cin_chunk : g.in_c;
  CHECK(p.blocks == g.batch * int64_t{a.tiles_h} * a.tiles_w * a.groups * chunks_c);
  if (cluster) {
    CHECK(a.cin_chunks >= 2 && a.cin_chunks <= kMaxClusterChunks);
    CHECK(int64_t{a.cin_chunks - 1} * a.cin_chunk < g.in_c && int64_t{a.cin_chunks} * a.cin_chunk >= g.in_c);
    CHECK(!a.vec_fill || a.cin_chunk % (16 / elem_bytes) == 0);
  }
  // The window holds the tile's receptive field.
  CHECK(a.tile_rows == (a.tile_h - 1) * g.stride_h + (g.kernel_h - 1) * g.dilation_h + 1);
  CHECK(a.tile_cols >= (a.tile_w - 1) * g.stride_w + (g.kernel_w - 1) * g.dilation_w + 1);
  CHECK(int64_t{a.chan_stride} >= int64_t{a.tile_rows} * a.tile_cols);
  // Every read stays inside the window: the largest tap offset plus the largest pixel offset.
  const int64_t window_len = half ? (a.half_copy ? a.half_copy : 2 * int64_t{a.tile_floats}) : a.tile_floats;
  const int64_t max_tap = (cc - 1) * a.chan_stride + (g.kernel_h - 1) * g.dilation_h * a.tile_cols +
                          (g.kernel_w - 1) * g.dilation_w;
  const int64_t lanes = int64_t{a.chunks} * 32 * P;  // pixels a task's lanes cover
  if (p.affine) {
    CHECK(lanes >= int64_t{a.tile_h - 1} * a.tile_cols + a.tile_w);  // every output pixel has a lane
    CHECK(max_tap + lanes - 1 < window_len);
  } else {
    CHECK(lanes >= int64_t{a.tile_h} * a.tile_w);
    CHECK(max_tap + int64_t{a.tile_h - 1} * g.stride_h * a.tile_cols + int64_t{a.tile_w - 1} * g.stride_w < window_len);
    CHECK(P <= 2);
  }
  if (half) {  // 32-bit loads of pixel pairs: even strides, the shifted copy where offsets can be odd
    CHECK(p.affine && P >= 2 && a.chan_stride % 2 == 0 && a.tile_cols % 2 == 0 && window_len % 2 == 0);
    CHECK((a.half_copy != 0) == (g.kernel_w > 1 && g.dilation_w % 2 == 1));
    CHECK(a.half_copy == 0 || int64_t{a.tile_floats} == a.half_copy);  // two copies of half_copy 2-byte values
  } else {
    CHECK(a.half_copy == 0);
  }
}

}  // namespace

int main() {
  std::mt19937_64 rng(20261203);
  auto pick = [&](std::initializer_list<int64_t> values) {
    return *(values.begin() + std::uniform_int_distribution<size_t>(0, values.size() - 1)(rng));
  };
  const DeviceLimits limits;  // the H200's
  int checked = 0;
  for (int i = 0; i < 3000; ++i) {
    ConvGeometry g;
    g.batch = pick({1, 1, 2, 3, 32});
    g.in_c = pick({1, 3, 7, 8, 16, 24, 37, 64, 128, 256, 300, 512, 1024, 2048});
    g.out_c = pick({1, 2, 5, 17, 32, 40, 64, 256, 512, 2048});
    g.kernel_h = pick({1, 1, 2, 3, 3, 4, 5});
    g.kernel_w = pick({1, 1, 2, 3, 3, 4, 5});
    g.stride_h = pick({1, 1, 1, 2, 3});
    g.stride_w = pick({1, 1, 1, 2, 3});
    g.dilation_h = pick({1, 1, 1, 2, 3});
    g.dilation_w = pick({1, 1, 1, 2, 3});
    g.in_h = pick({1, 2, 5, 7, 9, 14, 28, 56, 112});
    g.in_w = pick({1, 3, 7, 9, 14, 28, 56, 112});
    g.pad_h_lo = g.pad_h_hi = std::uniform_int_distribution<int64_t>(0, g.kernel_h / 2 * g.dilation_h)(rng);
    g.pad_w_lo = g.pad_w_hi = std::uniform_int_distribution<int64_t>(0, g.kernel_w / 2 * g.dilation_w)(rng);
    g.out_h = ConvGeometry::OutputSize(g.in_h, g.kernel_h, g.stride_h, g.pad_h_lo, g.pad_h_hi, g.dilation_h);
    g.out_w = ConvGeometry::OutputSize(g.in_w, g.kernel_w, g.stride_w, g.pad_w_lo, g.pad_w_hi, g.dilation_w);
    if (g.out_h <= 0 || g.out_w <= 0) continue;
    const double density = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
    g.nnz = static_cast<int64_t>(density * g.taps() * g.out_c);
    g.has_bias = rng() & 1;
    g.relu = rng() & 1;
    for (Variant v : {Variant::kPlain, Variant::kStaged, Variant::kCluster, Variant::kHalfWindow})
      for (int elem_bytes : {4, 2}) {
        CheckPlan(g, v, elem_bytes, limits);
        ++checked;
      }
  }
  if (failures) {
    std::printf("%d violations in %d plans\n", failures, checked);
    return 1;
  }
  std::printf("checked %d geometry x variant x element-size cases; plans found (f32, 16-bit):", checked);
  for (const auto& counts : planned) std::printf(" %d/%d", counts[0], counts[1]);
  std::printf(" (plain, staged, cluster, half-width)\n");
  return 0;
}
