// Declarations shared by the CPU (decompose.cpp) and CUDA (cuda/*.cpp, cuda/*.cu) sources of corda_fast._C.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace corda {

// covs (n, d, d) float32/float64, probes (d, p) -> (C_f, L, lam (n,) float64 on CPU; -1: degenerate statistic,
// NaN: no convergence within max_iter).
std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_cholesky(const at::Tensor& covs, const at::Tensor& probes,
                                                              double start, double tol, int64_t max_iter);

// (L L^T)^-1 b from a lower Cholesky factor L (either layout) by two triangular solves, without copying L.
at::Tensor solve_through_factor(const at::Tensor& b, const at::Tensor& chol);

// One layer: W (d_out, d_in), C_f and its Cholesky factor L (d_in, d_in), all one dtype -> (A (r, d_in),
// B (d_out, r), S_r (r,)) in that dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> decompose_one(const at::Tensor& w, const at::Tensor& cf,
                                                             const at::Tensor& chol, int64_t rank, bool ipm,
                                                             double scaling, const std::string& method);

// Checks batched_decompose's arguments and allocates its outputs: (A (n, r, d_in), B (n, d_out, r), S (n, r)) in
// W's dtype and device, and the per-layer scalings as a contiguous float64 CPU tensor.
struct DecomposeBatch {
  at::Tensor a, bm, s, scaling_host;
};
DecomposeBatch prepare_decompose(const at::Tensor& w, const at::Tensor& cf, const at::Tensor& chol,
                                 const at::Tensor& scaling, int64_t rank, const std::string& method);

// A batch of same-shaped layers (W (n, d_out, d_in), C_f, L (n, d_in, d_in), scaling (n,)) -> (A (n, r, d_in),
// B (n, d_out, r), S (n, r)) in W's dtype: layers in parallel on CPU threads, or on a pool of CUDA streams.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_decompose_cpu(const at::Tensor& w, const at::Tensor& cf,
                                                                     const at::Tensor& chol, const at::Tensor& scaling,
                                                                     int64_t rank, bool ipm, const std::string& method);
#ifdef CORDA_FAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_decompose_cuda(const at::Tensor& w, const at::Tensor& cf,
                                                                      const at::Tensor& chol, const at::Tensor& scaling,
                                                                      int64_t rank, bool ipm, const std::string& method);
#endif

}  // namespace corda
