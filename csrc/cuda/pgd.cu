// CUDA kernels of the PGD family: pgd_step_, random_init, recycle_step_.
//
// All kernels run on the current stream, never synchronize with the host, and compute in fp32
// whatever the storage type. Elementwise kernels move 16 bytes per thread access (float4, or
// eight fp16/bf16 values) whenever the pointers are 16-byte aligned and a vector never straddles
// two samples (D % VEC == 0); otherwise they fall back to one element per access.
//
// L2 kernels need per-sample sums. They use a two-kernel split over (chunk, sample) blocks:
// the first writes per-chunk partial sums, the second lets every block of a sample re-reduce
// that sample's few partials and then apply the update to its chunk. A block-per-sample kernel
// would leave most of an H100 idle at ImageNet batch sizes (256 samples, 132 SMs, long serial
// loops); the split keeps thousands of blocks in flight at both CIFAR and ImageNet sizes.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include "../pgd.h"
#include "launch.cuh"

namespace robustops {
namespace {

constexpr int64_t kChunk = 8192;  // elements per block in the per-sample reductions

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_f(const T* p, float (&f)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) f[j] = static_cast<float>(pk.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_f(T* p, const float (&f)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = static_cast<T>(f[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// Sum of a float over the block; every thread gets the result.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N]) {
  __shared__ float sm[N][kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
  }
  __syncthreads();  // sm may still be read by a previous call
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) sm[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) s += sm[k][w];
    v[k] = s;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

// Whether the 16-byte path applies (see the header comment): aligned pointers, and no vector
// straddling two samples.
template <typename T>
bool can_vectorize(int64_t D, std::initializer_list<const void*> ptrs) {
  if (D % vec_width<T>() != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

// ---------------------------------------------------------------------------------- pgd_step_

template <typename T, int VEC>
__global__ void linf_step_kernel(T* __restrict__ xa, const T* __restrict__ x, const T* __restrict__ g,
                                 int64_t numel, int64_t D, SampleParam eps, SampleParam alpha, float lo,
                                 float hi) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < numel; i += stride) {
    const int64_t b = (eps.ptr || alpha.ptr) ? i / D : 0;
    const float e = eps.get(b), a = alpha.get(b);
    float fa[VEC], fx[VEC], fg[VEC];
    load_f<T, VEC>(xa + i, fa);
    load_f<T, VEC>(x + i, fx);
    load_f<T, VEC>(g + i, fg);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = clampf(fa[j] + a * signf(fg[j]) - fx[j], -e, e);
      fa[j] = clampf(fx[j] + d, lo, hi);
    }
    store_f<T, VEC>(xa + i, fa);
  }
}

// Partial sums of a^2, a.g, g^2 (a = x_adv - x) over chunk blockIdx.x of sample blockIdx.y.
template <typename T, int VEC>
__global__ void l2_partial_kernel(const T* __restrict__ xa, const T* __restrict__ x, const T* __restrict__ g,
                                  int64_t D, float* __restrict__ part) {
  const int64_t b = blockIdx.y, c = blockIdx.x;
  const int64_t i0 = b * D + c * kChunk, i1 = min(i0 + kChunk, (b + 1) * D);
  float s[3] = {0.f, 0.f, 0.f};
  for (int64_t i = i0 + static_cast<int64_t>(threadIdx.x) * VEC; i < i1; i += static_cast<int64_t>(kThreads) * VEC) {
    float fa[VEC], fx[VEC], fg[VEC];
    load_f<T, VEC>(xa + i, fa);
    load_f<T, VEC>(x + i, fx);
    load_f<T, VEC>(g + i, fg);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float a = fa[j] - fx[j];
      s[0] = fmaf(a, a, s[0]);
      s[1] = fmaf(a, fg[j], s[1]);
      s[2] = fmaf(fg[j], fg[j], s[2]);
    }
  }
  block_sum<3>(s);
  if (threadIdx.x == 0) {
    float* p = part + (b * gridDim.x + c) * 3;
    p[0] = s[0];
    p[1] = s[1];
    p[2] = s[2];
  }
}

template <typename T, int VEC>
__global__ void l2_apply_kernel(T* __restrict__ xa, const T* __restrict__ x, const T* __restrict__ g, int64_t D,
                                const float* __restrict__ part, SampleParam eps, SampleParam alpha, float lo,
                                float hi) {
  const int64_t b = blockIdx.y, c = blockIdx.x;
  const int nchunk = gridDim.x;
  float s[3] = {0.f, 0.f, 0.f};
  for (int k = threadIdx.x; k < nchunk; k += kThreads) {
    const float* p = part + (b * nchunk + k) * 3;
    s[0] += p[0];
    s[1] += p[1];
    s[2] += p[2];
  }
  block_sum<3>(s);
  // x_new = clamp(x + f (a + cg)), c = alpha/||g||, f = min(1, eps/||a + cg||) (see cpu/pgd.cpp).
  const float cc = alpha.get(b) / fmaxf(sqrtf(s[2]), kTiny);
  const float dn = sqrtf(fmaxf(s[0] + 2.f * cc * s[1] + cc * cc * s[2], 0.f));
  const float e = eps.get(b);
  const float f = dn > e ? e / dn : (isnan(dn) ? dn : 1.f);
  const int64_t i0 = b * D + c * kChunk, i1 = min(i0 + kChunk, (b + 1) * D);
  for (int64_t i = i0 + static_cast<int64_t>(threadIdx.x) * VEC; i < i1; i += static_cast<int64_t>(kThreads) * VEC) {
    float fa[VEC], fx[VEC], fg[VEC];
    load_f<T, VEC>(xa + i, fa);
    load_f<T, VEC>(x + i, fx);
    load_f<T, VEC>(g + i, fg);
#pragma unroll
    for (int j = 0; j < VEC; ++j) fa[j] = clampf(fx[j] + f * (fa[j] - fx[j] + cc * fg[j]), lo, hi);
    store_f<T, VEC>(xa + i, fa);
  }
}

template <typename T, int VEC>
void launch_pgd(T* xa, const T* xp, const T* gp, int64_t B, int64_t D, Norm norm, SampleParam eps,
                SampleParam alpha, float lo, float hi, cudaStream_t st) {
  const int64_t numel = B * D;
  if (norm == Norm::Linf) {
    linf_step_kernel<T, VEC><<<blocks_for(numel / VEC), kThreads, 0, st>>>(xa, xp, gp, numel, D, eps, alpha, lo, hi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t nchunk = (D + kChunk - 1) / kChunk;
  TORCH_CHECK(B <= 65535, "pgd_step_: the CUDA L2 kernel supports at most 65535 samples per call, got ", B);
  at::Tensor part = at::empty({B * nchunk * 3}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, c10::cuda::current_device()));
  const dim3 grid(static_cast<unsigned>(nchunk), static_cast<unsigned>(B));
  l2_partial_kernel<T, VEC><<<grid, kThreads, 0, st>>>(xa, xp, gp, D, part.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  l2_apply_kernel<T, VEC><<<grid, kThreads, 0, st>>>(xa, xp, gp, D, part.data_ptr<float>(), eps, alpha, lo, hi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void pgd_step_cuda(at::Tensor& x_adv, const at::Tensor& x_in, const at::Tensor& grad_in, const at::Tensor& eps_t,
                   const at::Tensor& alpha_t, c10::string_view norm_s, double lo, double hi) {
  const Norm norm = parse_norm(norm_s);
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const StepArgs s = prepare_step(x_adv, "x_adv", x_in, "x", grad_in, "grad", eps_t, "eps", alpha_t, "alpha");
  if (s.numel == 0) return;
  cudaStream_t st = at::cuda::getCurrentCUDAStream();
  RO_DISPATCH_FLOATING(x_adv.scalar_type(), "pgd_step_", [&] {
    auto* xa = x_adv.data_ptr<scalar_t>();
    const auto* xp = s.a.data_ptr<scalar_t>();
    const auto* gp = s.b.data_ptr<scalar_t>();
    if (can_vectorize<scalar_t>(s.D, {xa, xp, gp}))
      launch_pgd<scalar_t, vec_width<scalar_t>()>(xa, xp, gp, s.B, s.D, norm, s.p, s.q, lo, hi, st);
    else
      launch_pgd<scalar_t, 1>(xa, xp, gp, s.B, s.D, norm, s.p, s.q, lo, hi, st);
  });
}

// -------------------------------------------------------------------------------- random_init

// The draw for memory element i. `cached`/`r` remember the last Philox call, so a thread that walks
// a contiguous group of four pays one call for all four.
template <bool NORMAL>
__device__ __forceinline__ float draw(int64_t i, const LogicalIndex& li, uint64_t seed, uint64_t offset,
                                      uint64_t& cached, Philox4x32& r) {
  const int64_t l = li(i);
  const uint64_t ctr = offset + static_cast<uint64_t>(l >> 2);
  if (ctr != cached) {
    r = philox4x32_10(seed, ctr, kStreamInitUniform);
    cached = ctr;
  }
  const int w = static_cast<int>(l & 3);
  return NORMAL ? normal_from(r, w) : uniform01(philox_word(r, w));
}

template <typename T, int VEC>
__global__ void init_linf_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t numel, int64_t D,
                                 LogicalIndex li, SampleParam eps, float lo, float hi, uint64_t seed,
                                 uint64_t offset) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < numel; i += stride) {
    const float e = eps.get(eps.ptr ? i / D : 0);
    uint64_t cached = ~uint64_t(0);
    Philox4x32 r;
    float f[VEC];
    load_f<T, VEC>(x + i, f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) f[j] = clampf(f[j] + e * (2.f * draw<false>(i + j, li, seed, offset, cached, r) - 1.f), lo, hi);
    store_f<T, VEC>(out + i, f);
  }
}

template <int VEC>
__global__ void init_l2_partial_kernel(int64_t D, LogicalIndex li, uint64_t seed, uint64_t offset,
                                       float* __restrict__ part) {
  const int64_t b = blockIdx.y, c = blockIdx.x;
  const int64_t i0 = b * D + c * kChunk, i1 = min(i0 + kChunk, (b + 1) * D);
  float s[1] = {0.f};
  for (int64_t i = i0 + static_cast<int64_t>(threadIdx.x) * VEC; i < i1; i += static_cast<int64_t>(kThreads) * VEC) {
    uint64_t cached = ~uint64_t(0);
    Philox4x32 r;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float z = draw<true>(i + j, li, seed, offset, cached, r);
      s[0] = fmaf(z, z, s[0]);
    }
  }
  block_sum<1>(s);
  if (threadIdx.x == 0) part[b * gridDim.x + c] = s[0];
}

template <typename T, int VEC>
__global__ void init_l2_apply_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t D, LogicalIndex li,
                                     const float* __restrict__ part, SampleParam eps, float lo, float hi,
                                     uint64_t seed, uint64_t offset) {
  const int64_t b = blockIdx.y, c = blockIdx.x;
  const int nchunk = gridDim.x;
  float s[1] = {0.f};
  for (int k = threadIdx.x; k < nchunk; k += kThreads) s[0] += part[b * nchunk + k];
  block_sum<1>(s);
  // Radius eps * U^(1/D): the uniform-ball law (volume within r grows like r^D).
  const float u = uniform01(philox4x32_10(seed, offset + static_cast<uint64_t>(b), kStreamInitRadius).c0);
  const float radius = eps.get(b) * static_cast<float>(pow(static_cast<double>(u), 1.0 / static_cast<double>(D)));
  const float sc = radius / fmaxf(sqrtf(s[0]), kTiny);
  const int64_t i0 = b * D + c * kChunk, i1 = min(i0 + kChunk, (b + 1) * D);
  for (int64_t i = i0 + static_cast<int64_t>(threadIdx.x) * VEC; i < i1; i += static_cast<int64_t>(kThreads) * VEC) {
    uint64_t cached = ~uint64_t(0);
    Philox4x32 r;
    float f[VEC];
    load_f<T, VEC>(x + i, f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) f[j] = clampf(f[j] + sc * draw<true>(i + j, li, seed, offset, cached, r), lo, hi);
    store_f<T, VEC>(out + i, f);
  }
}

template <typename T, int VEC>
void launch_init(T* out, const T* xp, int64_t B, int64_t D, const LogicalIndex& li, Norm norm, SampleParam eps,
                 float lo, float hi, uint64_t seed, uint64_t offset, cudaStream_t st) {
  if (norm == Norm::Linf) {
    init_linf_kernel<T, VEC><<<blocks_for(B * D / VEC), kThreads, 0, st>>>(out, xp, B * D, D, li, eps, lo, hi, seed,
                                                                          offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t nchunk = (D + kChunk - 1) / kChunk;
  TORCH_CHECK(B <= 65535, "random_init: the CUDA L2 kernel supports at most 65535 samples per call, got ", B);
  at::Tensor part = at::empty({B * nchunk}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, c10::cuda::current_device()));
  const dim3 grid(static_cast<unsigned>(nchunk), static_cast<unsigned>(B));
  init_l2_partial_kernel<VEC><<<grid, kThreads, 0, st>>>(D, li, seed, offset, part.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  init_l2_apply_kernel<T, VEC><<<grid, kThreads, 0, st>>>(out, xp, D, li, part.data_ptr<float>(), eps, lo, hi, seed,
                                                          offset);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor random_init_cuda(const at::Tensor& x_in, const at::Tensor& eps_t, c10::string_view norm_s, double lo,
                            double hi, int64_t seed, int64_t offset) {
  const Norm norm = parse_norm(norm_s);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const InitArgs a = prepare_init(x_in, eps_t);
  if (a.numel == 0) return a.out;
  cudaStream_t st = at::cuda::getCurrentCUDAStream();
  RO_DISPATCH_FLOATING(a.x.scalar_type(), "random_init", [&] {
    auto* op = a.out.data_ptr<scalar_t>();
    const auto* xp = a.x.data_ptr<scalar_t>();
    const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
    const auto s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
    if (can_vectorize<scalar_t>(a.D, {op, xp}))
      launch_init<scalar_t, vec_width<scalar_t>()>(op, xp, a.B, a.D, a.li, norm, a.eps, flo, fhi, s, o, st);
    else
      launch_init<scalar_t, 1>(op, xp, a.B, a.D, a.li, norm, a.eps, flo, fhi, s, o, st);
  });
  return a.out;
}

// ------------------------------------------------------------------------------ recycle_step_

template <typename T, int VEC>
__global__ void recycle_kernel(T* __restrict__ delta, const T* __restrict__ g, const T* __restrict__ x,
                               int64_t numel, int64_t D, SampleParam eps, SampleParam step, float lo, float hi) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < numel; i += stride) {
    const int64_t b = (eps.ptr || step.ptr) ? i / D : 0;
    const float e = eps.get(b), s = step.get(b);
    float fd[VEC], fx[VEC], fg[VEC];
    load_f<T, VEC>(delta + i, fd);
    load_f<T, VEC>(x + i, fx);
    load_f<T, VEC>(g + i, fg);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = clampf(fmaf(s, signf(fg[j]), fd[j]), -e, e);
      fd[j] = clampf(fx[j] + d, lo, hi) - fx[j];
    }
    store_f<T, VEC>(delta + i, fd);
  }
}

void recycle_step_cuda(at::Tensor& delta, const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& eps_t,
                       const at::Tensor& step_t, double lo, double hi) {
  const c10::cuda::CUDAGuard guard(delta.device());
  const StepArgs s = prepare_step(delta, "delta", grad_in, "grad", x_in, "x", eps_t, "eps", step_t, "step");
  if (s.numel == 0) return;
  cudaStream_t st = at::cuda::getCurrentCUDAStream();
  RO_DISPATCH_FLOATING(delta.scalar_type(), "recycle_step_", [&] {
    auto* dp = delta.data_ptr<scalar_t>();
    const auto* gp = s.a.data_ptr<scalar_t>();
    const auto* xp = s.b.data_ptr<scalar_t>();
    const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
    const int64_t n = s.numel;
    if (can_vectorize<scalar_t>(s.D, {dp, gp, xp})) {
      constexpr int V = vec_width<scalar_t>();
      recycle_kernel<scalar_t, V><<<blocks_for(n / V), kThreads, 0, st>>>(dp, gp, xp, n, s.D, s.p, s.q, flo, fhi);
    } else {
      recycle_kernel<scalar_t, 1><<<blocks_for(n), kThreads, 0, st>>>(dp, gp, xp, n, s.D, s.p, s.q, flo, fhi);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace robustops

TORCH_LIBRARY_IMPL(robustops, CUDA, m) {
  m.impl("pgd_step_", &robustops::pgd_step_cuda);
  m.impl("random_init", &robustops::random_init_cuda);
  m.impl("recycle_step_", &robustops::recycle_step_cuda);
}
