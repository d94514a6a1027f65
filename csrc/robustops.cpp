// Every robustops op schema, declared once. Device kernels live in cpu/<family>.cpp and
// cuda/<family>.cu and register with TORCH_LIBRARY_IMPL; fake kernels are in robustops/ops.py.
//
// Random ops take their Philox offset as a host int, or (the *_dev_offset ops) as a one-element
// int64 tensor on the data's device that the op reads there and advances past what it drew: a CUDA
// graph that captures the latter draws fresh numbers at every replay, the stream eager calls draw.
//
// Per-sample parameters (eps, alpha, step, noise, sigma) are Tensors: a 0-dim CPU tensor carries one
// value for the whole batch and is read on the host (no device sync), a Tensor[B] on the data's
// device carries one value per sample. robustops/ops.py turns Python floats into the former.
#include <torch/library.h>

#include <sstream>
#include <string>

#include <torch/version.h>

namespace {

// Reported by robustops.build_info(): what this binary was really compiled with.
std::string build_info() {
  std::ostringstream s;
  s << "{\"cuda\": " <<
#ifdef ROBUSTOPS_WITH_CUDA
      "true"
#else
      "false"
#endif
    << ", \"cuda_archs\": \"" <<
#ifdef ROBUSTOPS_CUDA_ARCHS
      ROBUSTOPS_CUDA_ARCHS
#else
      ""
#endif
    << "\", \"cuda_version\": \"" <<
#ifdef ROBUSTOPS_CUDA_VERSION
      ROBUSTOPS_CUDA_VERSION
#else
      ""
#endif
    << "\", \"torch_version\": \"" << TORCH_VERSION << "\", \"compiler\": \"" <<
#if defined(__clang__)
      "clang " __clang_version__
#elif defined(__GNUC__)
      "gcc " __VERSION__
#else
      "unknown"
#endif
    << "\", \"cpu_capability\": \"" <<
#ifdef ROBUSTOPS_CPU_CAPABILITY
      ROBUSTOPS_CPU_CAPABILITY
#else
      "baseline"
#endif
    << "\", \"openmp\": " <<
#ifdef _OPENMP
      "true"
#else
      "false"
#endif
    << "}";
  return s.str();
}

}  // namespace

TORCH_LIBRARY(robustops, m) {
  m.def("build_info() -> str", &build_info);

  // PGD family (cpu/pgd.cpp, cuda/pgd.cu)
  m.def(
      "pgd_step_(Tensor(a!) x_adv, Tensor x, Tensor grad, Tensor eps, Tensor alpha, str norm, "
      "float lo, float hi) -> ()");
  m.def(
      "random_init(Tensor x, Tensor eps, str norm, float lo, float hi, int seed, int offset, str radius=\"ball\") "
      "-> Tensor");
  // The same draw with the offset in a device tensor that the op advances (CUDA-graph safe).
  m.def(
      "random_init_dev_offset(Tensor x, Tensor eps, str norm, float lo, float hi, int seed, Tensor(a!) offset, "
      "str radius=\"ball\") -> Tensor");
  m.def(
      "recycle_step_(Tensor(a!) delta, Tensor x, Tensor grad, Tensor eps, Tensor step, float lo, "
      "float hi) -> ()");
  // DALE's hybrid Langevin step (Robey et al. 2021): form "gaussian" or "laplace"; noise is the
  // per-sample scale c of the Philox noise keyed by (seed, offset + sample index).
  m.def(
      "langevin_step_(Tensor(a!) x_adv, Tensor x, Tensor grad, Tensor eps, Tensor alpha, Tensor noise, str form, "
      "float lo, float hi, int seed, int offset) -> ()");
  // The same step with the offset in a device tensor that the op advances by B (CUDA-graph safe).
  m.def(
      "langevin_step_dev_offset_(Tensor(a!) x_adv, Tensor x, Tensor grad, Tensor eps, Tensor alpha, Tensor noise, "
      "str form, float lo, float hi, int seed, Tensor(b!) offset) -> ()");

  // Smoothing family (cpu/smoothing.cpp, cuda/smoothing.cu)
  m.def(
      "gaussian_noise(Tensor x, int num, float sigma, int seed, int offset, Tensor? mean, Tensor? std, "
      "ScalarType? out_dtype, bool channels_last) -> Tensor");
  m.def(
      "gaussian_noise_dev_offset(Tensor x, int num, float sigma, int seed, Tensor(a!) offset, Tensor? mean, "
      "Tensor? std, ScalarType? out_dtype, bool channels_last) -> Tensor");
  m.def("count_votes_(Tensor logits, Tensor(a!) counts) -> ()");
  // The many-input forms of one smoothing pass: noisy row r is x[source[r]] + sigma*N(Philox key[r],
  // noisy row row[r]) (gaussian_noise's numbers for that key and row), and row r's vote goes to
  // counts[segment[r]]: one launch each for a forward batch cut from many inputs and phases.
  m.def(
      "gaussian_noise_rows(Tensor x, Tensor source, Tensor key, Tensor row, float sigma, Tensor? mean, "
      "Tensor? std, ScalarType? out_dtype, bool channels_last) -> Tensor");
  m.def("count_votes_segments_(Tensor logits, Tensor segment, Tensor(a!) counts) -> ()");
}
