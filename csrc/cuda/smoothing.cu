// CUDA kernels of the smoothing family: gaussian_noise (gaussian_noise_rows: the same kernels reading each
// output row's input, key and noisy-row number from tables) and count_votes_ (count_votes_segments_: the
// count row from a table).
//
// gaussian_noise: one thread per Philox call, i.e. per group of four logical elements of a noisy
// sample; the four normals are written with one vector store (contiguous output). For channels_last
// output with HW % 4 == 0 a thread instead takes four spatial positions across all C channels, so
// its 4*C outputs are adjacent in memory. The input (num times smaller than the output) is read
// through the cache. Box-Muller uses the accurate logf and sincospif (philox.h's normals4, the
// same function the CPU kernel's scalar path runs), so the GPU draws the CPU's normals to ~1e-7.
// The offset is a host int, or (gaussian_noise_dev_offset) a device int64 that the op advances by
// the rows it drew, so that a CUDA graph replays fresh noise.
//
// count_votes_: the argmax of a row by one thread (C <= 32) or one warp (larger C); the histogram
// update is aggregated across the warp with __match_any_sync, because consecutive rows belong to
// the same input and mostly vote for the same class: one atomic per distinct (input, class) in a
// warp instead of one per row.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include "../common.h"
#include "../smoothing.h"
#include "launch.cuh"

namespace robustops {
namespace {

template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};

template <typename TI, typename TO, bool VEC>
__global__ void noise_kernel(const TI* __restrict__ x, TO* __restrict__ out, NoiseGeometry g,
                             const float* __restrict__ mean, const float* __restrict__ istd, float sigma,
                             NoiseRows map, const int64_t* dev_offset, int64_t inputs) {
  map.offset = read_offset(dev_offset, map.offset);
  const int64_t total = g.B * g.num * g.groups;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / g.groups, q = t - r * g.groups;
    float z[4];
    normals4(philox4x32_10(map.philox_key(r), map.philox_row(r) * static_cast<uint64_t>(g.groups) +
                                                   static_cast<uint64_t>(q), kStreamGaussian),
             z);
    const int64_t in = map.input(r);
    CUDA_KERNEL_ASSERT(in >= 0 && in < inputs);
    const TI* xr = x + in * g.D;
    TO* orow = out + r * g.D;
    const int64_t e0 = q * 4;
    if (VEC) {  // D % 4 == 0, contiguous output, 4-element aligned: one vector store
      const int64_t c = g.channel(e0);  // HW % 4 == 0 or C == 1: the group lies in one channel
      const float m = mean ? mean[c] : 0.f, s = istd ? istd[c] : 1.f;
      Quad<TO> o;
#pragma unroll
      for (int k = 0; k < 4; ++k) o.v[k] = static_cast<TO>(noise_value(static_cast<float>(__ldg(xr + e0 + k)), z[k], sigma, m, s));
      *reinterpret_cast<Quad<TO>*>(orow + e0) = o;
    } else {
      const int64_t n = g.D - e0 < 4 ? g.D - e0 : 4;
      for (int64_t k = 0; k < n; ++k) {
        const int64_t e = e0 + k, c = g.channel(e);
        const float v = noise_value(static_cast<float>(__ldg(xr + e)), z[k], sigma, mean ? mean[c] : 0.f,
                                    istd ? istd[c] : 1.f);
        orow[g.out_offset(e, c)] = static_cast<TO>(v);
      }
    }
  }
}

// channels_last with HW % 4 == 0: thread = (row, four spatial positions), all channels.
template <typename TI, typename TO>
__global__ void noise_cl_kernel(const TI* __restrict__ x, TO* __restrict__ out, NoiseGeometry g,
                                const float* __restrict__ mean, const float* __restrict__ istd, float sigma,
                                NoiseRows map, const int64_t* dev_offset, int64_t inputs) {
  map.offset = read_offset(dev_offset, map.offset);
  const int64_t quads = g.HW / 4, total = g.B * g.num * quads;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / quads, p = t - r * quads;
    const int64_t in = map.input(r);
    CUDA_KERNEL_ASSERT(in >= 0 && in < inputs);
    const TI* xr = x + in * g.D;
    TO* o = out + r * g.D + p * 4 * g.C;
    const uint64_t key = map.philox_key(r), base = map.philox_row(r) * static_cast<uint64_t>(g.groups);
    for (int64_t c = 0; c < g.C; ++c) {
      float z[4];
      const int64_t e0 = c * g.HW + p * 4;
      normals4(philox4x32_10(key, base + static_cast<uint64_t>(e0 / 4), kStreamGaussian), z);
      const float m = mean ? mean[c] : 0.f, s = istd ? istd[c] : 1.f;
#pragma unroll
      for (int k = 0; k < 4; ++k) o[k * g.C + c] = static_cast<TO>(noise_value(static_cast<float>(__ldg(xr + e0 + k)), z[k], sigma, m, s));
    }
  }
}

void launch_noise(const NoiseArgs& a, double sigma, const NoiseRows& map, const int64_t* dev_offset) {
  const NoiseGeometry g = a.geo;
  cudaStream_t st = at::cuda::getCurrentCUDAStream();
  const float sg = static_cast<float>(sigma);
  const int64_t inputs = a.x.size(0);
  RO_DISPATCH_FLOATING(a.x.scalar_type(), "gaussian_noise", [&] {
    using TI = scalar_t;
    RO_DISPATCH_FLOATING(a.out.scalar_type(), "gaussian_noise", [&] {
      const TI* xp = a.x.data_ptr<TI>();
      scalar_t* op = a.out.data_ptr<scalar_t>();
      const bool group_in_channel = g.C <= 1 || g.HW % 4 == 0;
      if (g.channels_last && g.HW % 4 == 0) {
        noise_cl_kernel<TI, scalar_t><<<blocks_for(g.B * g.num * (g.HW / 4), 32), kThreads, 0, st>>>(
            xp, op, g, a.mean_ptr(), a.istd_ptr(), sg, map, dev_offset, inputs);
      } else if (!g.channels_last && g.D % 4 == 0 && group_in_channel &&
                 reinterpret_cast<uintptr_t>(op) % (4 * sizeof(scalar_t)) == 0) {
        noise_kernel<TI, scalar_t, true><<<blocks_for(g.B * g.num * g.groups, 32), kThreads, 0, st>>>(
            xp, op, g, a.mean_ptr(), a.istd_ptr(), sg, map, dev_offset, inputs);
      } else {
        noise_kernel<TI, scalar_t, false><<<blocks_for(g.B * g.num * g.groups, 32), kThreads, 0, st>>>(
            xp, op, g, a.mean_ptr(), a.istd_ptr(), sg, map, dev_offset, inputs);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor gaussian_noise_impl(const at::Tensor& x_in, int64_t num, double sigma, int64_t seed,
                               const int64_t* dev_offset, int64_t host_offset, const std::optional<at::Tensor>& mean,
                               const std::optional<at::Tensor>& std_, std::optional<at::ScalarType> out_dtype,
                               bool channels_last) {
  NoiseArgs a = prepare_noise(x_in, num, sigma, host_offset, mean, std_, out_dtype, channels_last);
  if (a.out.numel() == 0) return a.out;
  launch_noise(a, sigma, dense_rows(num, seed, host_offset), dev_offset);
  return a.out;
}

at::Tensor gaussian_noise_cuda(const at::Tensor& x_in, int64_t num, double sigma, int64_t seed, int64_t offset,
                               const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std_,
                               std::optional<at::ScalarType> out_dtype, bool channels_last) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  refuse_capture("gaussian_noise");
  return gaussian_noise_impl(x_in, num, sigma, seed, nullptr, offset, mean, std_, out_dtype, channels_last);
}

at::Tensor gaussian_noise_dev_cuda(const at::Tensor& x_in, int64_t num, double sigma, int64_t seed,
                                   at::Tensor& offset, const std::optional<at::Tensor>& mean,
                                   const std::optional<at::Tensor>& std_, std::optional<at::ScalarType> out_dtype,
                                   bool channels_last) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_offset_tensor(offset, x_in);
  at::Tensor out = gaussian_noise_impl(x_in, num, sigma, seed, offset.data_ptr<int64_t>(), 0, mean, std_, out_dtype,
                                       channels_last);
  offset.add_(x_in.size(0) * num);  // after the noise kernel, in stream order
  return out;
}

// The tables live on the device: capturable as they are (a graph replays whatever they hold then). The
// source range is checked by a device assertion, the others need none (any key and row are valid).
at::Tensor gaussian_noise_rows_cuda(const at::Tensor& x_in, const at::Tensor& source, const at::Tensor& key,
                                    const at::Tensor& row, double sigma, const std::optional<at::Tensor>& mean,
                                    const std::optional<at::Tensor>& std_, std::optional<at::ScalarType> out_dtype,
                                    bool channels_last) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto tables = check_noise_rows(x_in, source, key, row);
  NoiseArgs a = prepare_noise(x_in, 1, sigma, 0, mean, std_, out_dtype, channels_last, source.size(0));
  if (a.out.numel() == 0) return a.out;
  launch_noise(a, sigma, table_rows(tables), nullptr);
  return a.out;
}

// Called by every lane of a full warp (the row loop keeps warps converged).
__device__ __forceinline__ void vote(unsigned long long* counts, int64_t key, bool active) {
  const unsigned voters = __ballot_sync(0xffffffffu, active);
  if (!active) return;
  const unsigned peers = __match_any_sync(voters, static_cast<unsigned long long>(key));
  if ((threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(counts + key, static_cast<unsigned long long>(__popc(peers)));
}

// The count row of logits row `row`: segment[row] (count_votes_segments_) or row / num (count_votes_).
__device__ __forceinline__ int64_t count_row(const int64_t* segment, int64_t S, int64_t row, int64_t num) {
  if (segment == nullptr) return row / num;
  const int64_t s = segment[row];
  CUDA_KERNEL_ASSERT(s >= 0 && s < S);
  return s;
}

template <typename T>
__global__ void votes_row_kernel(const T* __restrict__ logits, unsigned long long* counts, int64_t rows, int64_t C,
                                 int64_t num, int64_t s0, int64_t s1, const int64_t* segment, int64_t S) {
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < rows;
       base += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = base + threadIdx.x;
    const bool active = row < rows;
    int64_t key = 0;
    if (active) {
      const T* p = logits + row * C;
      float bv = static_cast<float>(p[0]);
      int64_t bi = 0;
      for (int64_t c = 1; c < C; ++c) {
        const float v = static_cast<float>(p[c]);
        if (vote_better(v, c, bv, bi)) {
          bv = v;
          bi = c;
        }
      }
      key = count_row(segment, S, row, num) * s0 + bi * s1;
    }
    vote(counts, key, active);
  }
}

template <typename T>
__global__ void votes_warp_kernel(const T* __restrict__ logits, unsigned long long* counts, int64_t rows, int64_t C,
                                  int64_t num, int64_t s0, int64_t s1, const int64_t* segment, int64_t S) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5); row < rows;
       row += warps) {
    const T* p = logits + row * C;
    float bv = -INFINITY;
    int64_t bi = C;  // sentinel: loses to any real element
    for (int64_t c = lane; c < C; c += 32) {
      const float v = static_cast<float>(p[c]);
      if (bi == C || vote_better(v, c, bv, bi)) {
        bv = v;
        bi = c;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (oi != C && (bi == C || vote_better(ov, oi, bv, bi))) {
        bv = ov;
        bi = oi;
      }
    }
    if (lane == 0) atomicAdd(counts + count_row(segment, S, row, num) * s0 + bi * s1, 1ull);
  }
}

// Integer atomics: the counts are exact whatever order the rows land in.
void launch_votes(const at::Tensor& logits, at::Tensor& counts, int64_t num, const int64_t* segment) {
  const int64_t S = counts.size(0), C = counts.size(1), rows = logits.size(0);
  auto* cp = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  cudaStream_t st = at::cuda::getCurrentCUDAStream();
  RO_DISPATCH_FLOATING(logits.scalar_type(), "count_votes_", [&] {
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    if (C <= 32) {
      votes_row_kernel<scalar_t><<<blocks_for(rows, 32), kThreads, 0, st>>>(lp, cp, rows, C, num, counts.stride(0),
                                                                          counts.stride(1), segment, S);
    } else {
      votes_warp_kernel<scalar_t><<<blocks_for(rows * 32, 32), kThreads, 0, st>>>(
          lp, cp, rows, C, num, counts.stride(0), counts.stride(1), segment, S);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void count_votes_cuda(const at::Tensor& logits_in, at::Tensor& counts) {
  check_votes(logits_in, counts);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const int64_t B = counts.size(0), rows = logits_in.size(0);
  if (rows == 0 || B == 0) return;
  launch_votes(logits_in.contiguous(), counts, rows / B, nullptr);
}

void count_votes_segments_cuda(const at::Tensor& logits_in, const at::Tensor& segment_in, at::Tensor& counts) {
  check_votes_segments(logits_in, segment_in, counts);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  if (logits_in.size(0) == 0) return;
  const at::Tensor segment = segment_in.contiguous();
  launch_votes(logits_in.contiguous(), counts, 1, segment.data_ptr<int64_t>());
}

}  // namespace
}  // namespace robustops

TORCH_LIBRARY_IMPL(robustops, CUDA, m) {
  m.impl("gaussian_noise", &robustops::gaussian_noise_cuda);
  m.impl("gaussian_noise_dev_offset", &robustops::gaussian_noise_dev_cuda);
  m.impl("count_votes_", &robustops::count_votes_cuda);
  m.impl("gaussian_noise_rows", &robustops::gaussian_noise_rows_cuda);
  m.impl("count_votes_segments_", &robustops::count_votes_segments_cuda);
}
