// CUDA kernels of the PGD family: pgd_step_, random_init, recycle_step_, langevin_step_.
//
// All kernels run on the current stream, never synchronize with the host, and compute in fp32
// whatever the storage type. Elementwise kernels move 16 bytes per thread access (float4, or
// eight fp16/bf16 values) whenever the pointers are 16-byte aligned and a vector never straddles
// two samples (D % VEC == 0); otherwise they fall back to one element per access.
//
// L2 kernels need per-sample sums. A sample of at most kChunk elements is done in one pass by one
// group of threads that holds the sample in registers: it reads x_adv, x and grad once and writes
// x_adv once (4 memory passes, the least an L2 step can move), in one launch. The group is G lanes of
// a warp (G a power of two up to 32) for samples of up to kWarpMaxD elements, so tiny samples do not
// leave whole blocks idle (a block holds kThreads / G samples), and the whole block above that.
// Larger samples use a two-kernel split over (sample, chunk) blocks, on a 1-D grid of B * chunks
// blocks (no 65535 limit on the batch): the first writes per-chunk partial sums, the second lets
// every block of a sample re-reduce that sample's few partials and then apply the update to its
// chunk (7 passes). A block-per-sample kernel would leave most of an H100 idle at ImageNet batch
// sizes (256 samples, 132 SMs, long serial loops); the split keeps thousands of blocks in flight.
// The sums are accumulated in double (exact products, no under/overflow for any float gradient:
// pgd.h), which an H100's FP64 units do at memory speed. random_init's L2 start is split the same way.
//
// Indices are int64 throughout (tensors may hold more than 2^31 elements): blockIdx.x, blockDim.x
// and threadIdx.x are widened before any product.
//
// Every formula comes from ../pgd.h, shared with the CPU kernels.
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
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void load_f(const T* p, float (&f)[VEC]) {
  const Pack<T, VEC> pk = load_pack<T, VEC>(p);
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

// Sum over the block; every thread gets the result.
template <typename F, int N>
__device__ __forceinline__ void block_sum(F (&v)[N]) {
  __shared__ F sm[N][kThreads / 32];
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
    F s = F(0);
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) s += sm[k][w];
    v[k] = s;
  }
}

// ------------------------------------------------------------------ one-pass groups (D <= kChunk)
// The one-pass L2 kernels give each sample a group of G threads: G lanes of one warp (a power of two
// up to 32) or the whole block (G == kThreads). Lane t of a group owns the sample's packs t, t + G,
// t + 2G, ... (coalesced), at most MAXI of them, kept in registers between the sums and the writes.

// Samples of up to kWarpMaxD elements take a warp or less (<= 8 elements a lane), larger ones the
// block. A thread holds up to 8, 16 or 32 elements (D <= 2048, 4096, 8192): its registers are sized
// for the most it may hold, so the smaller tiers keep more blocks resident per SM.
constexpr int64_t kWarpMaxD = 256;

struct OnePass {
  int64_t B, D, P;  // samples, elements per sample, packs of VEC elements per sample
  int G;            // threads per sample
};

// Sum over a sample's group; every thread of the group gets it. Lanes xor-shuffle within their
// aligned G-lane group (o < G keeps the partner inside it); the whole block uses block_sum.
template <int N>
__device__ __forceinline__ void group_sum(double (&v)[N], int G) {
  if (G == kThreads) {
    block_sum<double, N>(v);
    return;
  }
  for (int o = G >> 1; o > 0; o >>= 1) {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
  }
}

// Calls body(b, valid, lane) for every sample slot of this thread. The loop bound is uniform over
// the block (a slot past B runs with valid = false and loads nothing), so every thread reaches its
// group's shuffles and barriers.
template <typename Body>
__device__ __forceinline__ void for_each_group_sample(const OnePass& geo, const Body& body) {
  const int per_block = kThreads / geo.G;
  const int slot = static_cast<int>(threadIdx.x) / geo.G, lane = static_cast<int>(threadIdx.x) % geo.G;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * per_block;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * per_block; base < geo.B; base += stride) {
    const int64_t b = base + slot;
    body(b, b < geo.B, lane);
  }
}

// The memory index of pack k of lane `lane` in sample b, or -1 when the sample has no such pack.
template <int VEC>
__device__ __forceinline__ int64_t pack_index(const OnePass& geo, int64_t b, int lane, int k) {
  const int64_t p = lane + static_cast<int64_t>(k) * geo.G;
  return p < geo.P ? b * geo.D + p * VEC : -1;
}

// Stores this lane's packs of sample b, element j of pack k being value(k, j) (unrolled: the packs
// stay in registers).
template <typename T, int VEC, int MAXI, typename Value>
__device__ __forceinline__ void write_packs(T* out, const OnePass& geo, int64_t b, int lane, const Value& value) {
#pragma unroll
  for (int k = 0; k < MAXI; ++k) {
    const int64_t i = pack_index<VEC>(geo, b, lane, k);
    if (i < 0) continue;
    Pack<T, VEC> pk;
#pragma unroll
    for (int j = 0; j < VEC; ++j) pk.v[j] = value(k, j);
    *reinterpret_cast<Pack<T, VEC>*>(out + i) = pk;
  }
}

// Picks the group size and the registers per thread (MAXI packs) for D <= kChunk elements in packs
// of VEC, and calls launch(std::integral_constant<int, MAXI>, geometry, blocks).
template <int VEC, typename Launch>
void launch_onepass(int64_t B, int64_t D, const Launch& launch) {
  OnePass geo{B, D, D / VEC, kThreads};  // VEC > 1 only when VEC divides D (can_vectorize)
  if (D <= kWarpMaxD) {
    geo.G = 1;
    while (geo.G < 32 && geo.G < geo.P) geo.G *= 2;
  }
  const int64_t per_block = kThreads / geo.G, items = (geo.P + geo.G - 1) / geo.G;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((B + per_block - 1) / per_block, 2147483647));
  auto go = [&](auto maxi) {
    TORCH_INTERNAL_ASSERT(items <= decltype(maxi)::value, "one-pass L2: ", items, " packs per thread");
    launch(maxi, geo, blocks);
  };
  static_assert(kChunk == 32 * kThreads, "the largest tier holds kChunk elements in 32 per thread");
  if (D <= 8 * kThreads) go(std::integral_constant<int, 8 / VEC>{});
  else if (D <= 16 * kThreads) go(std::integral_constant<int, 16 / VEC>{});
  else go(std::integral_constant<int, 32 / VEC>{});
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
    for (int j = 0; j < VEC; ++j) fa[j] = linf_update(fa[j], fx[j], fg[j], e, a, lo, hi);
    store_f<T, VEC>(xa + i, fa);
  }
}

// Partial sums (pgd.h's L2Sums) over one chunk of one sample: block = b * nchunk + c.
template <typename T, int VEC>
__global__ void l2_partial_kernel(const T* __restrict__ xa, const T* __restrict__ x, const T* __restrict__ g,
                                  int64_t D, int64_t nchunk, double* __restrict__ part) {
  const int64_t b = blockIdx.x / nchunk, c = blockIdx.x % nchunk;
  const int64_t i0 = b * D + c * kChunk, i1 = min(i0 + kChunk, (b + 1) * D);
  L2Sums acc;
  for (int64_t i = i0 + static_cast<int64_t>(threadIdx.x) * VEC; i < i1; i += static_cast<int64_t>(kThreads) * VEC) {
    float fa[VEC], fx[VEC], fg[VEC];
    load_f<T, VEC>(xa + i, fa);
    load_f<T, VEC>(x + i, fx);
    load_f<T, VEC>(g + i, fg);
#pragma unroll
    for (int j = 0; j < VEC; ++j) l2_add(acc, fa[j], fx[j], fg[j]);
  }
  double s[3] = {acc.aa, acc.ag, acc.gg};
  block_sum<double, 3>(s);
  if (threadIdx.x == 0) {
    double* p = part + static_cast<int64_t>(blockIdx.x) * 3;  // 64-bit: B * chunks * 3 may pass 2^32
    p[0] = s[0];
    p[1] = s[1];
    p[2] = s[2];
  }
}

template <typename T, int VEC>
__global__ void l2_apply_kernel(T* __restrict__ xa, const T* __restrict__ x, const T* __restrict__ g, int64_t D,
                                int64_t nchunk, const double* __restrict__ part, SampleParam eps, SampleParam alpha,
                                float lo, float hi) {
  const int64_t b = blockIdx.x / nchunk, c = blockIdx.x % nchunk;
  double s[3] = {0.0, 0.0, 0.0};
  for (int64_t k = threadIdx.x; k < nchunk; k += kThreads) {
    const double* p = part + (b * nchunk + k) * 3;
    s[0] += p[0];
    s[1] += p[1];
    s[2] += p[2];
  }
  block_sum<double, 3>(s);
  L2Sums sums;
  sums.aa = s[0];
  sums.ag = s[1];
  sums.gg = s[2];
  const L2Factors k = l2_factors(sums, alpha.get(b), eps.get(b));
  const int64_t i0 = b * D + c * kChunk, i1 = min(i0 + kChunk, (b + 1) * D);
  for (int64_t i = i0 + static_cast<int64_t>(threadIdx.x) * VEC; i < i1; i += static_cast<int64_t>(kThreads) * VEC) {
    float fa[VEC], fx[VEC], fg[VEC];
    load_f<T, VEC>(xa + i, fa);
    load_f<T, VEC>(x + i, fx);
    load_f<T, VEC>(g + i, fg);
#pragma unroll
    for (int j = 0; j < VEC; ++j) fa[j] = l2_update(fa[j], fx[j], fg[j], k, lo, hi);
    store_f<T, VEC>(xa + i, fa);
  }
}

// The one-pass L2 step (D <= kChunk): the group's packs of x_adv, x and grad stay in registers
// from the sums to the update.
template <typename T, int VEC, int MAXI>
__global__ void __launch_bounds__(kThreads) l2_onepass_kernel(T* __restrict__ xa, const T* __restrict__ x,
                                                              const T* __restrict__ g, OnePass geo, SampleParam eps,
                                                              SampleParam alpha, float lo, float hi) {
  for_each_group_sample(geo, [&](int64_t b, bool valid, int lane) {
    Pack<T, VEC> pa[MAXI], px[MAXI], pg[MAXI];
    L2Sums acc;
#pragma unroll
    for (int k = 0; k < MAXI; ++k) {
      const int64_t i = valid ? pack_index<VEC>(geo, b, lane, k) : -1;
      if (i < 0) continue;
      pa[k] = load_pack<T, VEC>(xa + i);
      px[k] = load_pack<T, VEC>(x + i);
      pg[k] = load_pack<T, VEC>(g + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        l2_add(acc, static_cast<float>(pa[k].v[j]), static_cast<float>(px[k].v[j]), static_cast<float>(pg[k].v[j]));
    }
    double s[3] = {acc.aa, acc.ag, acc.gg};
    group_sum<3>(s, geo.G);
    if (!valid) return;
    L2Sums sums;
    sums.aa = s[0];
    sums.ag = s[1];
    sums.gg = s[2];
    const L2Factors f = l2_factors(sums, alpha.get(b), eps.get(b));
    write_packs<T, VEC, MAXI>(xa, geo, b, lane, [&](int k, int j) {
      return static_cast<T>(l2_update(static_cast<float>(pa[k].v[j]), static_cast<float>(px[k].v[j]),
                                      static_cast<float>(pg[k].v[j]), f, lo, hi));
    });
  });
}

// Blocks of the L2 kernels' 1-D grid: one per (sample, chunk).
inline unsigned l2_blocks(int64_t B, int64_t nchunk, const char* op) {
  const int64_t n = B * nchunk;
  TORCH_CHECK(n <= 2147483647, op, ": ", B, " samples of ", nchunk, " chunks exceed the grid (2^31 - 1 blocks)");
  return static_cast<unsigned>(n);
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
  if (D <= kChunk) {
    launch_onepass<VEC>(B, D, [&](auto maxi, const OnePass& geo, unsigned blocks) {
      l2_onepass_kernel<T, VEC, decltype(maxi)::value><<<blocks, kThreads, 0, st>>>(xa, xp, gp, geo, eps, alpha, lo,
                                                                                    hi);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t nchunk = (D + kChunk - 1) / kChunk;
  const unsigned blocks = l2_blocks(B, nchunk, "pgd_step_");
  at::Tensor part = at::empty({B * nchunk * 3},
                              at::TensorOptions().dtype(at::kDouble).device(at::kCUDA, c10::cuda::current_device()));
  l2_partial_kernel<T, VEC><<<blocks, kThreads, 0, st>>>(xa, xp, gp, D, nchunk, part.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  l2_apply_kernel<T, VEC><<<blocks, kThreads, 0, st>>>(xa, xp, gp, D, nchunk, part.data_ptr<double>(), eps, alpha,
                                                       lo, hi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void pgd_step_cuda(at::Tensor& x_adv, const at::Tensor& x_in, const at::Tensor& grad_in, const at::Tensor& eps_t,
                   const at::Tensor& alpha_t, c10::string_view norm_s, double lo, double hi) {
  const Norm norm = parse_norm(norm_s);
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const StepArgs s = prepare_step(x_adv, "x_adv", x_in, "x", grad_in, "grad", eps_t, "eps", alpha_t, "alpha");
  if (s.numel == 0) return;
  const Bounds bd = float_bounds(lo, hi);
  cudaStream_t st = at::cuda::getCurrentCUDAStream();
  RO_DISPATCH_FLOATING(x_adv.scalar_type(), "pgd_step_", [&] {
    auto* xa = x_adv.data_ptr<scalar_t>();
    const auto* xp = s.a.data_ptr<scalar_t>();
    const auto* gp = s.b.data_ptr<scalar_t>();
    if (can_vectorize<scalar_t>(s.D, {xa, xp, gp}))
      launch_pgd<scalar_t, vec_width<scalar_t>()>(xa, xp, gp, s.B, s.D, norm, s.p, s.q, bd.lo, bd.hi, st);
    else
      launch_pgd<scalar_t, 1>(xa, xp, gp, s.B, s.D, norm, s.p, s.q, bd.lo, bd.hi, st);
  });
}

// -------------------------------------------------------------------------------- random_init

// The draw for memory element i. `cached`/`r` remember the last Philox call, so a thread that walks
// a contiguous group of four pays one call for all four.
template <bool NORMAL>
__device__ __forceinline__ float draw(int64_t i, const LogicalIndex& li, int64_t D, uint64_t seed, uint64_t offset,
                                      uint64_t& cached, Philox4x32& r) {
  const InitCounter c = init_counter(li(i), D, offset);
  if (c.ctr != cached) {
    r = philox4x32_10(seed, c.ctr, kStreamInitUniform);
    cached = c.ctr;
  }
  return NORMAL ? normal_from(r, c.word) : uniform01(philox_word(r, c.word));
}

// The offset of a call: the host value, or (the device-offset form) the value in dev_off.
struct Offset {
  const int64_t* dev;
  uint64_t host;
  __device__ __forceinline__ uint64_t get() const { return read_offset(dev, host); }
};

template <typename T, int VEC>
__global__ void init_linf_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t numel, int64_t D,
                                 LogicalIndex li, SampleParam eps, float lo, float hi, uint64_t seed, Offset off) {
  const uint64_t offset = off.get();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < numel; i += stride) {
    const float e = eps.get(eps.ptr ? i / D : 0);
    uint64_t cached = ~uint64_t(0);
    Philox4x32 r;
    float f[VEC];
    load_f<T, VEC>(x + i, f);
    Pack<T, VEC> pk;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      pk.v[j] = store_within<T>(init_linf_update(f[j], draw<false>(i + j, li, D, seed, offset, cached, r), e, lo, hi),
                                fmaxf(lo, f[j] - e), fminf(hi, f[j] + e));
    *reinterpret_cast<Pack<T, VEC>*>(out + i) = pk;
  }
}

template <int VEC>
__global__ void init_l2_partial_kernel(int64_t D, int64_t nchunk, LogicalIndex li, uint64_t seed, Offset off,
                                       double* __restrict__ part) {
  const uint64_t offset = off.get();
  const int64_t b = blockIdx.x / nchunk, c = blockIdx.x % nchunk;
  const int64_t i0 = b * D + c * kChunk, i1 = min(i0 + kChunk, (b + 1) * D);
  double s[1] = {0.0};
  for (int64_t i = i0 + static_cast<int64_t>(threadIdx.x) * VEC; i < i1; i += static_cast<int64_t>(kThreads) * VEC) {
    uint64_t cached = ~uint64_t(0);
    Philox4x32 r;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const double z = draw<true>(i + j, li, D, seed, offset, cached, r);
      s[0] += z * z;
    }
  }
  block_sum<double, 1>(s);
  if (threadIdx.x == 0) part[blockIdx.x] = s[0];
}

template <typename T, int VEC>
__global__ void init_l2_apply_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t D, int64_t nchunk,
                                     LogicalIndex li, const double* __restrict__ part, SampleParam eps, float lo,
                                     float hi, uint64_t seed, Offset off, int law) {
  const uint64_t offset = off.get();
  const int64_t b = blockIdx.x / nchunk, c = blockIdx.x % nchunk;
  double s[1] = {0.0};
  for (int64_t k = threadIdx.x; k < nchunk; k += kThreads) s[0] += part[b * nchunk + k];
  block_sum<double, 1>(s);
  const float sc = init_l2_scale(s[0], init_radius_u(seed, offset, b), eps.get(b), D, law);
  const int64_t i0 = b * D + c * kChunk, i1 = min(i0 + kChunk, (b + 1) * D);
  for (int64_t i = i0 + static_cast<int64_t>(threadIdx.x) * VEC; i < i1; i += static_cast<int64_t>(kThreads) * VEC) {
    uint64_t cached = ~uint64_t(0);
    Philox4x32 r;
    float f[VEC];
    load_f<T, VEC>(x + i, f);
    Pack<T, VEC> pk;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      pk.v[j] = store_within<T>(init_l2_update(f[j], draw<true>(i + j, li, D, seed, offset, cached, r), sc, lo, hi),
                                lo, hi);
    *reinterpret_cast<Pack<T, VEC>*>(out + i) = pk;
  }
}

// The one-pass L2 start (D <= kChunk): each thread keeps its packs of x and their normals in
// registers, so x is read once, the output written once and every normal drawn once.
template <typename T, int VEC, int MAXI>
__global__ void __launch_bounds__(kThreads) init_l2_onepass_kernel(T* __restrict__ out, const T* __restrict__ x,
                                                                   OnePass geo, LogicalIndex li, SampleParam eps,
                                                                   float lo, float hi, uint64_t seed, Offset off,
                                                                   int law) {
  const uint64_t offset = off.get();
  for_each_group_sample(geo, [&](int64_t b, bool valid, int lane) {
    Pack<T, VEC> px[MAXI];
    float z[MAXI][VEC];
    double s[1] = {0.0};
#pragma unroll
    for (int k = 0; k < MAXI; ++k) {
      const int64_t i = valid ? pack_index<VEC>(geo, b, lane, k) : -1;
      if (i < 0) continue;
      px[k] = load_pack<T, VEC>(x + i);
      uint64_t cached = ~uint64_t(0);
      Philox4x32 r;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        z[k][j] = draw<true>(i + j, li, geo.D, seed, offset, cached, r);
        s[0] += static_cast<double>(z[k][j]) * z[k][j];
      }
    }
    group_sum<1>(s, geo.G);
    if (!valid) return;
    const float sc = init_l2_scale(s[0], init_radius_u(seed, offset, b), eps.get(b), geo.D, law);
    write_packs<T, VEC, MAXI>(out, geo, b, lane, [&](int k, int j) {
      return store_within<T>(init_l2_update(static_cast<float>(px[k].v[j]), z[k][j], sc, lo, hi), lo, hi);
    });
  });
}

template <typename T, int VEC>
void launch_init(T* out, const T* xp, int64_t B, int64_t D, const LogicalIndex& li, Norm norm, SampleParam eps,
                 float lo, float hi, uint64_t seed, Offset off, int law, cudaStream_t st) {
  if (norm == Norm::Linf) {
    init_linf_kernel<T, VEC><<<blocks_for(B * D / VEC), kThreads, 0, st>>>(out, xp, B * D, D, li, eps, lo, hi, seed,
                                                                          off);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (D <= kChunk) {
    launch_onepass<VEC>(B, D, [&](auto maxi, const OnePass& geo, unsigned blocks) {
      init_l2_onepass_kernel<T, VEC, decltype(maxi)::value><<<blocks, kThreads, 0, st>>>(out, xp, geo, li, eps, lo, hi,
                                                                                         seed, off, law);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t nchunk = (D + kChunk - 1) / kChunk;
  const unsigned blocks = l2_blocks(B, nchunk, "random_init");
  at::Tensor part = at::empty({B * nchunk},
                              at::TensorOptions().dtype(at::kDouble).device(at::kCUDA, c10::cuda::current_device()));
  init_l2_partial_kernel<VEC><<<blocks, kThreads, 0, st>>>(D, nchunk, li, seed, off, part.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  init_l2_apply_kernel<T, VEC><<<blocks, kThreads, 0, st>>>(out, xp, D, nchunk, li, part.data_ptr<double>(), eps, lo,
                                                            hi, seed, off, law);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor random_init_impl(const at::Tensor& x_in, const at::Tensor& eps_t, c10::string_view norm_s, double lo,
                            double hi, int64_t seed, Offset off, c10::string_view radius) {
  const Norm norm = parse_norm(norm_s);
  const int law = parse_radius_law(radius);
  const InitArgs a = prepare_init(x_in, eps_t);
  if (a.numel == 0) return a.out;
  cudaStream_t st = at::cuda::getCurrentCUDAStream();
  RO_DISPATCH_FLOATING(a.x.scalar_type(), "random_init", [&] {
    auto* op = a.out.data_ptr<scalar_t>();
    const auto* xp = a.x.data_ptr<scalar_t>();
    const Bounds bd = float_bounds(lo, hi);
    const float flo = bd.lo, fhi = bd.hi;
    const auto s = static_cast<uint64_t>(seed);
    if (can_vectorize<scalar_t>(a.D, {op, xp}))
      launch_init<scalar_t, vec_width<scalar_t>()>(op, xp, a.B, a.D, a.li, norm, a.eps, flo, fhi, s, off, law, st);
    else
      launch_init<scalar_t, 1>(op, xp, a.B, a.D, a.li, norm, a.eps, flo, fhi, s, off, law, st);
  });
  return a.out;
}

at::Tensor random_init_cuda(const at::Tensor& x, const at::Tensor& eps, c10::string_view norm, double lo, double hi,
                            int64_t seed, int64_t offset, c10::string_view radius) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_offset(offset);
  refuse_capture("random_init");
  return random_init_impl(x, eps, norm, lo, hi, seed, Offset{nullptr, static_cast<uint64_t>(offset)}, radius);
}

at::Tensor random_init_dev_cuda(const at::Tensor& x, const at::Tensor& eps, c10::string_view norm, double lo,
                                double hi, int64_t seed, at::Tensor& offset, c10::string_view radius) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_offset_tensor(offset, x);
  at::Tensor out = random_init_impl(x, eps, norm, lo, hi, seed, Offset{offset.data_ptr<int64_t>(), 0}, radius);
  offset.add_(init_offset_advance(x));  // after the kernels, in stream order
  return out;
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
    for (int j = 0; j < VEC; ++j) fd[j] = recycle_update(fd[j], fg[j], fx[j], e, s, lo, hi);
    store_f<T, VEC>(delta + i, fd);
  }
}

void recycle_step_cuda(at::Tensor& delta, const at::Tensor& x_in, const at::Tensor& grad_in, const at::Tensor& eps_t,
                       const at::Tensor& step_t, double lo, double hi) {
  const c10::cuda::CUDAGuard guard(delta.device());
  const StepArgs s = prepare_step(delta, "delta", grad_in, "grad", x_in, "x", eps_t, "eps", step_t, "step");
  if (s.numel == 0) return;
  cudaStream_t st = at::cuda::getCurrentCUDAStream();
  RO_DISPATCH_FLOATING(delta.scalar_type(), "recycle_step_", [&] {
    auto* dp = delta.data_ptr<scalar_t>();
    const auto* gp = s.a.data_ptr<scalar_t>();
    const auto* xp = s.b.data_ptr<scalar_t>();
    const Bounds bd = float_bounds(lo, hi);
    const float flo = bd.lo, fhi = bd.hi;
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

// ----------------------------------------------------------------------------- langevin_step_

// One pass: three reads and one write per element, like the L-inf pgd_step_, plus one Philox call per
// four logical neighbours (a vector of a contiguous tensor holds whole groups of four, so a thread
// pays one call per group; the 10 rounds are integer multiplies, far below the memory time on a GPU).
// A sample whose noise scale is 0 draws nothing: the result is the L-inf step's (pgd.h).
template <typename T, int VEC>
__global__ void langevin_kernel(T* __restrict__ xa, const T* __restrict__ x, const T* __restrict__ g,
                                int64_t numel, int64_t D, LogicalIndex li, SampleParam eps, SampleParam alpha,
                                SampleParam noise, int form, float lo, float hi, uint64_t seed, Offset off) {
  const uint64_t offset = off.get();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < numel; i += stride) {
    const int64_t b = (eps.ptr || alpha.ptr || noise.ptr) ? i / D : 0;
    const float e = eps.get(b), a = alpha.get(b), c = noise.get(b);
    float fa[VEC], fx[VEC], fg[VEC];
    load_f<T, VEC>(xa + i, fa);
    load_f<T, VEC>(x + i, fx);
    load_f<T, VEC>(g + i, fg);
    uint64_t cached = ~uint64_t(0);
    Philox4x32 r;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float n = 0.f;
      if (c != 0.f) {
        const InitCounter ic = init_counter(li(i + j), D, offset);
        if (ic.ctr != cached) {
          r = philox4x32_10(seed, ic.ctr, kStreamLangevin);
          cached = ic.ctr;
        }
        n = langevin_draw(r, ic.word, form);
      }
      fa[j] = langevin_update(fa[j], fx[j], fg[j], n, e, a, c, form, lo, hi);
    }
    store_f<T, VEC>(xa + i, fa);
  }
}

// Shared by the integer and the device-offset forms; the caller holds the device guard.
void langevin_impl(at::Tensor& x_adv, const at::Tensor& x_in, const at::Tensor& grad_in, const at::Tensor& eps_t,
                   const at::Tensor& alpha_t, const at::Tensor& noise_t, int form, double lo, double hi, int64_t seed,
                   Offset off) {
  const StepArgs s = prepare_step(x_adv, "x_adv", x_in, "x", grad_in, "grad", eps_t, "eps", alpha_t, "alpha");
  at::Tensor noise_holder;
  const SampleParam noise = make_sample_param(noise_t, "noise", x_adv, noise_holder);
  if (s.numel == 0) return;
  const LogicalIndex li = make_logical_index(x_adv);
  const Bounds bd = float_bounds(lo, hi);
  cudaStream_t st = at::cuda::getCurrentCUDAStream();
  RO_DISPATCH_FLOATING(x_adv.scalar_type(), "langevin_step_", [&] {
    auto* xa = x_adv.data_ptr<scalar_t>();
    const auto* xp = s.a.data_ptr<scalar_t>();
    const auto* gp = s.b.data_ptr<scalar_t>();
    const int64_t n = s.numel;
    const auto sd = static_cast<uint64_t>(seed);
    if (can_vectorize<scalar_t>(s.D, {xa, xp, gp})) {
      constexpr int V = vec_width<scalar_t>();
      langevin_kernel<scalar_t, V><<<blocks_for(n / V), kThreads, 0, st>>>(xa, xp, gp, n, s.D, li, s.p, s.q, noise,
                                                                          form, bd.lo, bd.hi, sd, off);
    } else {
      langevin_kernel<scalar_t, 1><<<blocks_for(n), kThreads, 0, st>>>(xa, xp, gp, n, s.D, li, s.p, s.q, noise, form,
                                                                       bd.lo, bd.hi, sd, off);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void langevin_step_cuda(at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad, const at::Tensor& eps,
                        const at::Tensor& alpha, const at::Tensor& noise, c10::string_view form_s, double lo,
                        double hi, int64_t seed, int64_t offset) {
  const int form = parse_langevin_form(form_s);
  const c10::cuda::CUDAGuard guard(x_adv.device());
  check_offset(offset);
  refuse_capture("langevin_step_");
  langevin_impl(x_adv, x, grad, eps, alpha, noise, form, lo, hi, seed, Offset{nullptr, static_cast<uint64_t>(offset)});
}

// The device-offset form: the kernel reads the offset on the device, and the op advances it by the B
// samples drawn after the kernel, in stream order, so a captured graph draws fresh noise at every replay.
void langevin_step_dev_cuda(at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad, const at::Tensor& eps,
                            const at::Tensor& alpha, const at::Tensor& noise, c10::string_view form_s, double lo,
                            double hi, int64_t seed, at::Tensor& offset) {
  const int form = parse_langevin_form(form_s);
  const c10::cuda::CUDAGuard guard(x_adv.device());
  check_offset_tensor(offset, x_adv);
  langevin_impl(x_adv, x, grad, eps, alpha, noise, form, lo, hi, seed, Offset{offset.data_ptr<int64_t>(), 0});
  offset.add_(init_offset_advance(x_adv));
}

}  // namespace
}  // namespace robustops

TORCH_LIBRARY_IMPL(robustops, CUDA, m) {
  m.impl("pgd_step_", &robustops::pgd_step_cuda);
  m.impl("random_init", &robustops::random_init_cuda);
  m.impl("random_init_dev_offset", &robustops::random_init_dev_cuda);
  m.impl("recycle_step_", &robustops::recycle_step_cuda);
  m.impl("langevin_step_", &robustops::langevin_step_cuda);
  m.impl("langevin_step_dev_offset_", &robustops::langevin_step_dev_cuda);
}
