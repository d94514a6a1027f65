// Launch geometry shared by the CUDA kernels.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

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

// The host-offset random ops bake (seed, offset) into the launch: captured in a CUDA graph they would
// draw the same numbers at every replay. They refuse capture and point to the device-offset form.
inline void refuse_capture(const char* op) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &status));
  TORCH_CHECK(status == cudaStreamCaptureStatusNone, op,
              " with an integer offset cannot be captured in a CUDA graph: every replay would draw the same "
              "numbers. Pass the offset as a one-element int64 tensor on the GPU (robustops.ops.", op,
              "(..., offset=torch.zeros((), dtype=torch.int64, device='cuda'))): the op reads it on the device "
              "and advances it, so each replay draws the next numbers.");
}

// Reads a device-offset op's offset inside a kernel: the device value when given, else the host one.
__device__ __forceinline__ uint64_t read_offset(const int64_t* dev, uint64_t host) {
  return dev != nullptr ? static_cast<uint64_t>(*dev) : host;
}

}  // namespace robustops
