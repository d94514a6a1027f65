// Launch geometry shared by the CUDA kernels.
#pragma once
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

namespace robustops {

constexpr int kThreads = 256;

// Blocks of kThreads for `items` independent work items, capped at `per_sm` blocks per SM: the
// grid-stride loops of the kernels cover the rest, so huge tensors do not launch millions of blocks.
inline int blocks_for(int64_t items, int per_sm = 16) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, static_cast<int64_t>(sms) * per_sm)));
}

}  // namespace robustops
