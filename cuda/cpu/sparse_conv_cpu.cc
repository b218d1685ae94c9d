#include "cpu/sparse_conv_cpu.h"

#include <algorithm>
#include <cstdlib>
#include <thread>
#include <vector>

#include "half_float.h"

namespace jaxsparse {
namespace {

float LoadElement(ElementType type, const void* base, int64_t i) {
  switch (type) {
    case ElementType::kF32: return static_cast<const float*>(base)[i];
    case ElementType::kBF16: return BF16ToFloat(static_cast<const uint16_t*>(base)[i]);
    case ElementType::kF16: return F16ToFloat(static_cast<const uint16_t*>(base)[i]);
  }
  return 0.0f;
}

void StoreElement(ElementType type, void* base, int64_t i, float v) {
  switch (type) {
    case ElementType::kF32: static_cast<float*>(base)[i] = v; break;
    case ElementType::kBF16: static_cast<uint16_t*>(base)[i] = FloatToBF16(v); break;
    case ElementType::kF16: static_cast<uint16_t*>(base)[i] = FloatToF16(v); break;
  }
}

std::vector<float> ToFloat(ElementType type, const void* data, int64_t count) {
  std::vector<float> result(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) result[i] = LoadElement(type, data, i);
  return result;
}

// One nonzero, decoded once per call: its value, its input channel and its
// spatial displacement inside the (dilated) receptive field.
struct Tap {
  float value;
  int32_t channel;
  int32_t dy;   // kh * dilation_h
  int32_t dx;   // kw * dilation_w
  int64_t offset;  // (dy * W + dx) * Cin + channel, for interior pixels
};

int ThreadCount(int requested, int64_t work_items) {
  int threads = requested;
  if (threads <= 0) {
    if (const char* env = std::getenv("JAXSPARSE_CPU_THREADS")) threads = std::atoi(env);
  }
  if (threads <= 0) threads = static_cast<int>(std::thread::hardware_concurrency());
  threads = std::max(threads, 1);
  return static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(work_items, 1)));
}

}  // namespace

std::string CheckCsrStructure(const ConvGeometry& g, const int32_t* indices,
                              const int32_t* indptr) {
  if (indptr[0] != 0) return "row pointers must start at 0";
  for (int64_t r = 0; r < g.out_c; ++r) {
    if (indptr[r + 1] < indptr[r]) return "row pointers must be non-decreasing";
  }
  if (indptr[g.out_c] != g.nnz) return "last row pointer must equal the number of nonzeros";
  const int64_t taps = g.taps();
  for (int64_t j = 0; j < g.nnz; ++j) {
    if (indices[j] < 0 || indices[j] >= taps) return "column index out of range";
  }
  return {};
}

void SparseConvCpu(const ConvGeometry& g, ElementType type, const void* x,
                   const void* values, const int32_t* indices,
                   const int32_t* indptr, const void* bias, void* out,
                   int num_threads) {
  // Inputs are converted to float32 once; accumulation is float32.
  const std::vector<float> xf = ToFloat(type, x, g.batch * g.in_h * g.in_w * g.in_c);
  std::vector<float> bias_f(static_cast<size_t>(g.out_c), 0.0f);
  if (bias != nullptr) bias_f = ToFloat(type, bias, g.out_c);

  std::vector<Tap> taps(static_cast<size_t>(g.nnz));
  for (int64_t j = 0; j < g.nnz; ++j) {
    const int32_t c = indices[j];
    const int32_t ci = static_cast<int32_t>(c % g.in_c);
    const int64_t k = c / g.in_c;
    Tap& t = taps[j];
    t.value = LoadElement(type, values, j);
    t.channel = ci;
    t.dy = static_cast<int32_t>((k / g.kernel_w) * g.dilation_h);
    t.dx = static_cast<int32_t>((k % g.kernel_w) * g.dilation_w);
    t.offset = (int64_t{t.dy} * g.in_w + t.dx) * g.in_c + ci;
  }
  const int64_t span_h = (g.kernel_h - 1) * g.dilation_h;
  const int64_t span_w = (g.kernel_w - 1) * g.dilation_w;

  auto run_pixels = [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(g.out_c));
    for (int64_t p = begin; p < end; ++p) {
      const int64_t ow = p % g.out_w;
      const int64_t oh = (p / g.out_w) % g.out_h;
      const int64_t n = p / (g.out_w * g.out_h);
      const int64_t ih0 = oh * g.stride_h - g.pad_h_lo;
      const int64_t iw0 = ow * g.stride_w - g.pad_w_lo;
      const bool interior = ih0 >= 0 && iw0 >= 0 && ih0 + span_h < g.in_h &&
                            iw0 + span_w < g.in_w;
      const float* image = xf.data() + n * g.in_h * g.in_w * g.in_c;
      for (int64_t r = 0; r < g.out_c; ++r) {
        float sum = bias_f[r];
        const Tap* row = taps.data() + indptr[r];
        const int64_t length = indptr[r + 1] - indptr[r];
        if (interior) {
          const float* corner = image + (ih0 * g.in_w + iw0) * g.in_c;
          for (int64_t j = 0; j < length; ++j) sum += row[j].value * corner[row[j].offset];
        } else {
          for (int64_t j = 0; j < length; ++j) {
            const int64_t ih = ih0 + row[j].dy, iw = iw0 + row[j].dx;
            if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) continue;
            sum += row[j].value * image[(ih * g.in_w + iw) * g.in_c + row[j].channel];
          }
        }
        acc[r] = g.relu ? std::max(sum, 0.0f) : sum;
      }
      for (int64_t r = 0; r < g.out_c; ++r) StoreElement(type, out, p * g.out_c + r, acc[r]);
    }
  };

  const int64_t pixels = g.output_pixels();
  const int threads = ThreadCount(num_threads, pixels);
  if (threads == 1) {
    run_pixels(0, pixels);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(threads);
  const int64_t chunk = (pixels + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const int64_t begin = t * chunk, end = std::min(pixels, begin + chunk);
    if (begin >= end) break;
    workers.emplace_back(run_pixels, begin, end);
  }
  for (std::thread& w : workers) w.join();
}

}  // namespace jaxsparse
