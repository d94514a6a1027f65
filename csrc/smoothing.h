// Shared host-side preparation and geometry of the smoothing-family kernels (CPU and CUDA).
#pragma once
#include <ATen/MemoryOverlap.h>

#include <array>
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

// One output element of the noise ops: x + sigma*z as one fused multiply-add (the GPU's FFMA, and what
// the host build with -mfma has always computed; spelled out so that no compiler's contraction choice
// decides the rounding), then (v - mean) * (1/std). Without normalisation mean = 0 and istd = 1, which
// change no value. The CPU and CUDA kernels both call this, so they round alike.
RO_HD float noise_value(float x, float z, float sigma, float mean, float istd) {
  return (fmaf(sigma, z, x) - mean) * istd;
}

// Where output row r of a noise op comes from: its input row of x, its Philox key and its noisy-row
// number (the counter base is that number times ceil(D/4)). gaussian_noise: input r / num, the call's
// seed, offset + r. gaussian_noise_rows: the per-row tables source / key / row.
struct NoiseRows {
  const int64_t* source = nullptr;  // null: the dense form
  const int64_t* key = nullptr;
  const int64_t* row = nullptr;
  int64_t num = 1;
  uint64_t seed = 0, offset = 0;
  RO_HD int64_t input(int64_t r) const { return source ? source[r] : r / num; }
  RO_HD uint64_t philox_key(int64_t r) const { return source ? static_cast<uint64_t>(key[r]) : seed; }
  RO_HD uint64_t philox_row(int64_t r) const {
    return source ? static_cast<uint64_t>(row[r]) : offset + static_cast<uint64_t>(r);
  }
};

inline NoiseRows dense_rows(int64_t num, int64_t seed, int64_t offset) {
  NoiseRows m;
  m.num = num;
  m.seed = static_cast<uint64_t>(seed);
  m.offset = static_cast<uint64_t>(offset);
  return m;
}

// tables: check_noise_rows' (source, key, row), kept alive by the caller while the kernel runs.
inline NoiseRows table_rows(const std::array<at::Tensor, 3>& tables) {
  NoiseRows m;
  m.source = tables[0].data_ptr<int64_t>();
  m.key = tables[1].data_ptr<int64_t>();
  m.row = tables[2].data_ptr<int64_t>();
  return m;
}

// Shape facts of a gaussian_noise call. Logical element e of a sample lies in channel (e / HW) % C;
// its position in the output row is e (contiguous) or hw*C + c (channels_last, hw = e % HW).
// B * num is the number of output rows (gaussian_noise_rows: B = rows, num = 1).
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
                               std::optional<at::ScalarType> out_dtype, bool channels_last,
                               int64_t out_rows = -1) {
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
  shape[0] = out_rows >= 0 ? out_rows : shape[0] * num;
  auto opts = x_in.options().dtype(ot);
  if (channels_last)
    opts = opts.memory_format(x_in.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d);
  a.out = at::empty(shape, opts);
  NoiseGeometry& g = a.geo;
  g.B = out_rows >= 0 ? out_rows : x_in.size(0);
  g.num = out_rows >= 0 ? 1 : num;
  g.D = x_in.size(0) ? x_in.numel() / x_in.size(0) : 0;
  g.C = x_in.dim() >= 2 ? x_in.size(1) : 1;
  g.HW = (x_in.dim() >= 2 && g.C > 0) ? g.D / g.C : 1;
  g.groups = (g.D + 3) / 4;
  g.channels_last = channels_last;
  a.mean = channel_param(mean, "mean", x_in, g.C);
  at::Tensor s = channel_param(std_, "std", x_in, g.C);
  if (s.defined()) a.istd = s.reciprocal();
  return a;
}

// gaussian_noise_rows' tables: int64 [R] each, on x's device; returns them contiguous (source, key, row).
inline std::array<at::Tensor, 3> check_noise_rows(const at::Tensor& x, const at::Tensor& source,
                                                  const at::Tensor& key, const at::Tensor& row) {
  const at::Tensor* t[3] = {&source, &key, &row};
  const char* names[3] = {"source", "key", "row"};
  std::array<at::Tensor, 3> out;
  for (int k = 0; k < 3; ++k) {
    TORCH_CHECK(t[k]->scalar_type() == at::kLong && t[k]->dim() == 1, names[k],
                " must be a 1-D int64 tensor [R] (one entry per output row), got ", t[k]->scalar_type(),
                " of shape ", t[k]->sizes());
    TORCH_CHECK(t[k]->size(0) == source.size(0), names[k], " must have as many rows as source (", source.size(0),
                "), got ", t[k]->size(0));
    TORCH_CHECK(t[k]->device() == x.device(), names[k], " must be on ", x.device(), " like x, got ",
                t[k]->device());
    out[k] = t[k]->contiguous();
  }
  TORCH_CHECK(x.dim() >= 1 && (x.size(0) > 0 || source.size(0) == 0),
              "x must hold at least one input when source has rows, got x of shape ", x.sizes());
  return out;
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

// count_votes_segments_: logits [R, C], segment int64 [R] (the count row of each logits row), counts [S, C].
inline void check_votes_segments(const at::Tensor& logits, const at::Tensor& segment, const at::Tensor& counts) {
  check_float(logits, "logits");
  TORCH_CHECK(counts.scalar_type() == at::kLong, "counts must be int64, got ", counts.scalar_type());
  TORCH_CHECK(logits.dim() == 2 && counts.dim() == 2, "logits must be [R, C] and counts [S, C], got ", logits.sizes(),
              " and ", counts.sizes());
  TORCH_CHECK(segment.scalar_type() == at::kLong && segment.dim() == 1 && segment.size(0) == logits.size(0),
              "segment must be a 1-D int64 tensor with one entry per logits row (", logits.size(0), "), got ",
              segment.scalar_type(), " of shape ", segment.sizes());
  TORCH_CHECK(logits.size(1) == counts.size(1), "logits has ", logits.size(1), " classes but counts has ",
              counts.size(1));
  TORCH_CHECK(at::has_internal_overlap(counts) != at::MemOverlap::Yes,
              "counts must not overlap itself (an expanded tensor): every (segment, class) needs its own element");
  TORCH_CHECK(logits.device() == counts.device() && segment.device() == counts.device(),
              "logits, segment and counts must be on one device, got ", logits.device(), ", ", segment.device(),
              " and ", counts.device());
  TORCH_CHECK(logits.size(1) > 0 || logits.size(0) == 0, "logits must have at least one class");
  TORCH_CHECK(counts.size(0) > 0 || logits.size(0) == 0, "counts must have at least one row when logits has rows");
}

}  // namespace robustops
