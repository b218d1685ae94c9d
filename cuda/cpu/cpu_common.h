// Helpers shared by the CPU kernels: element conversion, threading, and the
// zero-padded channel-major float32 copy of an NHWC tensor that turns every
// filter tap into one offset.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "conv_geometry.h"
#include "half_float.h"

namespace jaxsparse::cpu {

inline float LoadElement(ElementType type, const void* base, int64_t i) {
  switch (type) {
    case ElementType::kF32: return static_cast<const float*>(base)[i];
    case ElementType::kBF16: return BF16ToFloat(static_cast<const uint16_t*>(base)[i]);
    case ElementType::kF16: return F16ToFloat(static_cast<const uint16_t*>(base)[i]);
  }
  return 0.0f;
}

inline void StoreElement(ElementType type, void* base, int64_t i, float v) {
  switch (type) {
    case ElementType::kF32: static_cast<float*>(base)[i] = v; break;
    case ElementType::kBF16: static_cast<uint16_t*>(base)[i] = FloatToBF16(v); break;
    case ElementType::kF16: static_cast<uint16_t*>(base)[i] = FloatToF16(v); break;
  }
}

inline std::vector<float> ToFloat(ElementType type, const void* data, int64_t count) {
  std::vector<float> result(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) result[i] = LoadElement(type, data, i);
  return result;
}

// Threads to use: `requested` (the FFI attribute `threads`), or all hardware
// threads when it is 0; never more than there are work items.
inline int ThreadCount(int requested, int64_t work_items) {
  int threads = requested;
  if (threads <= 0) threads = static_cast<int>(std::thread::hardware_concurrency());
  threads = std::max(threads, 1);
  return static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(work_items, 1)));
}

// Runs body(begin, end) over [0, count) split in contiguous chunks.
template <typename Body>
void ParallelFor(int threads, int64_t count, Body&& body) {
  if (threads <= 1 || count < 2) {
    body(int64_t{0}, count);
    return;
  }
  std::vector<std::thread> workers;
  const int64_t chunk = (count + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const int64_t begin = t * chunk, end = std::min(count, begin + chunk);
    if (begin >= end) break;
    workers.emplace_back(body, begin, end);
  }
  for (std::thread& w : workers) w.join();
}

// The input of a convolution as (N, C, Hp, Wp) float32 with the padding
// materialised as zeros; tap (kh, kw, ci) of output (oh, ow) then sits at
// Offset(tap) + oh * stride_h * wp + ow * stride_w inside image n.
struct PaddedInput {
  int64_t hp, wp, plane, image;
  std::vector<float> data;

  PaddedInput(const ConvGeometry& g, ElementType type, const void* x, int threads)
      : hp(g.in_h + g.pad_h_lo + g.pad_h_hi), wp(g.in_w + g.pad_w_lo + g.pad_w_hi),
        plane(hp * wp), image(plane * g.in_c), data(static_cast<size_t>(g.batch * image), 0.0f) {
    ParallelFor(threads, g.batch * g.in_h, [&](int64_t begin, int64_t end) {
      for (int64_t nh = begin; nh < end; ++nh) {
        const int64_t n = nh / g.in_h, h = nh % g.in_h;
        float* dst = data.data() + n * image + (h + g.pad_h_lo) * wp + g.pad_w_lo;
        const int64_t src = nh * g.in_w * g.in_c;
        for (int64_t w = 0; w < g.in_w; ++w)
          for (int64_t c = 0; c < g.in_c; ++c)
            dst[c * plane + w] = LoadElement(type, x, src + w * g.in_c + c);
      }
    });
  }

  // Offset of filter column `column` ((kh * KW + kw) * Cin + ci) inside an image.
  int64_t Offset(const ConvGeometry& g, int64_t column) const {
    const int64_t ci = column % g.in_c, k = column / g.in_c;
    return ci * plane + (k / g.kernel_w) * g.dilation_h * wp + (k % g.kernel_w) * g.dilation_w;
  }
};

}  // namespace jaxsparse::cpu
