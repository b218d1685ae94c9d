#include "cpu/sparse_conv_cpu.h"

#include <algorithm>
#include <vector>

#include "cpu/cpu_common.h"

namespace jaxsparse {

using cpu::LoadElement;
using cpu::ParallelFor;
using cpu::PaddedInput;
using cpu::StoreElement;

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

// Direct sparse convolution, Escoin-style: with the input padded and
// channel-major, every nonzero is one offset, and one output row (n, oh, all
// ow) of one channel is an axpy over a contiguous (stride 1) input row.
void SparseConvCpu(const ConvGeometry& g, ElementType type, const void* x,
                   const void* values, const int32_t* indices,
                   const int32_t* indptr, const void* bias, void* out,
                   int num_threads) {
  // Work items: (n, oh) output rows, each split into channel blocks when there
  // are fewer rows than threads (batch 1, 1-D maps), so every core gets work.
  const int64_t rows_total = g.batch * g.out_h;
  const int threads = cpu::ThreadCount(num_threads, rows_total * g.out_c);
  const int64_t channel_blocks =
      std::min<int64_t>(g.out_c, std::max<int64_t>(1, (2 * threads + rows_total - 1) / rows_total));
  const int64_t block_size = (g.out_c + channel_blocks - 1) / channel_blocks;
  const PaddedInput padded(g, type, x, threads);

  std::vector<float> value_f(static_cast<size_t>(g.nnz));
  std::vector<int64_t> offset(static_cast<size_t>(g.nnz));
  for (int64_t j = 0; j < g.nnz; ++j) {
    value_f[j] = LoadElement(type, values, j);
    offset[j] = padded.Offset(g, indices[j]);
  }
  std::vector<float> bias_f(static_cast<size_t>(g.out_c), 0.0f);
  if (bias != nullptr) bias_f = cpu::ToFloat(type, bias, g.out_c);

  ParallelFor(threads, rows_total * channel_blocks, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(block_size * g.out_w));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / channel_blocks;
      const int64_t r_begin = (item % channel_blocks) * block_size;
      const int64_t r_end = std::min(g.out_c, r_begin + block_size);
      const int64_t n = row / g.out_h, oh = row % g.out_h;
      const float* base = padded.data.data() + n * padded.image + oh * g.stride_h * padded.wp;
      for (int64_t r = r_begin; r < r_end; ++r) {
        float* a = acc.data() + (r - r_begin) * g.out_w;
        std::fill(a, a + g.out_w, bias_f[r]);
        for (int64_t j = indptr[r]; j < indptr[r + 1]; ++j) {
          const float v = value_f[j];
          const float* src = base + offset[j];
          if (g.stride_w == 1) {
            for (int64_t ow = 0; ow < g.out_w; ++ow) a[ow] += v * src[ow];
          } else {
            for (int64_t ow = 0; ow < g.out_w; ++ow) a[ow] += v * src[ow * g.stride_w];
          }
        }
      }
      const int64_t out_base = row * g.out_w * g.out_c;
      for (int64_t ow = 0; ow < g.out_w; ++ow)
        for (int64_t r = r_begin; r < r_end; ++r) {
          const float v = acc[(r - r_begin) * g.out_w + ow];
          StoreElement(type, out, out_base + ow * g.out_c + r, g.relu ? std::max(v, 0.0f) : v);
        }
    }
  });
}

// Gradient of the convolution with respect to the nonzero values: for each
// nonzero j of row r, the sum over (n, oh, ow) of dy[n, oh, ow, r] times the
// input element that j multiplies. Work is split over rows.
void SparseConvFilterGradCpu(const ConvGeometry& g, ElementType type, const void* x,
                             const void* dy, const int32_t* indices, const int32_t* indptr,
                             void* grad_values, int num_threads) {
  const int threads = cpu::ThreadCount(num_threads, g.out_c);
  const PaddedInput padded(g, type, x, threads);
  // dy as (Cout, N, Ho, Wo) float32, so that one row's pixels are contiguous.
  const int64_t pixels = g.output_pixels();
  std::vector<float> dy_t(static_cast<size_t>(pixels * g.out_c));
  for (int64_t p = 0; p < pixels; ++p)
    for (int64_t r = 0; r < g.out_c; ++r) dy_t[r * pixels + p] = LoadElement(type, dy, p * g.out_c + r);

  ParallelFor(threads, g.out_c, [&](int64_t begin, int64_t end) {
    // Elementwise partial sums over ow vectorise (a scalar reduction would not,
    // float addition not being associative); they are added up at the end.
    std::vector<float> partial(static_cast<size_t>(g.out_w));
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t j = indptr[r]; j < indptr[r + 1]; ++j) {
        const int64_t offset = padded.Offset(g, indices[j]);
        std::fill(partial.begin(), partial.end(), 0.0f);
        float* part = partial.data();
        for (int64_t n = 0; n < g.batch; ++n) {
          for (int64_t oh = 0; oh < g.out_h; ++oh) {
            const float* d = dy_t.data() + r * pixels + (n * g.out_h + oh) * g.out_w;
            const float* src = padded.data.data() + n * padded.image + oh * g.stride_h * padded.wp + offset;
            if (g.stride_w == 1) {
              for (int64_t ow = 0; ow < g.out_w; ++ow) part[ow] += d[ow] * src[ow];
            } else {
              for (int64_t ow = 0; ow < g.out_w; ++ow) part[ow] += d[ow] * src[ow * g.stride_w];
            }
          }
        }
        float sum = 0.0f;
        for (int64_t ow = 0; ow < g.out_w; ++ow) sum += part[ow];
        StoreElement(type, grad_values, j, sum);
      }
    }
  });
}

}  // namespace jaxsparse
