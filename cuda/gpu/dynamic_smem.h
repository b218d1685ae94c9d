// Raising a kernel's dynamic shared-memory limit: a host-side function attribute (not
// stream work, so command-buffer safe), set once per (kernel, device).
#pragma once

#include <mutex>
#include <set>
#include <utility>

#include <cuda_runtime_api.h>

namespace jaxsparse {

// `bytes` < 0: as much as the device's opt-in limit leaves beside the kernel's static
// shared memory.
inline cudaError_t AllowDynamicSmem(const void* kernel, int bytes = -1) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  int dev = 0;
  if (cudaError_t e = cudaGetDevice(&dev); e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(mu);
  if (done.count({kernel, dev})) return cudaSuccess;
  if (bytes < 0) {
    int max_optin = 0;
    cudaError_t e = cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (e != cudaSuccess) return e;
    cudaFuncAttributes attr{};
    if ((e = cudaFuncGetAttributes(&attr, kernel)) != cudaSuccess) return e;
    bytes = max_optin - static_cast<int>(attr.sharedSizeBytes);
  }
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      e != cudaSuccess)
    return e;
  done.insert({kernel, dev});
  return cudaSuccess;
}

}  // namespace jaxsparse
