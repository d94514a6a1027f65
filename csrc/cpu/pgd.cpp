// CPU kernels of the PGD family: pgd_step_, random_init, recycle_step_.
//
// Memory traffic: L-inf pgd_step_ and recycle_step_ read three tensors and write one, in a single
// pass. L2 needs two per-sample reductions (||grad|| and ||x_adv + alpha*g/||g|| - x||); both come
// out of one reading pass, because with a = x_adv - x and c = alpha/||g||,
//   ||a + c g||^2 = sum a^2 + 2 c sum a.g + c^2 sum g^2,
// so L2 costs one extra read pass, not two.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "../pgd.h"

namespace robustops {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();
constexpr int64_t kGrain = 16384;  // elements per parallel task
constexpr int64_t kCacheResident = 32768;  // samples up to this size are processed whole by one thread

// Two float vectors (2 * kV elements) per step: one Vectorized<BFloat16/Half> widens into exactly
// two float vectors and narrows back from two, so reduced types load and store at full width.
constexpr int64_t kStep = 2 * kV;

template <typename T>
inline void vload2(const T* p, Vec& a, Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + kV);
  } else {
    at::vec::load_to_float(p, a, b);
  }
}

template <typename T>
inline void vstore2(T* p, const Vec& a, const Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + kV);
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

// Runs f(xa_or_delta, x, g) -> new value over [i, i1) in steps of kStep; returns where it stopped.
template <typename T, typename F>
inline int64_t vec_update(T* out, const T* x, const T* g, int64_t i, int64_t i1, const F& f) {
  for (; i + kStep <= i1; i += kStep) {
    Vec o0, o1, x0, x1, g0, g1;
    vload2(out + i, o0, o1);
    vload2(x + i, x0, x1);
    vload2(g + i, g0, g1);
    vstore2(out + i, f(o0, x0, g0), f(o1, x1, g1));
  }
  return i;
}

// NaN-propagating, like torch.clamp / torch.sign (see common.h).
inline Vec vclamp(const Vec& v, const Vec& lo, const Vec& hi) {
  Vec r = Vec::blendv(v, lo, v < lo);
  return Vec::blendv(r, hi, r > hi);
}
inline Vec vsign(const Vec& g) {
  const Vec zero(0.f);
  Vec s = Vec::blendv(g, Vec(1.f), g > zero);
  return Vec::blendv(s, Vec(-1.f), g < zero);
}

// Calls fn(b, start, stop) for the pieces of the memory range [begin, end) that lie in one sample
// (sample b covers [b*D, (b+1)*D)), so per-sample parameters are loop invariants inside fn.
template <typename F>
inline void for_each_sample_piece(int64_t begin, int64_t end, int64_t D, const F& fn) {
  while (begin < end) {
    const int64_t b = begin / D;
    const int64_t stop = std::min(end, (b + 1) * D);
    fn(b, begin, stop);
    begin = stop;
  }
}

// ---------------------------------------------------------------------------------- pgd_step_

template <typename T>
void linf_step(T* xa, const T* x, const T* g, int64_t numel, int64_t D, SampleParam eps, SampleParam alpha,
               float lo, float hi) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for_each_sample_piece(begin, end, D, [&](int64_t b, int64_t i0, int64_t i1) {
      const float e = eps.get(b), a = alpha.get(b);
      const Vec ve(e), vne(-e), va(a), vlo(lo), vhi(hi);
      int64_t i = vec_update(xa, x, g, i0, i1, [&](const Vec& xav, const Vec& xv, const Vec& gv) {
        return vclamp(xv + vclamp(xav + va * vsign(gv) - xv, vne, ve), vlo, vhi);
      });
      for (; i < i1; ++i) {
        const float xv = static_cast<float>(x[i]);
        const float d = clampf(static_cast<float>(xa[i]) + a * signf(static_cast<float>(g[i])) - xv, -e, e);
        xa[i] = static_cast<T>(clampf(xv + d, lo, hi));
      }
    });
  });
}

// Per-piece partial sums of a^2, a.g, g^2 with a = x_adv - x, accumulated in fp32 vectors
// and combined in double.
template <typename T>
void l2_sums(const T* xa, const T* x, const T* g, int64_t i0, int64_t i1, double* out) {
  Vec saa(0.f), sag(0.f), sgg(0.f);
  int64_t i = i0;
  for (; i + kStep <= i1; i += kStep) {
    Vec a0, a1, x0, x1, g0, g1;
    vload2(xa + i, a0, a1);
    vload2(x + i, x0, x1);
    vload2(g + i, g0, g1);
    a0 = a0 - x0;
    a1 = a1 - x1;
    saa = at::vec::fmadd(a1, a1, at::vec::fmadd(a0, a0, saa));
    sag = at::vec::fmadd(a1, g1, at::vec::fmadd(a0, g0, sag));
    sgg = at::vec::fmadd(g1, g1, at::vec::fmadd(g0, g0, sgg));
  }
  float baa[kV], bag[kV], bgg[kV];
  saa.store(baa);
  sag.store(bag);
  sgg.store(bgg);
  double daa = 0, dag = 0, dgg = 0;
  for (int64_t j = 0; j < kV; ++j) {
    daa += baa[j];
    dag += bag[j];
    dgg += bgg[j];
  }
  for (; i < i1; ++i) {
    const double a = static_cast<double>(static_cast<float>(xa[i]) - static_cast<float>(x[i]));
    const double gv = static_cast<float>(g[i]);
    daa += a * a;
    dag += a * gv;
    dgg += gv * gv;
  }
  out[0] += daa;
  out[1] += dag;
  out[2] += dgg;
}

// x_new = clamp(x + f (a + c g)) with c = alpha/||g||, f = min(1, eps/||a + c g||), from the sums
// s = (sum a^2, sum a.g, sum g^2). Returns {c, f}; NaN sums stay NaN (only that sample is affected).
inline std::pair<float, float> l2_factors(const double* s, float alpha, float eps) {
  const double c = alpha / std::max(std::sqrt(s[2]), static_cast<double>(kTiny));
  const double dn = std::sqrt(std::max(s[0] + 2.0 * c * s[1] + c * c * s[2], 0.0));
  const double f = dn > eps ? eps / dn : (std::isnan(dn) ? dn : 1.0);
  return {static_cast<float>(c), static_cast<float>(f)};
}

template <typename T>
void l2_apply(T* xa, const T* x, const T* g, int64_t i0, int64_t i1, float c, float f, float lo, float hi) {
  const Vec vc(c), vf(f), vlo(lo), vhi(hi);
  int64_t i = vec_update(xa, x, g, i0, i1, [&](const Vec& xav, const Vec& xv, const Vec& gv) {
    return vclamp(xv + vf * at::vec::fmadd(vc, gv, xav - xv), vlo, vhi);
  });
  for (; i < i1; ++i) {
    const float xv = static_cast<float>(x[i]);
    const float d = f * (static_cast<float>(xa[i]) - xv + c * static_cast<float>(g[i]));
    xa[i] = static_cast<T>(clampf(xv + d, lo, hi));
  }
}

template <typename T>
void l2_step(T* xa, const T* x, const T* g, int64_t B, int64_t D, SampleParam eps, SampleParam alpha, float lo,
             float hi) {
  // Enough samples to feed every thread and each small enough to stay in the core's cache: one task
  // per sample, whose second (apply) pass re-reads the sample from cache instead of memory.
  if (D <= kCacheResident && B >= 2 * at::get_num_threads()) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double s[3] = {0, 0, 0};
        l2_sums(xa, x, g, b * D, (b + 1) * D, s);
        const auto [c, f] = l2_factors(s, alpha.get(b), eps.get(b));
        l2_apply(xa, x, g, b * D, (b + 1) * D, c, f, lo, hi);
      }
    });
    return;
  }
  // Otherwise: per-chunk partial sums over all threads, then the update.
  const int64_t nchunk = (D + kGrain - 1) / kGrain;
  std::vector<double> part(static_cast<size_t>(B * nchunk * 3), 0.0);
  at::parallel_for(0, B * nchunk, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nchunk, c = t % nchunk;
      const int64_t i0 = b * D + c * kGrain, i1 = std::min(b * D + (c + 1) * kGrain, (b + 1) * D);
      l2_sums(xa, x, g, i0, i1, &part[static_cast<size_t>(t * 3)]);
    }
  });
  std::vector<float> cf(static_cast<size_t>(B * 2));
  for (int64_t b = 0; b < B; ++b) {
    double s[3] = {0, 0, 0};
    for (int64_t c = 0; c < nchunk; ++c)
      for (int k = 0; k < 3; ++k) s[k] += part[static_cast<size_t>((b * nchunk + c) * 3 + k)];
    std::tie(cf[b * 2], cf[b * 2 + 1]) = l2_factors(s, alpha.get(b), eps.get(b));
  }
  at::parallel_for(0, B * D, kGrain, [&](int64_t begin, int64_t end) {
    for_each_sample_piece(begin, end, D, [&](int64_t b, int64_t i0, int64_t i1) {
      l2_apply(xa, x, g, i0, i1, cf[b * 2], cf[b * 2 + 1], lo, hi);
    });
  });
}

void pgd_step_cpu(at::Tensor& x_adv, const at::Tensor& x_in, const at::Tensor& grad_in, const at::Tensor& eps_t,
                  const at::Tensor& alpha_t, c10::string_view norm_s, double lo, double hi) {
  const Norm norm = parse_norm(norm_s);
  const StepArgs s = prepare_step(x_adv, "x_adv", x_in, "x", grad_in, "grad", eps_t, "eps", alpha_t, "alpha");
  if (s.numel == 0) return;
  RO_DISPATCH_FLOATING(x_adv.scalar_type(), "pgd_step_", [&] {
    auto* xa = x_adv.data_ptr<scalar_t>();
    const auto* xp = s.a.data_ptr<scalar_t>();
    const auto* gp = s.b.data_ptr<scalar_t>();
    if (norm == Norm::Linf)
      linf_step(xa, xp, gp, s.numel, s.D, s.p, s.q, static_cast<float>(lo), static_cast<float>(hi));
    else
      l2_step(xa, xp, gp, s.B, s.D, s.p, s.q, static_cast<float>(lo), static_cast<float>(hi));
  });
}

// -------------------------------------------------------------------------------- random_init

// Walks memory [i0, i1) and calls fn(i, n) with the element's standard normal (L2 direction) or
// uniform (L-inf) draw. One Philox call serves the four logical neighbours of a group; the cache
// makes contiguous tensors pay one call per four elements.
template <bool NORMAL, typename F>
inline void draw_range(int64_t i0, int64_t i1, const LogicalIndex& li, uint64_t seed, uint64_t offset,
                       const F& fn) {
  uint64_t cached = ~uint64_t(0);
  Philox4x32 r{};
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t l = li(i);
    const uint64_t ctr = offset + static_cast<uint64_t>(l >> 2);
    if (ctr != cached) {
      r = philox4x32_10(seed, ctr, kStreamInitUniform);
      cached = ctr;
    }
    const int w = static_cast<int>(l & 3);
    fn(i, NORMAL ? normal_from(r, w) : uniform01(philox_word(r, w)));
  }
}

template <typename T>
void random_init_kernel(T* out, const T* x, int64_t B, int64_t D, const LogicalIndex& li, Norm norm,
                        SampleParam eps, float lo, float hi, uint64_t seed, uint64_t offset) {
  if (norm == Norm::Linf) {
    at::parallel_for(0, B * D, kGrain, [&](int64_t begin, int64_t end) {
      for_each_sample_piece(begin, end, D, [&](int64_t b, int64_t i0, int64_t i1) {
        const float e = eps.get(b);
        draw_range<false>(i0, i1, li, seed, offset, [&](int64_t i, float u) {
          out[i] = static_cast<T>(clampf(static_cast<float>(x[i]) + e * (2.f * u - 1.f), lo, hi));
        });
      });
    });
    return;
  }
  // L2: direction z/||z|| with z ~ N(0, I), radius eps * U^(1/D): uniform in the ball because
  // the volume within radius r grows like r^D. z is drawn twice (norm pass, write pass) rather
  // than stored: recomputing Philox is cheaper than a temporary of the input's size.
  const int64_t nchunk = (D + kGrain - 1) / kGrain;
  std::vector<double> part(static_cast<size_t>(B * nchunk), 0.0);
  at::parallel_for(0, B * nchunk, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nchunk, c = t % nchunk;
      const int64_t i0 = b * D + c * kGrain, i1 = std::min(b * D + (c + 1) * kGrain, (b + 1) * D);
      double s = 0;
      draw_range<true>(i0, i1, li, seed, offset, [&](int64_t, float z) { s += double(z) * z; });
      part[static_cast<size_t>(t)] = s;
    }
  });
  std::vector<float> scale(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    double s = 0;
    for (int64_t c = 0; c < nchunk; ++c) s += part[static_cast<size_t>(b * nchunk + c)];
    const float u = uniform01(philox4x32_10(seed, offset + static_cast<uint64_t>(b), kStreamInitRadius).c0);
    const double radius = eps.get(b) * std::pow(static_cast<double>(u), 1.0 / static_cast<double>(D));
    scale[b] = static_cast<float>(radius / std::max(std::sqrt(s), static_cast<double>(kTiny)));
  }
  at::parallel_for(0, B * D, kGrain, [&](int64_t begin, int64_t end) {
    for_each_sample_piece(begin, end, D, [&](int64_t b, int64_t i0, int64_t i1) {
      const float sc = scale[b];
      draw_range<true>(i0, i1, li, seed, offset, [&](int64_t i, float z) {
        out[i] = static_cast<T>(clampf(static_cast<float>(x[i]) + sc * z, lo, hi));
      });
    });
  });
}

at::Tensor random_init_cpu(const at::Tensor& x_in, const at::Tensor& eps_t, c10::string_view norm_s, double lo,
                           double hi, int64_t seed, int64_t offset) {
  const Norm norm = parse_norm(norm_s);
  const InitArgs s = prepare_init(x_in, eps_t);
  if (s.numel == 0) return s.out;
  RO_DISPATCH_FLOATING(s.x.scalar_type(), "random_init", [&] {
    random_init_kernel(s.out.data_ptr<scalar_t>(), s.x.data_ptr<scalar_t>(), s.B, s.D, s.li, norm, s.eps,
                       static_cast<float>(lo), static_cast<float>(hi), static_cast<uint64_t>(seed),
                       static_cast<uint64_t>(offset));
  });
  return s.out;
}

// ------------------------------------------------------------------------------ recycle_step_

template <typename T>
void recycle_kernel(T* delta, const T* g, const T* x, int64_t numel, int64_t D, SampleParam eps,
                    SampleParam step, float lo, float hi) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for_each_sample_piece(begin, end, D, [&](int64_t b, int64_t i0, int64_t i1) {
      const float e = eps.get(b), s = step.get(b);
      const Vec ve(e), vne(-e), vs(s), vlo(lo), vhi(hi);
      int64_t i = vec_update(delta, x, g, i0, i1, [&](const Vec& dv, const Vec& xv, const Vec& gv) {
        return vclamp(xv + vclamp(at::vec::fmadd(vs, vsign(gv), dv), vne, ve), vlo, vhi) - xv;
      });
      for (; i < i1; ++i) {
        const float xv = static_cast<float>(x[i]);
        const float d = clampf(static_cast<float>(delta[i]) + s * signf(static_cast<float>(g[i])), -e, e);
        delta[i] = static_cast<T>(clampf(xv + d, lo, hi) - xv);
      }
    });
  });
}

void recycle_step_cpu(at::Tensor& delta, const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& eps_t,
                      const at::Tensor& step_t, double lo, double hi) {
  const StepArgs s = prepare_step(delta, "delta", grad_in, "grad", x_in, "x", eps_t, "eps", step_t, "step");
  if (s.numel == 0) return;
  RO_DISPATCH_FLOATING(delta.scalar_type(), "recycle_step_", [&] {
    recycle_kernel(delta.data_ptr<scalar_t>(), s.a.data_ptr<scalar_t>(), s.b.data_ptr<scalar_t>(), s.numel, s.D,
                   s.p, s.q, static_cast<float>(lo), static_cast<float>(hi));
  });
}

}  // namespace
}  // namespace robustops

TORCH_LIBRARY_IMPL(robustops, CPU, m) {
  m.impl("pgd_step_", &robustops::pgd_step_cpu);
  m.impl("random_init", &robustops::random_init_cpu);
  m.impl("recycle_step_", &robustops::recycle_step_cpu);
}
