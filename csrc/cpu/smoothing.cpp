// CPU kernels of the smoothing family: gaussian_noise and count_votes_.
//
// gaussian_noise writes its [B*num, ...] output once: no repeat-then-add temporaries. Noisy
// sample s = offset + b*num + j takes Philox counters s*ceil(D/4) + e/4 for its logical elements
// e, so the noise depends only on (seed, s, e): not on the batch split, the layout or the device.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "../common.h"
#include "../smoothing.h"

namespace robustops {
namespace {

template <typename TI, typename TO>
void noise_kernel(const TI* x, TO* out, const NoiseGeometry& g, const float* mean, const float* istd, float sigma,
                  uint64_t seed, uint64_t offset) {
  const int64_t rows = g.B * g.num;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(g.D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const TI* xr = x + (r / g.num) * g.D;
      TO* orow = out + r * g.D;
      const uint64_t base = (offset + static_cast<uint64_t>(r)) * static_cast<uint64_t>(g.groups);
      for (int64_t q = 0; q < g.groups; ++q) {
        float z[4];
        normals4(philox4x32_10(seed, base + static_cast<uint64_t>(q), kStreamGaussian), z);
        const int64_t e0 = q * 4, n = std::min<int64_t>(4, g.D - e0);
        for (int64_t k = 0; k < n; ++k) {
          const int64_t e = e0 + k;
          const int64_t c = g.channel(e);
          float v = static_cast<float>(xr[e]) + sigma * z[k];
          if (mean) v -= mean[c];
          if (istd) v *= istd[c];
          orow[g.out_offset(e, c)] = static_cast<TO>(v);
        }
      }
    }
  });
}

at::Tensor gaussian_noise_cpu(const at::Tensor& x_in, int64_t num, double sigma, int64_t seed, int64_t offset,
                              const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std_,
                              std::optional<at::ScalarType> out_dtype, bool channels_last) {
  NoiseArgs a = prepare_noise(x_in, num, sigma, offset, mean, std_, out_dtype, channels_last);
  if (a.out.numel() == 0) return a.out;
  RO_DISPATCH_FLOATING(a.x.scalar_type(), "gaussian_noise", [&] {
    using TI = scalar_t;
    RO_DISPATCH_FLOATING(a.out.scalar_type(), "gaussian_noise", [&] {
      noise_kernel<TI, scalar_t>(a.x.data_ptr<TI>(), a.out.data_ptr<scalar_t>(), a.geo, a.mean_ptr(), a.istd_ptr(),
                                 static_cast<float>(sigma), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
    });
  });
  return a.out;
}

// torch.argmax's rule: the first NaN wins; otherwise the first maximum.
template <typename T>
int64_t row_argmax(const T* p, int64_t C) {
  int64_t best = 0;
  float bv = static_cast<float>(p[0]);
  if (std::isnan(bv)) return 0;
  for (int64_t c = 1; c < C; ++c) {
    const float v = static_cast<float>(p[c]);
    if (std::isnan(v)) return c;
    if (v > bv) {
      bv = v;
      best = c;
    }
  }
  return best;
}

void count_votes_cpu(const at::Tensor& logits_in, at::Tensor& counts) {
  check_votes(logits_in, counts);
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
  m.impl("count_votes_", &robustops::count_votes_cpu);
}
