// Host-side tile planner for the tiled sparse convolution kernels (see tiled_plan.h).
// A small cost model in shared-memory wavefronts (~ SM cycles): the inner loop
// costs P + 0.5 wavefronts per nonzero per 32*P-pixel chunk (P tile loads and
// half a 16-byte broadcast of two (offset, value) pairs), plus the fill of the
// input window, the staged output write, and a fixed per-block latency.
#include "gpu/tiled_plan.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace jaxsparse {
namespace tiled {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t RoundUp(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }

bool FitsInt32(int64_t v) { return v >= 0 && v <= INT32_MAX; }

// Cost of one nonzero for a warp's 32 * P pixels, in SM cycles: the float32 window is
// bound by shared memory (P wavefronts + half a 16-byte metadata broadcast); the
// half-width one needs P / 2 wavefronts but issues a conversion per value, so with four
// schedulers its P / 2 loads + P conversions + P FMAs + the broadcast bound it instead.
double PerNonzeroCost(int p, bool half) {
  if (!half) return p + 0.5;
  return std::max(p / 2.0 + 0.5, (2.5 * p + 1.0) / 4.0);
}

}  // namespace

Plan ChooseTilePlan(const ConvGeometry& g, int elem_bytes, const DeviceLimits& limits, Variant variant) {
  Plan best;
  const bool staged = variant == Variant::kStaged;
  const bool cluster = variant == Variant::kCluster;
  const bool half = variant == Variant::kHalfWindow;
  if (cluster && !limits.clusters) return best;
  if (half && elem_bytes != 2) return best;
  // Half-width: a copy shifted by one element when a horizontal tap offset can be odd.
  const int64_t copies = half && g.kernel_w > 1 && g.dilation_w % 2 == 1 ? 2 : 1;
  const int64_t vals[] = {g.batch, g.in_h, g.in_w, g.in_c, g.out_h, g.out_w, g.out_c,
                          g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.pad_h_lo,
                          g.pad_w_lo, g.dilation_h, g.dilation_w, g.nnz, g.taps()};
  for (int64_t v : vals)
    if (!FitsInt32(v)) return best;
  if (g.output_pixels() == 0 || g.out_c == 0) return best;
  // Global element offsets are computed in 64 bits; per-image sizes in 32.
  if (!FitsInt32(g.in_h * g.in_w * g.in_c) || !FitsInt32(g.out_h * g.out_w * g.out_c)) return best;

  const int64_t ho = g.out_h, wo = g.out_w, cin = g.in_c, cout = g.out_c;

  std::vector<int64_t> tws, ths, gs;
  for (int64_t k = 1; k <= 16; ++k) tws.push_back(CeilDiv(wo, k));
  for (int64_t t : {1, 2, 4, 8, 16, 24})
    if (t < wo) tws.push_back(t);
  for (int64_t m = 1; m <= 32; ++m)
    if (32 * m < wo) tws.push_back(32 * m);
  for (int64_t t : {1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32})
    if (t < ho) ths.push_back(t);
  ths.push_back(ho);
  for (int64_t v : {1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32})
    if (v <= cout) gs.push_back(v);
  std::sort(tws.begin(), tws.end());
  tws.erase(std::unique(tws.begin(), tws.end()), tws.end());
  const int vec = 16 / elem_bytes;
  // Input-channel chunks: all of Cin, or (cluster) 2..8 chunks of whole 16-byte vectors.
  std::vector<std::pair<int64_t, int64_t>> splits;  // (chunks, channels per chunk)
  if (!cluster) {
    splits.push_back({1, cin});
  } else {
    for (int64_t c = 2; c <= kMaxClusterChunks; c *= 2) {
      const int64_t cc = cin % vec == 0 ? RoundUp(CeilDiv(cin, c), vec) : CeilDiv(cin, c);
      if ((c - 1) * cc < cin) splits.push_back({c, cc});  // no empty chunk
    }
  }

  const double sms = limits.sm_count;
  for (const auto& [nchunks, cc] : splits)
  for (int64_t tw : tws) {
    if (tw < 1) continue;
    for (int64_t th : ths) {
      int64_t twp = (tw - 1) * g.stride_w + (g.kernel_w - 1) * g.dilation_w + 1;
      const int64_t tr = (th - 1) * g.stride_h + (g.kernel_h - 1) * g.dilation_h + 1;
      const bool affine = g.stride_w == 1 && (g.stride_h == 1 || th == 1);
      if (half && !affine) continue;  // pixel pairs need stride-1 virtual pixels
      if (half) twp = RoundUp(twp, 2);  // even row pitch: row offsets stay even
      const int64_t tpv = affine ? th * twp : th * tw;
      // Pixels per thread: fewest issue cycles per nonzero over the tile.
      int p_best = 1;
      double p_cost = 1e300;
      for (int p : {1, 2, 4, 8}) {
        if (!affine && p > 2) break;  // mode B keeps one address register per pixel
        if (half && p < 2) continue;  // one pixel pair at least
        const double c = static_cast<double>(CeilDiv(tpv, 32 * p)) * PerNonzeroCost(p, half);
        if (c < p_cost - 1e-9) { p_cost = c; p_best = p; }
      }
      const int64_t chunks = CeilDiv(tpv, 32 * p_best);
      // Channel stride in shared memory, chosen so the transposed stores of
      // the fill are conflict-free: the vector fill's warp spans 8 positions x
      // 4 channel vectors of V channels, so V * chan must be 8 (mod 32); the
      // scalar fill's warp spans 32 channels, so chan must be odd.
      int64_t chan = tr * twp;
      if (half) {  // even; 2 (mod 8) keeps the fill's 16-bit stores and reads conflict-free
        while (chan % 8 != 2) ++chan;
      } else if (cin % vec == 0) {
        while ((vec * chan) % 32 != 8) ++chan;
      } else if (chan % 2 == 0) {
        ++chan;
      }
      int64_t max_read = (cc - 1) * chan + (g.kernel_h - 1) * g.dilation_h * twp +
                         (g.kernel_w - 1) * g.dilation_w;
      if (affine) max_read += chunks * 32 * p_best - 1;
      else max_read += (th - 1) * g.stride_h * twp + (tw - 1) * g.stride_w;
      // (Half-width: in 2-byte elements per copy; the 4-byte words of all copies below.)
      const int64_t window_len = RoundUp(std::max(cc * chan, max_read + 1), half ? 8 : 4);
      const int64_t tile_floats = half ? copies * window_len / 2 : window_len;
      if (tile_floats * 4 > limits.max_smem_block) continue;
      const int64_t tiles = g.batch * CeilDiv(ho, th) * CeilDiv(wo, tw);
      const double fill = static_cast<double>(cc * tr * twp) * (2.0 / 32.0 + elem_bytes / 64.0);
      for (int64_t groups : gs) {
        const int64_t rpg = CeilDiv(cout, groups);
        if ((groups - 1) * rpg >= cout) continue;  // an empty group
        const int64_t pitch = rpg | 1;
        const int64_t out_floats = RoundUp(th * tw * pitch, 4);
        const double nnz_g = static_cast<double>(g.nnz) / groups;
        // Staged: the group's row pointers and its decoded pairs (8 bytes each) in shared memory.
        const int64_t ptr_ints = staged ? RoundUp(rpg + 1, 4) : 0;
        const int64_t meta_cap = staged ? std::min<int64_t>(
            RoundUp(g.nnz, 2), RoundUp(static_cast<int64_t>(std::ceil(nnz_g * kStagedSlack)) + 64, 2)) : 0;
        const int64_t smem = 4 * (tile_floats + out_floats + ptr_ints) + 8 * meta_cap + kMetaBytes;
        if (smem > limits.max_smem_block) continue;
        // (Cluster: 64 registers x 512 threads allow two blocks per SM.)
        const int64_t bps = std::min<int64_t>(cluster ? 2 : 4, limits.max_smem_sm / (smem + 1024));
        if (bps < 1) continue;
        const int64_t blocks = tiles * groups * nchunks;
        if (blocks > INT32_MAX) continue;
        const int64_t tasks = rpg * chunks;
        // Streaming: each task decodes its row per 32 nonzeros behind dependent global loads.
        // Staged: the block decodes its group once; a task only reads shared memory.
        // Cluster: a task applies its chunk's share of the row but scans the whole row.
        double compute = nnz_g / nchunks * chunks * PerNonzeroCost(p_best, half) +
                         (staged ? nnz_g * 0.5 + static_cast<double>(tasks) * 4.0
                                 : nnz_g / 32.0 * chunks * (cluster ? 14.0 : 10.0) +
                                       static_cast<double>(tasks) * 20.0);
        if (tasks < 2 * kWarps) compute *= (2.0 * kWarps) / static_cast<double>(tasks);
        // Cluster: every block also reads its share of the other chunks' partial results.
        const double out = static_cast<double>(th * tw * rpg) * (2.0 / 32.0 + elem_bytes / 64.0) +
                           (cluster ? static_cast<double>(th * tw * rpg) * 4.0 / 32.0 + 500.0 : 0.0);
        const double fixed = 2000.0;
        const double cost = std::ceil(blocks / sms) * (compute + fill + out) +
                            std::ceil(blocks / (sms * bps)) * fixed;
        if (!best.ok || cost < best.cost * 0.999) {
          best.ok = true;
          best.variant = variant;
          best.cost = cost;
          best.affine = affine;
          best.pixels_per_thread = p_best;
          best.smem_bytes = static_cast<int>(smem);
          best.blocks = blocks;
          TileArgs& a = best.args;
          a.n_images = static_cast<int>(g.batch);
          a.in_h = static_cast<int>(g.in_h); a.in_w = static_cast<int>(g.in_w);
          a.in_c = static_cast<int>(cin);
          a.out_h = static_cast<int>(ho); a.out_w = static_cast<int>(wo);
          a.out_c = static_cast<int>(cout);
          a.kernel_h = static_cast<int>(g.kernel_h); a.kernel_w = static_cast<int>(g.kernel_w);
          a.stride_h = static_cast<int>(g.stride_h); a.stride_w = static_cast<int>(g.stride_w);
          a.pad_h = static_cast<int>(g.pad_h_lo); a.pad_w = static_cast<int>(g.pad_w_lo);
          a.dil_h = static_cast<int>(g.dilation_h); a.dil_w = static_cast<int>(g.dilation_w);
          a.taps = static_cast<int>(g.taps()); a.nnz = static_cast<int>(g.nnz);
          a.relu = g.relu ? 1 : 0; a.has_bias = g.has_bias ? 1 : 0;
          a.tile_h = static_cast<int>(th); a.tile_w = static_cast<int>(tw);
          a.tile_rows = static_cast<int>(tr); a.tile_cols = static_cast<int>(twp);
          a.chan_stride = static_cast<int>(chan);
          a.tiles_h = static_cast<int>(CeilDiv(ho, th));
          a.tiles_w = static_cast<int>(CeilDiv(wo, tw));
          a.groups = static_cast<int>(groups); a.rows_per_group = static_cast<int>(rpg);
          a.chunks = static_cast<int>(chunks);
          a.tile_floats = static_cast<int>(tile_floats);
          a.out_pitch = static_cast<int>(pitch);
          a.out_floats = static_cast<int>(out_floats);
          a.vec_fill = (cin % (16 / elem_bytes)) == 0 ? 1 : 0;
          a.meta_cap = static_cast<int>(meta_cap);
          a.ptr_ints = static_cast<int>(ptr_ints);
          a.cin_chunk = static_cast<int>(cc);
          a.cin_chunks = static_cast<int>(nchunks);
          a.half_copy = copies == 2 ? static_cast<int>(window_len) : 0;
          a.div_cin = FastDiv::Make(static_cast<uint32_t>(cin));
          a.div_kw = FastDiv::Make(static_cast<uint32_t>(g.kernel_w));
        }
      }
    }
  }
  return best;
}

}  // namespace tiled
}  // namespace jaxsparse
