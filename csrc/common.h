// Helpers shared by the CPU and CUDA kernels: argument checks, per-sample parameters,
// and the memory-index -> logical-index map that keeps random draws layout independent.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>

#include "philox.h"

// float32, float16 and bfloat16 only: double is rejected by check_float, so it is not compiled.
#define RO_DISPATCH_FLOATING(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace robustops {

constexpr int kMaxDims = 8;

// Maps the position of an element in memory to its index in the logical (row-major) order
// of the tensor's sizes. ndim == 0 means the two orders coincide (a contiguous tensor).
struct LogicalIndex {
  int ndim = 0;
  int64_t msize[kMaxDims];    // sizes in memory order, outermost first
  int64_t lstride[kMaxDims];  // the row-major stride of the same dimension

  RO_HD int64_t operator()(int64_t m) const {
    if (ndim == 0) return m;
    int64_t l = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      const int64_t q = m / msize[d];
      l += (m - q * msize[d]) * lstride[d];
      m = q;
    }
    return l;
  }
};

// t must be dense and non-overlapping (checked by the callers).
inline LogicalIndex make_logical_index(const at::Tensor& t) {
  LogicalIndex li;
  const int64_t nd = t.dim();
  if (t.is_contiguous() || nd <= 1) return li;
  TORCH_CHECK(nd <= kMaxDims, "robustops: at most ", kMaxDims, " dimensions are supported, got ", nd);
  std::array<int64_t, kMaxDims> perm{};
  std::iota(perm.begin(), perm.begin() + nd, 0);
  // Memory order: larger strides first; among equal strides (size-1 dims) keep logical order.
  std::stable_sort(perm.begin(), perm.begin() + nd, [&](int64_t a, int64_t b) {
    return t.stride(a) > t.stride(b);
  });
  std::array<int64_t, kMaxDims> rowmajor{};
  int64_t s = 1;
  for (int64_t d = nd - 1; d >= 0; --d) {
    rowmajor[d] = s;
    s *= t.size(d);
  }
  li.ndim = static_cast<int>(nd);
  for (int64_t i = 0; i < nd; ++i) {
    li.msize[i] = t.size(perm[i]);
    li.lstride[i] = rowmajor[perm[i]];
  }
  return li;
}

// A per-sample float parameter: either one value for the whole batch (a 0-dim CPU tensor,
// read on the host, so no device sync) or a Tensor[B] on the data's device (stride 0 for a
// 0-dim device tensor). `holder` keeps a converted copy alive for the kernel's duration.
struct SampleParam {
  const float* ptr = nullptr;
  int64_t stride = 0;
  float value = 0.f;
  RO_HD float get(int64_t b) const { return ptr ? ptr[b * stride] : value; }
};

inline SampleParam make_sample_param(const at::Tensor& p, const char* name, const at::Tensor& x,
                                     at::Tensor& holder) {
  SampleParam sp;
  const int64_t B = x.size(0);
  if (p.dim() == 0 && p.device().is_cpu()) {
    sp.value = static_cast<float>(p.item<double>());
    return sp;
  }
  TORCH_CHECK(p.device() == x.device(), name, " must be a float, a 0-dim CPU tensor or a Tensor[B] on ",
              x.device(), ", got a tensor on ", p.device());
  TORCH_CHECK(p.dim() == 0 || (p.dim() == 1 && p.size(0) == B), name,
              " must be a float or a Tensor[B] with B = ", B, ", got shape ", p.sizes());
  holder = p.to(at::kFloat).contiguous();
  sp.ptr = holder.data_ptr<float>();
  sp.stride = p.dim() == 0 ? 0 : 1;
  return sp;
}

// Batch-major and dense: sample b occupies memory [b*D, (b+1)*D). True for contiguous and
// channels_last tensors alike, which is what lets every kernel work on flat memory.
inline void check_batch_major(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 1, name, " must have a leading batch dimension, got a 0-dim tensor");
  TORCH_CHECK(t.is_non_overlapping_and_dense(), name,
              " must be dense (contiguous or channels_last), got strides ", t.strides());
  const int64_t B = t.size(0);
  TORCH_CHECK(B <= 1 || t.stride(0) * B == t.numel(), name,
              " must have the batch as its outermost memory dimension, got sizes ", t.sizes(),
              " and strides ", t.strides());
}

// Same sizes and dtype as ref; the memory layout is made to match ref (a copy only if it differs).
inline at::Tensor like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* refname) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have the same shape as ", refname, ", got ", t.sizes(),
              " and ", ref.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the same dtype as ", refname, ", got ",
              t.scalar_type(), " and ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", refname, ", got ", t.device(),
              " and ", ref.device());
  if (t.strides() == ref.strides()) return t;
  return at::empty_like(ref).copy_(t);
}

inline void check_float(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", st);
}

inline void check_offset(int64_t offset) { TORCH_CHECK(offset >= 0, "offset must be >= 0, got ", offset); }

// The offset of a device-offset op: a one-element int64 tensor on the data's device, which the op
// reads on the device and advances in place (so a CUDA graph replays fresh draws).
inline void check_offset_tensor(const at::Tensor& offset, const at::Tensor& x) {
  TORCH_CHECK(offset.scalar_type() == at::kLong && offset.numel() == 1,
              "offset must be a one-element int64 tensor, got ", offset.scalar_type(), " of shape ", offset.sizes());
  TORCH_CHECK(offset.device() == x.device(), "offset must be on ", x.device(), " like x, got ", offset.device());
}

// [lo, hi] as float bounds rounded inward (the smallest float >= lo, the largest <= hi), so that a
// float result clamped to them lies in the double interval the caller gave; an interval too narrow
// to hold a float (lo == hi = 0.3) gets its nearest float at both ends.
struct Bounds {
  float lo, hi;
};
inline Bounds float_bounds(double lo, double hi) {
  float l = static_cast<float>(lo), h = static_cast<float>(hi);
  if (static_cast<double>(l) < lo) l = std::nextafter(l, std::numeric_limits<float>::infinity());
  if (static_cast<double>(h) > hi) h = std::nextafter(h, -std::numeric_limits<float>::infinity());
  if (l > h) l = h = static_cast<float>(lo);
  return {l, h};
}

enum class Norm { Linf, L2 };
inline Norm parse_norm(c10::string_view s) {
  if (s == "linf") return Norm::Linf;
  if (s == "l2") return Norm::L2;
  TORCH_CHECK(false, "norm must be \"linf\" or \"l2\", got \"", std::string(s), "\"");
}

// NaN-propagating clamp and sign, matching torch.clamp and torch.sign: a NaN gradient
// poisons only the element (L-inf) or the sample (L2) it belongs to.
RO_HD float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }
RO_HD float signf(float g) { return g > 0.f ? 1.f : (g < 0.f ? -1.f : g); }

// ROBUSTOPS_CPU_SCALAR=1 (read at every call; tests only): the CPU kernels skip their vector loops
// and send every element through the scalar formulas that the CUDA kernels use, so the tests can
// check that the vector loops compute the same thing.
// Read once per op call (a getenv per sample would cost more than the work); the kernels' worker
// threads read the value set before their parallel region.
inline bool& cpu_vector_loops() {
  static bool on = true;
  return on;
}
inline void read_cpu_scalar_switch() {
  const char* v = std::getenv("ROBUSTOPS_CPU_SCALAR");
  cpu_vector_loops() = !(v != nullptr && v[0] == '1');
}

// A tiny floor for the L2 normalisations (torch.finfo(float32).tiny).
constexpr float kTiny = 1.17549435e-38f;

}  // namespace robustops
