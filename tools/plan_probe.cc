// Prints the tiled planner's choice (plain and cluster for float32, plain and half-width for bf16) for the benchmark layers,
// on the host with the H200's limits, without a GPU:
//   g++ -O2 -std=c++17 -I cuda -x c++ cuda/gpu/tiled_plan.cu tools/plan_probe.cc -o /tmp/plan_probe
#include <cstdio>
#include <initializer_list>

#include "gpu/tiled_plan.h"

using jaxsparse::ConvGeometry;
using namespace jaxsparse::tiled;

namespace {

ConvGeometry Layer(int64_t batch, int64_t hw, int64_t cin, int64_t cout, int64_t k, double density) {
  ConvGeometry g;
  g.batch = batch;
  g.in_h = g.in_w = g.out_h = g.out_w = hw;
  g.in_c = cin;
  g.out_c = cout;
  g.kernel_h = g.kernel_w = k;
  g.pad_h_lo = g.pad_h_hi = g.pad_w_lo = g.pad_w_hi = k / 2;
  g.nnz = static_cast<int64_t>(density * cin * cout * k * k);
  if (k == 1) {  // the SpMM form the launcher plans: N*H*W pixels in one row
    g.in_w = g.out_w = batch * hw * hw;
    g.in_h = g.out_h = g.batch = 1;
  }
  return g;
}

void Print(const char* name, const ConvGeometry& g) {
  const DeviceLimits limits;
  struct Case { Variant v; int elem_bytes; const char* label; };
  for (const Case c : {Case{Variant::kPlain, 4, "plain"}, Case{Variant::kCluster, 4, "cluster"},
                       Case{Variant::kPlain, 2, "plain16"}, Case{Variant::kHalfWindow, 2, "half16"}}) {
    const Plan p = ChooseTilePlan(g, c.elem_bytes, limits, c.v);
    if (!p.ok) { std::printf("%-14s %-7s no plan\n", name, c.label); continue; }
    const TileArgs& a = p.args;
    std::printf("%-14s %-7s blocks %6lld tile %3dx%-3d P %d groups %3d x %3d rows  chunks %d x %4d ch  smem %3d KB"
                "  copy %d  cost %.0f\n",
                name, c.label, static_cast<long long>(p.blocks), a.tile_h, a.tile_w, p.pixels_per_thread,
                a.groups, a.rows_per_group, a.cin_chunks, a.cin_chunk, p.smem_bytes / 1024, a.half_copy > 0, p.cost);
  }
}

}  // namespace

int main() {
  for (int64_t b : {int64_t{1}, int64_t{32}}) {
    std::printf("batch %lld, 90 %%\n", static_cast<long long>(b));
    Print("conv3_2", Layer(b, 56, 256, 256, 3, 0.1));
    Print("conv4_2", Layer(b, 28, 512, 512, 3, 0.1));
    Print("conv5_1", Layer(b, 14, 512, 512, 3, 0.1));
    Print("conv1_2", Layer(b, 224, 64, 64, 3, 0.1));
    Print("conv2_2", Layer(b, 112, 128, 128, 3, 0.1));
    Print("r50 g1 red", Layer(b, 56, 256, 64, 1, 0.1));
    Print("r50 g1 exp", Layer(b, 56, 64, 256, 1, 0.1));
    Print("r50 g2 red", Layer(b, 28, 512, 128, 1, 0.1));
    Print("r50 g3 red", Layer(b, 14, 1024, 256, 1, 0.1));
    Print("r50 g4 red", Layer(b, 7, 2048, 512, 1, 0.1));
    Print("r50 g4 exp", Layer(b, 7, 512, 2048, 1, 0.1));
  }
  return 0;
}
