// Static options of one sparse_conv call, decoded from the FFI attributes
// `kernel` and `precision` (jaxsparse/options.py holds the Python side and the
// codes). Plain C++, no FFI or nanobind headers.
#pragma once

#include <cstdint>

namespace jaxsparse {

// "auto" lets the planner choose; the others force a family where it applies.
// kStaged is the tiled kernel with the block's filter rows staged in shared memory;
// kCluster the tiled kernel with Cin-chunked windows summed across a thread-block cluster;
// kHalfWin the tiled kernel with bf16/f16 windows kept at half width.
enum class KernelFamily : int {
  kAuto = 0, kDirect = 1, kSpmm = 2, kNaive = 3, kRowBucket = 4, kStaged = 5, kCluster = 6,
  kHalfWin = 7
};
constexpr int64_t kKernelFamilyCount = 8;

// lax.Precision's values. HIGHEST forbids TF32 for float32 inputs.
enum class Precision : int { kDefault = 0, kHigh = 1, kHighest = 2 };
constexpr int64_t kPrecisionCount = 3;

struct ConvOptions {
  KernelFamily kernel = KernelFamily::kAuto;
  Precision precision = Precision::kHighest;

  bool allows_tf32() const { return precision != Precision::kHighest; }
};

}  // namespace jaxsparse
