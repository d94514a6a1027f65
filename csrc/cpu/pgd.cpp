// CPU kernels of the PGD family: pgd_step_, random_init, recycle_step_, langevin_step_.
//
// Memory traffic: L-inf pgd_step_ and recycle_step_ read three tensors and write one, in a single
// pass. L2 needs two per-sample reductions (||grad|| and ||x_adv + alpha*g/||g|| - x||); both come
// out of one reading pass, because with a = x_adv - x and c = alpha/||g||,
//   ||a + c g||^2 = sum a^2 + 2 c sum a.g + c^2 sum g^2,
// so L2 costs one extra read pass, not two. The formulas themselves live in ../pgd.h (shared with
// the CUDA kernels); the vector loops here compute the same operations in the same order, and
// ROBUSTOPS_CPU_SCALAR=1 (read at every call) turns them off so the tests can compare the two.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <limits>
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
  if (!cpu_vector_loops()) return i;
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

// The L-inf step over [i0, i1), one sample's piece (eps e, step a).
template <typename T>
void linf_piece(T* xa, const T* x, const T* g, int64_t i0, int64_t i1, float e, float a, float lo, float hi) {
  const Vec ve(e), vne(-e), va(a), vlo(lo), vhi(hi);
  int64_t i = vec_update(xa, x, g, i0, i1, [&](const Vec& xav, const Vec& xv, const Vec& gv) {
    return vclamp(xv + vclamp(xav + va * vsign(gv) - xv, vne, ve), vlo, vhi);
  });
  for (; i < i1; ++i)
    xa[i] = static_cast<T>(linf_update(static_cast<float>(xa[i]), static_cast<float>(x[i]), static_cast<float>(g[i]),
                                       e, a, lo, hi));
}

template <typename T>
void linf_step(T* xa, const T* x, const T* g, int64_t numel, int64_t D, SampleParam eps, SampleParam alpha,
               float lo, float hi) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for_each_sample_piece(begin, end, D, [&](int64_t b, int64_t i0, int64_t i1) {
      linf_piece(xa, x, g, i0, i1, eps.get(b), alpha.get(b), lo, hi);
    });
  });
}

// max |g| over the vector body of [i, i1); a NaN anywhere makes it NaN.
template <typename T>
float max_abs(const T* g, int64_t i, int64_t i1) {
  Vec m0(0.f), m1(0.f);
  for (; i + kStep <= i1; i += kStep) {
    Vec g0, g1;
    vload2(g + i, g0, g1);
    m0 = at::vec::maximum(m0, g0.abs());
    m1 = at::vec::maximum(m1, g1.abs());
  }
  float buf[kV];
  at::vec::maximum(m0, m1).store(buf);
  float m = 0.f;
  for (int64_t j = 0; j < kV; ++j) m = (buf[j] > m || buf[j] != buf[j]) ? buf[j] : m;
  return m;
}

// Float-vector sums of a^2, a*(g*scale), (g*scale)^2 over the vector body of [i, i1), combined in
// double. Returns where the body stopped.
template <typename T>
int64_t l2_vector_sums(const T* xa, const T* x, const T* g, int64_t i, int64_t i1, float scale, double (&out)[3]) {
  const Vec vs(scale);
  Vec saa(0.f), sag(0.f), sgg(0.f);
  for (; i + kStep <= i1; i += kStep) {
    Vec a0, a1, x0, x1, g0, g1;
    vload2(xa + i, a0, a1);
    vload2(x + i, x0, x1);
    vload2(g + i, g0, g1);
    a0 = a0 - x0;
    a1 = a1 - x1;
    g0 = g0 * vs;
    g1 = g1 * vs;
    saa = at::vec::fmadd(a1, a1, at::vec::fmadd(a0, a0, saa));
    sag = at::vec::fmadd(a1, g1, at::vec::fmadd(a0, g0, sag));
    sgg = at::vec::fmadd(g1, g1, at::vec::fmadd(g0, g0, sgg));
  }
  float baa[kV], bag[kV], bgg[kV];
  saa.store(baa);
  sag.store(bag);
  sgg.store(bgg);
  out[0] = out[1] = out[2] = 0.0;
  for (int64_t j = 0; j < kV; ++j) {
    out[0] += baa[j];
    out[1] += bag[j];
    out[2] += bgg[j];
  }
  return i;
}

// The L2 sums (pgd.h) over the piece [i0, i1) of one sample. The vector body accumulates in float at
// full width. A float sum of g^2 below 2^-60 (squares may have underflowed: max |g| could be below
// 2^-40, or g is zero) or above 2^100 (they may overflow) is not trusted: the body is summed again on
// g scaled by the power of two 2^-e that brings max |g| into [0.5, 1), and the scaling is undone
// exactly in double. Ordinary gradients pay one pass, tiny (1e-24) and huge ones three; NaN passes
// through. (Accumulating in double instead would cost about a third of the L2 step's time on AVX2,
// and tracking max |g| in the first pass about a tenth.) The scalar tail adds exact double products.
template <typename T>
L2Sums l2_piece_sums(const T* xa, const T* x, const T* g, int64_t i0, int64_t i1) {
  L2Sums s;
  int64_t i = i0;
  if (cpu_vector_loops() && i + kStep <= i1) {
    double v[3];
    i = l2_vector_sums(xa, x, g, i0, i1, 1.f, v);
    int e = 0;
    if (!(v[2] >= 0x1p-60 && v[2] <= 0x1p100) && v[2] == v[2]) {
      const float m = max_abs(g, i0, i1);
      if (m > 0.f && m < std::numeric_limits<float>::infinity()) {
        std::frexp(m, &e);
        e = std::min(std::max(e, -125), 126);  // 2^-e stays a normal float
        l2_vector_sums(xa, x, g, i0, i1, std::ldexp(1.f, -e), v);
      }
    }
    s.aa = v[0];
    s.ag = std::ldexp(v[1], e);
    s.gg = std::ldexp(v[2], 2 * e);
  }
  for (; i < i1; ++i) l2_add(s, static_cast<float>(xa[i]), static_cast<float>(x[i]), static_cast<float>(g[i]));
  return s;
}

inline void l2_merge(L2Sums& into, const L2Sums& s) {
  into.aa += s.aa;
  into.ag += s.ag;
  into.gg += s.gg;
}

template <typename T>
void l2_apply(T* xa, const T* x, const T* g, int64_t i0, int64_t i1, const L2Factors& k, float lo, float hi) {
  const Vec vc1(k.c1), vc2(k.c2), vf(k.f), vlo(lo), vhi(hi);
  int64_t i = vec_update(xa, x, g, i0, i1, [&](const Vec& xav, const Vec& xv, const Vec& gv) {
    return vclamp(at::vec::fmadd(vf, at::vec::fmadd(vc2, gv * vc1, xav - xv), xv), vlo, vhi);
  });
  for (; i < i1; ++i)
    xa[i] = static_cast<T>(l2_update(static_cast<float>(xa[i]), static_cast<float>(x[i]), static_cast<float>(g[i]),
                                     k, lo, hi));
}

template <typename T>
void l2_step(T* xa, const T* x, const T* g, int64_t B, int64_t D, SampleParam eps, SampleParam alpha, float lo,
             float hi) {
  // Enough samples to feed every thread and each small enough to stay in the core's cache: one task
  // per sample, whose later passes re-read the sample from cache instead of memory.
  if (D <= kCacheResident && B >= 2 * at::get_num_threads()) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const L2Sums s = l2_piece_sums(xa, x, g, b * D, (b + 1) * D);
        l2_apply(xa, x, g, b * D, (b + 1) * D, l2_factors(s, alpha.get(b), eps.get(b)), lo, hi);
      }
    });
    return;
  }
  // Otherwise: per-chunk partial sums over all threads, then the update.
  const int64_t nchunk = (D + kGrain - 1) / kGrain;
  std::vector<L2Sums> part(static_cast<size_t>(B * nchunk));
  at::parallel_for(0, B * nchunk, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nchunk, c = t % nchunk;
      const int64_t i0 = b * D + c * kGrain, i1 = std::min(b * D + (c + 1) * kGrain, (b + 1) * D);
      part[static_cast<size_t>(t)] = l2_piece_sums(xa, x, g, i0, i1);
    }
  });
  std::vector<L2Factors> fac(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    L2Sums s;
    for (int64_t c = 0; c < nchunk; ++c) l2_merge(s, part[static_cast<size_t>(b * nchunk + c)]);
    fac[static_cast<size_t>(b)] = l2_factors(s, alpha.get(b), eps.get(b));
  }
  at::parallel_for(0, B * D, kGrain, [&](int64_t begin, int64_t end) {
    for_each_sample_piece(begin, end, D, [&](int64_t b, int64_t i0, int64_t i1) {
      l2_apply(xa, x, g, i0, i1, fac[static_cast<size_t>(b)], lo, hi);
    });
  });
}

void pgd_step_cpu(at::Tensor& x_adv, const at::Tensor& x_in, const at::Tensor& grad_in, const at::Tensor& eps_t,
                  const at::Tensor& alpha_t, c10::string_view norm_s, double lo, double hi) {
  const Norm norm = parse_norm(norm_s);
  read_cpu_scalar_switch();
  const Bounds bd = float_bounds(lo, hi);
  const StepArgs s = prepare_step(x_adv, "x_adv", x_in, "x", grad_in, "grad", eps_t, "eps", alpha_t, "alpha");
  if (s.numel == 0) return;
  RO_DISPATCH_FLOATING(x_adv.scalar_type(), "pgd_step_", [&] {
    auto* xa = x_adv.data_ptr<scalar_t>();
    const auto* xp = s.a.data_ptr<scalar_t>();
    const auto* gp = s.b.data_ptr<scalar_t>();
    if (norm == Norm::Linf)
      linf_step(xa, xp, gp, s.numel, s.D, s.p, s.q, bd.lo, bd.hi);
    else
      l2_step(xa, xp, gp, s.B, s.D, s.p, s.q, bd.lo, bd.hi);
  });
}

// -------------------------------------------------------------------------------- random_init

// Walks memory [i0, i1) and calls fn(i, v) with the element's draw v = draw(r, word) from its Philox
// group r of `stream`. One Philox call serves the four logical neighbours of a group; the cache makes
// contiguous tensors pay one call per four elements.
template <typename Draw, typename F>
inline void draw_stream(int64_t i0, int64_t i1, const LogicalIndex& li, int64_t D, uint64_t seed, uint64_t offset,
                        uint32_t stream, const Draw& draw, const F& fn) {
  uint64_t cached = ~uint64_t(0);
  Philox4x32 r{};
  for (int64_t i = i0; i < i1; ++i) {
    const InitCounter c = init_counter(li(i), D, offset);
    if (c.ctr != cached) {
      r = philox4x32_10(seed, c.ctr, stream);
      cached = c.ctr;
    }
    fn(i, draw(r, c.word));
  }
}

// random_init's draws: the standard normal (L2 direction) or uniform (L-inf) of each element.
template <bool NORMAL, typename F>
inline void draw_range(int64_t i0, int64_t i1, const LogicalIndex& li, int64_t D, uint64_t seed, uint64_t offset,
                       const F& fn) {
  draw_stream(i0, i1, li, D, seed, offset, kStreamInitUniform, [](const Philox4x32& r, int w) {
    return NORMAL ? normal_from(r, w) : uniform01(philox_word(r, w));
  }, fn);
}

template <typename T>
void random_init_kernel(T* out, const T* x, int64_t B, int64_t D, const LogicalIndex& li, Norm norm,
                        SampleParam eps, float lo, float hi, uint64_t seed, uint64_t offset, int law) {
  if (norm == Norm::Linf) {
    at::parallel_for(0, B * D, kGrain, [&](int64_t begin, int64_t end) {
      for_each_sample_piece(begin, end, D, [&](int64_t b, int64_t i0, int64_t i1) {
        const float e = eps.get(b);
        draw_range<false>(i0, i1, li, D, seed, offset, [&](int64_t i, float u) {
          const float xv = static_cast<float>(x[i]);
          out[i] = store_within<T>(init_linf_update(xv, u, e, lo, hi), std::max(lo, xv - e), std::min(hi, xv + e));
        });
      });
    });
    return;
  }
  // L2: direction z/||z|| with z ~ N(0, I), radius by `law` (pgd.h). z is drawn twice (norm pass,
  // write pass) rather than stored: recomputing Philox is cheaper than a temporary of the input's size.
  const int64_t nchunk = (D + kGrain - 1) / kGrain;
  std::vector<double> part(static_cast<size_t>(B * nchunk), 0.0);
  at::parallel_for(0, B * nchunk, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nchunk, c = t % nchunk;
      const int64_t i0 = b * D + c * kGrain, i1 = std::min(b * D + (c + 1) * kGrain, (b + 1) * D);
      double s = 0;
      draw_range<true>(i0, i1, li, D, seed, offset, [&](int64_t, float z) { s += double(z) * z; });
      part[static_cast<size_t>(t)] = s;
    }
  });
  std::vector<float> scale(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    double s = 0;
    for (int64_t c = 0; c < nchunk; ++c) s += part[static_cast<size_t>(b * nchunk + c)];
    scale[static_cast<size_t>(b)] = init_l2_scale(s, init_radius_u(seed, offset, b), eps.get(b), D, law);
  }
  at::parallel_for(0, B * D, kGrain, [&](int64_t begin, int64_t end) {
    for_each_sample_piece(begin, end, D, [&](int64_t b, int64_t i0, int64_t i1) {
      const float sc = scale[static_cast<size_t>(b)];
      draw_range<true>(i0, i1, li, D, seed, offset, [&](int64_t i, float z) {
        out[i] = store_within<T>(init_l2_update(static_cast<float>(x[i]), z, sc, lo, hi), lo, hi);
      });
    });
  });
}

at::Tensor random_init_impl(const at::Tensor& x_in, const at::Tensor& eps_t, c10::string_view norm_s, double lo,
                            double hi, int64_t seed, int64_t offset, c10::string_view radius) {
  const Norm norm = parse_norm(norm_s);
  const int law = parse_radius_law(radius);
  const InitArgs s = prepare_init(x_in, eps_t);
  if (s.numel == 0) return s.out;
  RO_DISPATCH_FLOATING(s.x.scalar_type(), "random_init", [&] {
    random_init_kernel(s.out.data_ptr<scalar_t>(), s.x.data_ptr<scalar_t>(), s.B, s.D, s.li, norm, s.eps,
                       float_bounds(lo, hi).lo, float_bounds(lo, hi).hi, static_cast<uint64_t>(seed),
                       static_cast<uint64_t>(offset), law);
  });
  return s.out;
}

at::Tensor random_init_cpu(const at::Tensor& x, const at::Tensor& eps, c10::string_view norm, double lo, double hi,
                           int64_t seed, int64_t offset, c10::string_view radius) {
  check_offset(offset);
  return random_init_impl(x, eps, norm, lo, hi, seed, offset, radius);
}

// The device-offset form: the offset is read from (and advanced in) a one-element int64 tensor.
at::Tensor random_init_dev_cpu(const at::Tensor& x, const at::Tensor& eps, c10::string_view norm, double lo,
                               double hi, int64_t seed, at::Tensor& offset, c10::string_view radius) {
  check_offset_tensor(offset, x);
  const int64_t off = offset.item<int64_t>();
  check_offset(off);
  at::Tensor out = random_init_impl(x, eps, norm, lo, hi, seed, off, radius);
  offset.add_(init_offset_advance(x));
  return out;
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
      for (; i < i1; ++i)
        delta[i] = static_cast<T>(recycle_update(static_cast<float>(delta[i]), static_cast<float>(g[i]),
                                                 static_cast<float>(x[i]), e, s, lo, hi));
    });
  });
}

void recycle_step_cpu(at::Tensor& delta, const at::Tensor& x_in, const at::Tensor& grad_in, const at::Tensor& eps_t,
                      const at::Tensor& step_t, double lo, double hi) {
  read_cpu_scalar_switch();
  const StepArgs s = prepare_step(delta, "delta", grad_in, "grad", x_in, "x", eps_t, "eps", step_t, "step");
  if (s.numel == 0) return;
  RO_DISPATCH_FLOATING(delta.scalar_type(), "recycle_step_", [&] {
    recycle_kernel(delta.data_ptr<scalar_t>(), s.a.data_ptr<scalar_t>(), s.b.data_ptr<scalar_t>(), s.numel, s.D,
                   s.p, s.q, float_bounds(lo, hi).lo, float_bounds(lo, hi).hi);
  });
}

// ----------------------------------------------------------------------------- langevin_step_

// The noise is drawn in blocks of kNoiseBlock elements into a stack buffer (scalar Philox, one call
// per four logical neighbours), then the step runs over the block at full vector width with the same
// operations, in the same order, as langevin_update. A sample whose noise scale is 0 draws nothing and
// takes the L-inf step itself (the same numbers: pgd.h).
constexpr int64_t kNoiseBlock = 512;

template <typename T>
void langevin_kernel(T* xa, const T* x, const T* g, int64_t numel, int64_t D, const LogicalIndex& li,
                     SampleParam eps, SampleParam alpha, SampleParam noise, int form, float lo, float hi,
                     uint64_t seed, uint64_t offset) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for_each_sample_piece(begin, end, D, [&](int64_t b, int64_t i0, int64_t i1) {
      const float e = eps.get(b), a = alpha.get(b), c = noise.get(b);
      if (c == 0.f) {
        linf_piece(xa, x, g, i0, i1, e, a, lo, hi);
        return;
      }
      const Vec ve(e), vne(-e), va(a), vc(c), vlo(lo), vhi(hi);
      float buf[kNoiseBlock];
      for (int64_t j0 = i0; j0 < i1; j0 += kNoiseBlock) {
        const int64_t j1 = std::min(j0 + kNoiseBlock, i1);
        draw_stream(j0, j1, li, D, seed, offset, kStreamLangevin,
                    [form](const Philox4x32& r, int w) { return langevin_draw(r, w, form); },
                    [&](int64_t i, float v) { buf[i - j0] = v; });
        int64_t i = j0;
        if (cpu_vector_loops()) {
          for (; i + kStep <= j1; i += kStep) {
            Vec o[2], xv[2], gv[2];
            vload2(xa + i, o[0], o[1]);
            vload2(x + i, xv[0], xv[1]);
            vload2(g + i, gv[0], gv[1]);
            for (int k = 0; k < 2; ++k) {
              const Vec n = Vec::loadu(buf + (i - j0) + k * kV);
              const Vec v = form == kLangevinGaussian ? at::vec::fmadd(vc, n, o[k] + va * vsign(gv[k]))
                                                      : o[k] + va * vsign(at::vec::fmadd(vc, n, gv[k]));
              o[k] = vclamp(xv[k] + vclamp(v - xv[k], vne, ve), vlo, vhi);
            }
            vstore2(xa + i, o[0], o[1]);
          }
        }
        for (; i < j1; ++i)
          xa[i] = static_cast<T>(langevin_update(static_cast<float>(xa[i]), static_cast<float>(x[i]),
                                                 static_cast<float>(g[i]), buf[i - j0], e, a, c, form, lo, hi));
      }
    });
  });
}

void langevin_step_cpu(at::Tensor& x_adv, const at::Tensor& x_in, const at::Tensor& grad_in, const at::Tensor& eps_t,
                       const at::Tensor& alpha_t, const at::Tensor& noise_t, c10::string_view form_s, double lo,
                       double hi, int64_t seed, int64_t offset) {
  const int form = parse_langevin_form(form_s);
  check_offset(offset);
  read_cpu_scalar_switch();
  const StepArgs s = prepare_step(x_adv, "x_adv", x_in, "x", grad_in, "grad", eps_t, "eps", alpha_t, "alpha");
  at::Tensor noise_holder;
  const SampleParam noise = make_sample_param(noise_t, "noise", x_adv, noise_holder);
  if (s.numel == 0) return;
  const LogicalIndex li = make_logical_index(x_adv);
  const Bounds bd = float_bounds(lo, hi);
  RO_DISPATCH_FLOATING(x_adv.scalar_type(), "langevin_step_", [&] {
    langevin_kernel(x_adv.data_ptr<scalar_t>(), s.a.data_ptr<scalar_t>(), s.b.data_ptr<scalar_t>(), s.numel, s.D, li,
                    s.p, s.q, noise, form, bd.lo, bd.hi, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  });
}

// The device-offset form: the offset is read from (and advanced by the B samples drawn in) a
// one-element int64 tensor, so the step draws what the integer form draws at that offset.
void langevin_step_dev_cpu(at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad, const at::Tensor& eps,
                           const at::Tensor& alpha, const at::Tensor& noise, c10::string_view form, double lo,
                           double hi, int64_t seed, at::Tensor& offset) {
  check_offset_tensor(offset, x_adv);
  langevin_step_cpu(x_adv, x, grad, eps, alpha, noise, form, lo, hi, seed, offset.item<int64_t>());
  offset.add_(init_offset_advance(x_adv));
}

}  // namespace
}  // namespace robustops

TORCH_LIBRARY_IMPL(robustops, CPU, m) {
  m.impl("pgd_step_", &robustops::pgd_step_cpu);
  m.impl("random_init", &robustops::random_init_cpu);
  m.impl("random_init_dev_offset", &robustops::random_init_dev_cpu);
  m.impl("recycle_step_", &robustops::recycle_step_cpu);
  m.impl("langevin_step_", &robustops::langevin_step_cpu);
  m.impl("langevin_step_dev_offset_", &robustops::langevin_step_dev_cpu);
}
