// Shared host-side preparation and geometry of the smoothing-family kernels (CPU and CUDA).
#pragma once
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <optional>

#include "common.h"

namespace robustops {

// count_votes_'s argmax rule, torch.argmax's: in (value, index) order a NaN beats everything (the
// first NaN wins), then larger values, then lower indices. Whether (v, i) beats (bv, bi).
RO_HD bool vote_better(float v, int64_t i, float bv, int64_t bi) {
  const bool vn = v != v, bn = bv != bv;
  if (vn || bn) return vn && (!bn || i < bi);
  return v > bv || (v == bv && i < bi);
}

// Shape facts of a gaussian_noise call. Logical element e of a sample lies in channel (e / HW) % C;
// its position in the output row is e (contiguous) or hw*C + c (channels_last, hw = e % HW).
struct NoiseGeometry {
  int64_t B, num, D, C, HW, groups;
  bool channels_last;
  RO_HD int64_t channel(int64_t e) const { return C > 1 ? (e / HW) % C : 0; }
  RO_HD int64_t out_offset(int64_t e, int64_t c) const { return channels_last ? (e % HW) * C + c : e; }
};

struct NoiseArgs {
  at::Tensor x, out, mean, istd;
  NoiseGeometry geo;
  const float* mean_ptr() const { return mean.defined() ? mean.data_ptr<float>() : nullptr; }
  const float* istd_ptr() const { return istd.defined() ? istd.data_ptr<float>() : nullptr; }
};

inline at::Tensor channel_param(const std::optional<at::Tensor>& p, const char* name, const at::Tensor& x,
                                int64_t C) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  TORCH_CHECK(p->dim() == 1 && p->size(0) == C, name, " must be a Tensor[C] with C = ", C, ", got shape ",
              p->sizes());
  TORCH_CHECK(p->device() == x.device(), name, " must be on ", x.device(), ", got ", p->device());
  return p->to(at::kFloat).contiguous();
}

inline NoiseArgs prepare_noise(const at::Tensor& x_in, int64_t num, double sigma, int64_t offset,
                               const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std_,
                               std::optional<at::ScalarType> out_dtype, bool channels_last) {
  check_float(x_in, "x");
  TORCH_CHECK(x_in.dim() >= 1, "x must have a leading batch dimension, got a 0-dim tensor");
  TORCH_CHECK(num >= 1, "num must be >= 1, got ", num);
  TORCH_CHECK(sigma >= 0 && std::isfinite(sigma), "sigma must be a finite number >= 0, got ", sigma);
  TORCH_CHECK(offset >= 0, "offset must be >= 0, got ", offset);
  TORCH_CHECK(!channels_last || x_in.dim() == 4 || x_in.dim() == 5, "channels_last needs a 4-D or 5-D x, got ",
              x_in.dim(), "-D");
  NoiseArgs a;
  a.x = x_in.contiguous();  // small next to the output (num times larger); logical order in memory
  const at::ScalarType ot = out_dtype.value_or(x_in.scalar_type());
  TORCH_CHECK(ot == at::kFloat || ot == at::kHalf || ot == at::kBFloat16,
              "out_dtype must be float32, float16 or bfloat16, got ", ot);
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape[0] *= num;
  auto opts = x_in.options().dtype(ot);
  if (channels_last)
    opts = opts.memory_format(x_in.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d);
  a.out = at::empty(shape, opts);
  NoiseGeometry& g = a.geo;
  g.B = x_in.size(0);
  g.num = num;
  g.D = g.B ? x_in.numel() / g.B : 0;
  g.C = x_in.dim() >= 2 ? x_in.size(1) : 1;
  g.HW = (x_in.dim() >= 2 && g.C > 0) ? g.D / g.C : 1;
  g.groups = (g.D + 3) / 4;
  g.channels_last = channels_last;
  a.mean = channel_param(mean, "mean", x_in, g.C);
  at::Tensor s = channel_param(std_, "std", x_in, g.C);
  if (s.defined()) a.istd = s.reciprocal();
  return a;
}

inline void check_votes(const at::Tensor& logits, const at::Tensor& counts) {
  check_float(logits, "logits");
  TORCH_CHECK(counts.scalar_type() == at::kLong, "counts must be int64, got ", counts.scalar_type());
  TORCH_CHECK(logits.dim() == 2 && counts.dim() == 2, "logits must be [B*num, C] and counts [B, C], got ",
              logits.sizes(), " and ", counts.sizes());
  TORCH_CHECK(logits.size(1) == counts.size(1), "logits has ", logits.size(1), " classes but counts has ",
              counts.size(1));
  TORCH_CHECK(counts.size(0) > 0 ? logits.size(0) % counts.size(0) == 0 : logits.size(0) == 0, "logits rows (",
              logits.size(0), ") must be a multiple of counts rows (B = ", counts.size(0), ")");
  TORCH_CHECK(at::has_internal_overlap(counts) != at::MemOverlap::Yes,
              "counts must not overlap itself (an expanded tensor): every (input, class) needs its own element");
  TORCH_CHECK(logits.device() == counts.device(), "counts must be on the same device as logits, got ",
              counts.device(), " and ", logits.device());
  TORCH_CHECK(logits.size(1) > 0 || logits.size(0) == 0, "logits must have at least one class");
}

}  // namespace robustops
