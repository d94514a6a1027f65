// Argument handling shared by the CPU and CUDA kernels of the PGD family.
#pragma once
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
