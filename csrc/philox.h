// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
// shared by the CPU and CUDA kernels so that both devices draw the same stream.
//
// Stream layout used by every robustops op:
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(c), hi32(c), stream, 0) with c = offset + logical_index / 4
// One Philox call yields four 32-bit words; logical element i takes word i % 4 of the call
// for group i / 4. The draw therefore depends only on (seed, offset, stream, logical index),
// never on the memory layout, the device, or how the work is split across threads or batches.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RO_HD __host__ __device__ __forceinline__
#else
#define RO_HD inline
#endif

namespace robustops {

// Distinct streams for distinct purposes, so two ops given the same (seed, offset) do not
// hand out correlated numbers.
enum PhiloxStream : uint32_t {
  kStreamInitUniform = 0,  // random_init: per-element uniforms (L-inf) / normals (L2 direction)
  kStreamInitRadius = 1,   // random_init: per-sample radius of the L2 ball
  kStreamGaussian = 2,     // gaussian_noise
  kStreamLangevin = 3,     // langevin_step_: per-element Laplace / Gaussian noise
};

struct Philox4x32 {
  uint32_t c0, c1, c2, c3;
};

RO_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// Ten rounds of Philox4x32 with the standard multipliers and Weyl key increments.
RO_HD Philox4x32 philox4x32_10(uint64_t seed, uint64_t counter, uint32_t stream) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t x0 = static_cast<uint32_t>(counter), x1 = static_cast<uint32_t>(counter >> 32);
  uint32_t x2 = stream, x3 = 0u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, hi1;
    uint32_t lo0 = mulhilo32(kM0, x0, &hi0);
    uint32_t lo1 = mulhilo32(kM1, x2, &hi1);
    uint32_t y0 = hi1 ^ x1 ^ k0;
    uint32_t y1 = lo1;
    uint32_t y2 = hi0 ^ x3 ^ k1;
    uint32_t y3 = lo0;
    x0 = y0; x1 = y1; x2 = y2; x3 = y3;
    k0 += kW0;
    k1 += kW1;
  }
  return {x0, x1, x2, x3};
}

RO_HD uint32_t philox_word(const Philox4x32& r, int i) {
  return i == 0 ? r.c0 : i == 1 ? r.c1 : i == 2 ? r.c2 : r.c3;
}

// Uniform in [0, 1): the top 24 bits, exactly representable in float.
RO_HD float uniform01(uint32_t w) { return static_cast<float>(w >> 8) * 5.9604644775390625e-8f; }

// Uniform in (0, 1]: safe to take the log of.
RO_HD float uniform01_open0(uint32_t w) {
  return static_cast<float>((w >> 8) + 1u) * 5.9604644775390625e-8f;
}

// sin(2 pi u) and cos(2 pi u) for u in [0, 1), accurate: CUDA's sincospif (argument reduction on
// 2u, exact), the host's sin / cos of the double 2 pi u. Both are within about an ulp of the true
// values, so the CPU and the GPU draw the same normals to ~1e-7 relative. (The fast __sincosf of
// 2 pi u in float was off by up to 2.4e-7 * radius and is not used.)
RO_HD void sincos_2pi(float u, float* s, float* c) {
#if defined(__CUDA_ARCH__)
  sincospif(2.0f * u, s, c);
#else
  const double t = 6.283185307179586476925286766559 * static_cast<double>(u);
  *s = static_cast<float>(std::sin(t));
  *c = static_cast<float>(std::cos(t));
#endif
}

// Box-Muller radius sqrt(-2 ln u) for u in (0, 1], with the accurate logf (not __logf, whose
// result for u near 1 can be off enough to turn the argument of the square root negative).
RO_HD float box_muller_radius(float u) {
  const float t = -2.0f * logf(u);
  return sqrtf(t > 0.f ? t : 0.f);
}

// Box-Muller on the four words of one Philox call: word pair 0/1 gives normals 0 and 1, pair 2/3
// gives normals 2 and 3. n = sqrt(-2 ln u1) * (cos | sin)(2 pi u2).
RO_HD void normals4(const Philox4x32& r, float (&z)[4]) {
  const float r0 = box_muller_radius(uniform01_open0(r.c0)), r1 = box_muller_radius(uniform01_open0(r.c2));
  float s0, c0, s1, c1;
  sincos_2pi(uniform01(r.c1), &s0, &c0);
  sincos_2pi(uniform01(r.c3), &s1, &c1);
  z[0] = r0 * c0;
  z[1] = r0 * s0;
  z[2] = r1 * c1;
  z[3] = r1 * s1;
}

// Normal i (0..3) of one call: the same as normals4's z[i].
RO_HD float normal_from(const Philox4x32& r, int i) {
  const float rad = box_muller_radius(uniform01_open0(i < 2 ? r.c0 : r.c2));
  float s, c;
  sincos_2pi(uniform01(i < 2 ? r.c1 : r.c3), &s, &c);
  return rad * ((i & 1) ? s : c);
}

}  // namespace robustops
