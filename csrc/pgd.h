// Argument handling shared by the CPU and CUDA kernels of the PGD family.
#pragma once
#include <type_traits>

#include "common.h"

namespace robustops {

// An in-place step op (pgd_step_, recycle_step_): `out` is updated in place, the two other tensors
// are matched to its layout, and p, q are its per-sample parameters.
struct StepArgs {
  at::Tensor a, b, p_holder, q_holder;
  SampleParam p, q;
  int64_t B = 0, D = 0, numel = 0;
};

inline StepArgs prepare_step(const at::Tensor& out, const char* out_name, const at::Tensor& a, const char* a_name,
                             const at::Tensor& b, const char* b_name, const at::Tensor& p, const char* p_name,
                             const at::Tensor& q, const char* q_name) {
  check_float(out, out_name);
  check_batch_major(out, out_name);
  StepArgs s;
  s.a = like(a, out, a_name, out_name);
  s.b = like(b, out, b_name, out_name);
  s.p = make_sample_param(p, p_name, out, s.p_holder);
  s.q = make_sample_param(q, q_name, out, s.q_holder);
  s.B = out.size(0);
  s.numel = out.numel();
  s.D = s.numel ? s.numel / s.B : 0;
  return s;
}

// random_init's L2 radius law by name: "ball" (uniform in the ball's volume) or "uniform" (radius
// uniform in [0, eps]); see init_l2_scale.
inline int parse_radius_law(c10::string_view s) {
  if (s == "ball") return 0;
  if (s == "uniform") return 1;
  TORCH_CHECK(false, "radius must be \"ball\" or \"uniform\", got \"", std::string(s), "\"");
}

// How far random_init_dev_offset and langevin_step_dev_offset_ advance their offset: by the B
// samples drawn (the offset counts samples, see init_counter), so the next call draws the next
// samples' numbers.
inline int64_t init_offset_advance(const at::Tensor& x) { return x.dim() ? x.size(0) : 0; }

// random_init's input: dense batch-major tensors keep their layout, anything else (a strided view)
// is made contiguous; the output is allocated like it.
struct InitArgs {
  at::Tensor x, out, eps_holder;
  SampleParam eps;
  LogicalIndex li;
  int64_t B = 0, D = 0, numel = 0;
};

inline InitArgs prepare_init(const at::Tensor& x_in, const at::Tensor& eps) {
  check_float(x_in, "x");
  TORCH_CHECK(x_in.dim() >= 1, "x must have a leading batch dimension, got a 0-dim tensor");
  const bool dense = x_in.is_non_overlapping_and_dense() &&
                     (x_in.size(0) <= 1 || x_in.stride(0) * x_in.size(0) == x_in.numel());
  InitArgs s;
  s.x = dense ? x_in : x_in.contiguous();
  s.out = at::empty_like(s.x);
  s.eps = make_sample_param(eps, "eps", s.x, s.eps_holder);
  s.B = s.x.size(0);
  s.numel = s.x.numel();
  s.D = s.numel ? s.numel / s.B : 0;
  s.li = make_logical_index(s.x);
  return s;
}

}  // namespace robustops

// ------------------------------------------------------------------ the formulas, written once
// Every per-element and per-sample formula of the PGD family. The CUDA kernels and the CPU scalar
// paths call these; the CPU vector paths compute the same operations in the same order, and
// tests/test_pgd_ops.py checks them against these with ROBUSTOPS_CPU_SCALAR=1. Multiply-adds are
// written as fmaf, so that nvcc (which contracts a*b+c by default) and the host compiler (which
// does not, in ISO C++ mode) round alike.

namespace robustops {

// L-inf step: clamp(x + clamp(x_adv + alpha*sign(g) - x, -eps, eps), lo, hi). alpha*sign(g) is
// exact, so the fmaf rounds like the plain sum.
RO_HD float linf_update(float xa, float x, float g, float eps, float alpha, float lo, float hi) {
  return clampf(x + clampf(fmaf(alpha, signf(g), xa) - x, -eps, eps), lo, hi);
}

// recycle_step_: delta' = clamp(delta + step*sign(g), -eps, eps), then clamped so that x + delta'
// lies in [lo, hi].
RO_HD float recycle_update(float delta, float g, float x, float eps, float step, float lo, float hi) {
  const float d = clampf(fmaf(step, signf(g), delta), -eps, eps);
  return clampf(x + d, lo, hi) - x;
}

// The per-sample sums of the L2 step over a = x_adv - x (rounded to float, as the update uses it)
// and g: sum a^2, sum a*g, sum g^2, in double. The products of floats are exact in double, and
// double's range holds any float's square, so neither tiny (1e-24) nor huge gradients under- or
// overflow. How the sums are accumulated is the one device-specific part (cpu/pgd.cpp, cuda/pgd.cu).
struct L2Sums {
  double aa = 0.0, ag = 0.0, gg = 0.0;
};

RO_HD void l2_add(L2Sums& s, float xa, float x, float g) {
  const double a = static_cast<double>(xa - x), gd = static_cast<double>(g);
  s.aa += a * a;
  s.ag += a * gd;
  s.gg += gd * gd;
}

// The factors of x_new = clamp(x + f (a + c g), lo, hi), c = alpha / max(||g||, tiny),
// f = min(1, eps / ||a + c g||), with ||a + c g||^2 = sum a^2 + 2 c sum a.g + c^2 sum g^2.
// Computed in double; c is handed to the float update as c1 * c2 with c1 a power of two (1, or 2^100
// when c is beyond float's comfortable range: gradients below ~1e-30), so g * c1 is exact and
// fmaf(c2, g * c1, a) rounds exactly like fmaf(c, g, a) whenever c fits in a float. A NaN in the
// sample makes f NaN and so the whole sample NaN, as in the reference.
struct L2Factors {
  float c1, c2, f;
};

RO_HD L2Factors l2_factors(const L2Sums& s, float alpha, float eps) {
  const double tiny = static_cast<double>(kTiny);
  const double gn = sqrt(s.gg);
  const double c = static_cast<double>(alpha) / ((gn > tiny || gn != gn) ? gn : tiny);
  double dn2 = s.aa + 2.0 * c * s.ag + c * c * s.gg;
  dn2 = dn2 < 0.0 ? 0.0 : dn2;  // rounding of a cancelling sum; NaN passes through
  const double dn = sqrt(dn2);
  const double e = static_cast<double>(eps);
  const double f = dn > e ? e / dn : (dn != dn ? dn : 1.0);
  const double big = 1267650600228229401496703205376.0;  // 2^100
  const double c1 = c > big ? big : 1.0;
  return {static_cast<float>(c1), static_cast<float>(c / c1), static_cast<float>(f)};
}

RO_HD float l2_update(float xa, float x, float g, const L2Factors& k, float lo, float hi) {
  return clampf(fmaf(k.f, fmaf(k.c2, g * k.c1, xa - x), x), lo, hi);
}

// random_init's Philox layout: logical element l = b*D + e (sample b, element e) takes word e % 4 of
// counter (offset + b) * ceil(D/4) + e / 4 of the uniform / direction stream, and sample b's L2 radius
// counter offset + b of the radius stream. The offset counts samples, so a batch split at sample k and
// drawn with offset + k gives the same numbers, whatever D.
struct InitCounter {
  uint64_t ctr;
  int word;
};

RO_HD InitCounter init_counter(int64_t l, int64_t D, uint64_t offset) {
  const int64_t b = l / D, e = l - b * D;
  const uint64_t groups = static_cast<uint64_t>((D + 3) / 4);
  return {(offset + static_cast<uint64_t>(b)) * groups + static_cast<uint64_t>(e >> 2), static_cast<int>(e & 3)};
}

// t moved one representable step down (dir < 0) or up (dir > 0): for the 16-bit types by their bit
// patterns (sign-magnitude), for float unchanged (a float result is exact, never past a bound).
template <typename T>
RO_HD T step_ulp(T t, int dir) {
  if constexpr (std::is_same_v<T, float>) {
    return t;
  } else {
    const uint16_t bits = t.x, mag = bits & 0x7FFFu;
    const bool neg = (bits & 0x8000u) != 0;
    uint16_t out;
    if (mag == 0) out = dir < 0 ? 0x8001u : 0x0001u;             // from zero to the smallest subnormal
    else out = ((dir > 0) != neg) ? bits + 1u : bits - 1u;      // away from or toward zero
    return T(out, T::from_bits());
  }
}

// v stored in T within [lo, hi]: round-to-nearest can step past a bound that T cannot represent
// (an fp16 / bf16 start point one ulp outside the box or the range); one step back fixes that.
template <typename T>
RO_HD T store_within(float v, float lo, float hi) {
  T t = static_cast<T>(v);
  const float tf = static_cast<float>(t);
  if (tf > hi) t = step_ulp(t, -1);
  else if (tf < lo) t = step_ulp(t, +1);
  return t;
}

// random_init, L-inf: x + eps * (2u - 1), clamped; u uniform in [0, 1).
RO_HD float init_linf_update(float x, float u, float eps, float lo, float hi) {
  return clampf(fmaf(eps, fmaf(2.f, u, -1.f), x), lo, hi);
}

// random_init, L2: x + s z with z ~ N(0, I) the direction and s = radius / ||z||. The radius law:
// kRadiusVolume draws the point uniform in the ball's volume (radius eps * u^(1/D): the volume within
// r grows like r^D); kRadiusUniform draws the radius uniform in [0, eps] (eps * u). sumsq_z is
// sum z^2 over the sample (double), u uniform in [0, 1).
enum RadiusLaw : int { kRadiusVolume = 0, kRadiusUniform = 1 };

RO_HD float init_l2_scale(double sumsq_z, float u, float eps, int64_t D, int law) {
  const double ud = static_cast<double>(u);
  const double radius = static_cast<double>(eps) * (law == kRadiusVolume ? pow(ud, 1.0 / static_cast<double>(D)) : ud);
  const double zn = sqrt(sumsq_z);
  return static_cast<float>(radius / (zn > static_cast<double>(kTiny) ? zn : static_cast<double>(kTiny)));
}

// Sample b's uniform for its L2 radius: counter offset + b of the radius stream (see init_counter).
RO_HD float init_radius_u(uint64_t seed, uint64_t offset, int64_t b) {
  return uniform01(philox4x32_10(seed, offset + static_cast<uint64_t>(b), kStreamInitRadius).c0);
}

RO_HD float init_l2_update(float x, float z, float scale, float lo, float hi) {
  return clampf(fmaf(scale, z, x), lo, hi);
}

}  // namespace robustops

// ------------------------------------------------------------------------------ langevin_step_
// The hybrid Langevin step of DALE (Robey et al. 2021). Its noise uses random_init's counter layout
// (init_counter: the offset counts samples) on a stream of its own, so it is fixed by (seed, offset +
// sample index, element index) whatever the layout, the device or the batch split.

namespace robustops {

enum LangevinForm : int { kLangevinGaussian = 0, kLangevinLaplace = 1 };

inline int parse_langevin_form(c10::string_view s) {
  if (s == "gaussian") return kLangevinGaussian;
  if (s == "laplace") return kLangevinLaplace;
  TORCH_CHECK(false, "form must be \"gaussian\" or \"laplace\", got \"", std::string(s), "\"");
}

// Laplace(0, 1) from one 32-bit word: an Exp(1) magnitude -ln u (u in (0, 1] from the top 24 bits)
// given the sign of bit 0. The two bit fields are disjoint, so sign and magnitude are independent,
// and the density is exp(-|l|) / 2. The accurate logf on both devices (not __logf).
RO_HD float laplace_from(uint32_t w) {
  const float e = -logf(uniform01_open0(w));
  return (w & 1u) ? -e : e;
}

// The noise of word i (0..3) of one Philox call: a standard normal (Box-Muller pairs, as
// gaussian_noise and random_init draw them) or a standard Laplace.
RO_HD float langevin_draw(const Philox4x32& r, int i, int form) {
  return form == kLangevinGaussian ? normal_from(r, i) : laplace_from(philox_word(r, i));
}

// One element of the step, on x_adv = x + delta, with n the element's noise and c its scale:
//   Gaussian: v = x_adv + alpha*sign(g) + c*n      Laplace: v = x_adv + alpha*sign(g + c*n)
// then x_adv' = clamp(x + clamp(v - x, -eps, eps), lo, hi), the projection of pgd_step_'s L-inf
// step. With c = 0 both forms round exactly like linf_update: c*n is a zero, and adding a zero
// leaves a float unchanged (up to the sign of a zero result).
RO_HD float langevin_update(float xa, float x, float g, float n, float eps, float alpha, float c, int form, float lo,
                            float hi) {
  const float v = form == kLangevinGaussian ? fmaf(c, n, fmaf(alpha, signf(g), xa))
                                            : fmaf(alpha, signf(fmaf(c, n, g)), xa);
  return clampf(x + clampf(v - x, -eps, eps), lo, hi);
}

}  // namespace robustops
