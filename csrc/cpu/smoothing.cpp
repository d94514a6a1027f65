// CPU kernels of the smoothing family: gaussian_noise (and its per-row form gaussian_noise_rows) and
// count_votes_ (and count_votes_segments_).
//
// gaussian_noise writes its [B*num, ...] output once: no repeat-then-add temporaries. Noisy
// sample s = offset + b*num + j takes Philox counters s*ceil(D/4) + e/4 for its logical elements
// e, so the noise depends only on (seed, s, e): not on the batch split, the layout or the device.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "../smoothing.h"

namespace robustops {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();

// The standard normals of one noisy sample (counter base `base`) for its D logical elements, into z.
// Philox runs scalar; Box-Muller runs on float vectors (log / sin / cos of at::vec), four groups'
// worth of uniforms at a time per vector lane block.
void row_normals(uint64_t seed, uint64_t base, int64_t groups, float* z, std::vector<float>& tmp) {
  tmp.resize(static_cast<size_t>(4 * groups + 4 * kV));
  float* u1a = tmp.data();  // word 0 (radius of pair a), word 1 (angle a), word 2 / 3 for pair b
  float* u2a = u1a + groups + kV;
  float* u1b = u2a + groups;
  float* u2b = u1b + groups;
  for (int64_t q = 0; q < groups; ++q) {
    const Philox4x32 r = philox4x32_10(seed, base + static_cast<uint64_t>(q), kStreamGaussian);
    u1a[q] = uniform01_open0(r.c0);
    u2a[q] = uniform01(r.c1);
    u1b[q] = uniform01_open0(r.c2);
    u2b[q] = uniform01(r.c3);
  }
  const Vec m2(-2.f), tau(6.2831853071795864769f), zero(0.f);
  int64_t q = 0;
  // The vector Box-Muller: log / sqrt / sin / cos of at::vec (Sleef, <= 1 ulp) on the float angle
  // 2 pi u, within ~2e-6 of the scalar normals4 (philox.h) that the CUDA kernel runs; the tests
  // compare the two (ROBUSTOPS_CPU_SCALAR=1).
  const bool vec = cpu_vector_loops();
  for (; vec && q + kV <= groups; q += kV) {
    const Vec ra = at::vec::maximum(m2 * Vec::loadu(u1a + q).log(), zero).sqrt(), ta = tau * Vec::loadu(u2a + q);
    const Vec rb = at::vec::maximum(m2 * Vec::loadu(u1b + q).log(), zero).sqrt(), tb = tau * Vec::loadu(u2b + q);
    float za[kV], zb[kV], zc[kV], zd[kV];
    (ra * ta.cos()).store(za);
    (ra * ta.sin()).store(zb);
    (rb * tb.cos()).store(zc);
    (rb * tb.sin()).store(zd);
    for (int64_t k = 0; k < kV; ++k) {
      float* o = z + 4 * (q + k);
      o[0] = za[k];
      o[1] = zb[k];
      o[2] = zc[k];
      o[3] = zd[k];
    }
  }
  for (; q < groups; ++q) {
    float v[4];
    normals4(philox4x32_10(seed, base + static_cast<uint64_t>(q), kStreamGaussian), v);
    for (int k = 0; k < 4; ++k) z[4 * q + k] = v[k];
  }
}

template <typename TI, typename TO>
void noise_kernel(const TI* x, TO* out, const NoiseGeometry& g, const float* mean, const float* istd, float sigma,
                  const NoiseRows& map) {
  const int64_t rows = g.B * g.num;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(g.D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> z(static_cast<size_t>(4 * g.groups)), tmp;
    for (int64_t r = r0; r < r1; ++r) {
      const TI* xr = x + map.input(r) * g.D;
      TO* orow = out + r * g.D;
      row_normals(map.philox_key(r), map.philox_row(r) * static_cast<uint64_t>(g.groups), g.groups, z.data(), tmp);
      // One channel plane at a time, so the normalisation is a loop invariant.
      const int64_t C = std::max<int64_t>(g.C, 1), HW = g.D / C;
      for (int64_t c = 0; c < C; ++c) {
        const float m = mean ? mean[c] : 0.f, s = istd ? istd[c] : 1.f;
        const TI* xc = xr + c * HW;
        const float* zc = z.data() + c * HW;
        if (g.channels_last) {
          for (int64_t i = 0; i < HW; ++i) orow[i * C + c] = static_cast<TO>(noise_value(static_cast<float>(xc[i]), zc[i], sigma, m, s));
        } else {
          TO* oc = orow + c * HW;
          for (int64_t i = 0; i < HW; ++i) oc[i] = static_cast<TO>(noise_value(static_cast<float>(xc[i]), zc[i], sigma, m, s));
        }
      }
    }
  });
}

void run_noise(const NoiseArgs& a, double sigma, const NoiseRows& map) {
  read_cpu_scalar_switch();
  RO_DISPATCH_FLOATING(a.x.scalar_type(), "gaussian_noise", [&] {
    using TI = scalar_t;
    RO_DISPATCH_FLOATING(a.out.scalar_type(), "gaussian_noise", [&] {
      noise_kernel<TI, scalar_t>(a.x.data_ptr<TI>(), a.out.data_ptr<scalar_t>(), a.geo, a.mean_ptr(), a.istd_ptr(),
                                 static_cast<float>(sigma), map);
    });
  });
}

at::Tensor gaussian_noise_cpu(const at::Tensor& x_in, int64_t num, double sigma, int64_t seed, int64_t offset,
                              const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std_,
                              std::optional<at::ScalarType> out_dtype, bool channels_last) {
  NoiseArgs a = prepare_noise(x_in, num, sigma, offset, mean, std_, out_dtype, channels_last);
  if (a.out.numel() == 0) return a.out;
  run_noise(a, sigma, dense_rows(num, seed, offset));
  return a.out;
}

at::Tensor gaussian_noise_rows_cpu(const at::Tensor& x_in, const at::Tensor& source, const at::Tensor& key,
                                   const at::Tensor& row, double sigma, const std::optional<at::Tensor>& mean,
                                   const std::optional<at::Tensor>& std_, std::optional<at::ScalarType> out_dtype,
                                   bool channels_last) {
  const auto tables = check_noise_rows(x_in, source, key, row);
  NoiseArgs a = prepare_noise(x_in, 1, sigma, 0, mean, std_, out_dtype, channels_last, source.size(0));
  const int64_t R = source.size(0), B = x_in.size(0);
  const int64_t *sp = tables[0].data_ptr<int64_t>(), *rp = tables[2].data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(sp[r] >= 0 && sp[r] < B, "source[", r, "] must index a row of x (0 <= source < ", B, "), got ", sp[r]);
    TORCH_CHECK(rp[r] >= 0, "row[", r, "] must be >= 0, got ", rp[r]);
  }
  if (a.out.numel() == 0) return a.out;
  run_noise(a, sigma, table_rows(tables));
  return a.out;
}

// The device-offset form: rows from offset[0], which then advances by the B*num rows drawn.
at::Tensor gaussian_noise_dev_cpu(const at::Tensor& x_in, int64_t num, double sigma, int64_t seed, at::Tensor& offset,
                                  const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std_,
                                  std::optional<at::ScalarType> out_dtype, bool channels_last) {
  check_offset_tensor(offset, x_in);
  at::Tensor out = gaussian_noise_cpu(x_in, num, sigma, seed, offset.item<int64_t>(), mean, std_, out_dtype,
                                      channels_last);
  offset.add_(x_in.size(0) * num);
  return out;
}

// The argmax of one row under vote_better (smoothing.h), the rule the CUDA kernels use.
template <typename T>
int64_t row_argmax(const T* p, int64_t C) {
  int64_t best = 0;
  float bv = static_cast<float>(p[0]);
  for (int64_t c = 1; c < C; ++c) {
    const float v = static_cast<float>(p[c]);
    if (vote_better(v, c, bv, best)) {
      bv = v;
      best = c;
    }
  }
  return best;
}

// Rows of different segments may share a count row in any order, so the argmaxes run in parallel and
// the histogram update runs serially (integer adds: the order does not change the counts).
void count_votes_segments_cpu(const at::Tensor& logits_in, const at::Tensor& segment_in, at::Tensor& counts) {
  check_votes_segments(logits_in, segment_in, counts);
  const int64_t R = logits_in.size(0), S = counts.size(0), C = counts.size(1);
  if (R == 0) return;
  const at::Tensor logits = logits_in.contiguous(), segment = segment_in.contiguous();
  const int64_t* sp = segment.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)  // before any count moves: a bad call changes nothing
    TORCH_CHECK(sp[r] >= 0 && sp[r] < S, "segment[", r, "] must index a row of counts (0 <= segment < ", S,
                "), got ", sp[r]);
  std::vector<int64_t> best(static_cast<size_t>(R));
  RO_DISPATCH_FLOATING(logits.scalar_type(), "count_votes_segments_", [&] {
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    at::parallel_for(0, R, std::max<int64_t>(1, 4096 / C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) best[r] = row_argmax(lp + r * C, C);
    });
  });
  int64_t* cp = counts.data_ptr<int64_t>();
  const int64_t s0 = counts.stride(0), s1 = counts.stride(1);
  for (int64_t r = 0; r < R; ++r) cp[sp[r] * s0 + best[r] * s1] += 1;
}

void count_votes_cpu(const at::Tensor& logits_in, at::Tensor& counts) {
  check_votes(logits_in, counts);
  if (counts.size(0) == 0 || logits_in.size(0) == 0) return;
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = counts.size(0), C = counts.size(1), num = logits.size(0) / B;
  const int64_t s0 = counts.stride(0), s1 = counts.stride(1);
  int64_t* cp = counts.data_ptr<int64_t>();
  RO_DISPATCH_FLOATING(logits.scalar_type(), "count_votes_", [&] {
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    // Sample b's rows are b*num .. b*num+num-1: parallel over b, so no two threads share a row of counts.
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(num * C, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t j = 0; j < num; ++j) cp[b * s0 + row_argmax(lp + (b * num + j) * C, C) * s1] += 1;
    });
  });
}

}  // namespace
}  // namespace robustops

TORCH_LIBRARY_IMPL(robustops, CPU, m) {
  m.impl("gaussian_noise", &robustops::gaussian_noise_cpu);
  m.impl("gaussian_noise_dev_offset", &robustops::gaussian_noise_dev_cpu);
  m.impl("count_votes_", &robustops::count_votes_cpu);
  m.impl("gaussian_noise_rows", &robustops::gaussian_noise_rows_cpu);
  m.impl("count_votes_segments_", &robustops::count_votes_segments_cpu);
}
