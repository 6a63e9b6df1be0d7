// corda_fast native ops: damping search, weight-covariance product and batched decomposition.
//
// Device-generic ATen code: on CPU, layers of a batch run in parallel (at::parallel_for, one single-threaded
// LAPACK call per thread, which is 1.4x the throughput of one multi-threaded call at a time at these sizes);
// on CUDA the same per-layer code runs on a pool of streams (csrc/cuda/decompose_cuda.cpp).
//
// Semantics are those of the pure-torch path in corda_fast/decompose.py, which is the test oracle:
//   damping    C_f = C + lam * mean(diag C) * I, lam = start * 2^k, the first k whose float32 test passes:
//              a 16-probe Cholesky estimate of ||C_f C_f^-1 - I||_F decides when it is clear-cut (outside
//              [tol/8, 8 tol)); otherwise PEFT's explicit LU residual decides.
//   factors    M = W C_f; kept r singular triplets (IPM: largest, KPM: smallest) from the float64 Gram matrix
//              of M on its smaller side ("gram", SVD fallback when a kept sigma < 1e-8 sigma_max) or a thin
//              SVD ("svd"); V^ = C_f^-1 V_r by Cholesky solves; A = diag(sqrt(S_r/s)) V^T, B = U_r diag(sqrt(S_r/s)).
#include "corda_ops.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace corda {

// (L L^T)^-1 b from the lower factor L by two triangular solves: at::cholesky_solve's result without the copy of L
// it makes on every call (one d x d per matrix of the batch). L may be either layout; b is (..., d, k).
at::Tensor solve_through_factor(const at::Tensor& b, const at::Tensor& chol) {
  auto y = at::linalg_solve_triangular(chol, b, /*upper=*/false);
  return at::linalg_solve_triangular(chol.mT(), y, /*upper=*/true);
}

namespace {

void check_square_batch(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 3 && t.size(1) == t.size(2), "corda_fast: ", what, " must be (batch, d, d), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "corda_fast: ", what,
              " must be float32 or float64, got ", t.scalar_type());
}

// Float32 residual estimate ||C_f C_f^-1 - I||_F from probes through the Cholesky factor; +inf where the
// factorisation failed. cf: (n, d, d) float32, probes: (d, p). Returns (n,) float32.
at::Tensor probe_residual(const at::Tensor& cf, const at::Tensor& probes) {
  auto res = at::linalg_cholesky_ex(cf);
  const auto& chol = std::get<0>(res);
  const auto& info = std::get<1>(res);
  auto p = probes.unsqueeze(0).expand({cf.size(0), probes.size(0), probes.size(1)});
  auto err = (at::matmul(cf, solve_through_factor(p, chol)) - p).flatten(1).norm(2, {1}) /
             std::sqrt(static_cast<double>(probes.size(1)));
  return at::where(info == 0, err, at::full_like(err, std::numeric_limits<float>::infinity()));
}

// PEFT's test: ||C_f inv(C_f) - I||_F with an LU inverse, +inf where singular. cf: (n, d, d) float32.
at::Tensor lu_residual(const at::Tensor& cf) {
  auto res = at::linalg_inv_ex(cf);
  const auto& inv = std::get<0>(res);
  const auto& info = std::get<1>(res);
  auto eye = at::eye(cf.size(1), cf.options());
  auto err = (at::matmul(cf, inv) - eye).flatten(1).norm(2, {1});
  return at::where(info == 0, err, at::full_like(err, std::numeric_limits<float>::infinity()));
}

// lu_residual, robust to a LAPACK failure: NaN for a matrix whose LU fails, and the caller then decides by the
// probe estimate. (A batched getrf/getrs was seen failing here — MKL "Parameter 6 was incorrect on entry to
// SLASWP", then lu_solve rejecting the pivots — on finite, well-conditioned matrices after other LAPACK calls in
// the same process, while the same call from Python and one matrix at a time succeeded; hence lu_residual works
// one matrix at a time.)
at::Tensor lu_residual_safe(const at::Tensor& cf) {
  std::vector<at::Tensor> parts;
  for (int64_t i = 0; i < cf.size(0); ++i) {
    try {
      parts.push_back(lu_residual(cf.narrow(0, i, 1)));
    } catch (const c10::Error&) {
      parts.push_back(at::full({1}, std::numeric_limits<float>::quiet_NaN(), cf.options()));
    }
  }
  return at::cat(parts);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_cholesky(const at::Tensor& covs, const at::Tensor& probes,
                                                              double start, double tol, int64_t max_iter) {
  check_square_batch(covs, "covs");
  TORCH_CHECK(probes.dim() == 2 && probes.size(0) == covs.size(1), "corda_fast: probes must be (d, p) with d = ",
              covs.size(1), ", got ", probes.sizes());
  TORCH_CHECK(start > 0 && tol > 0 && max_iter >= 1, "corda_fast: damped_cholesky needs start > 0, tol > 0, "
              "max_iter >= 1");
  const int64_t n = covs.size(0), d = covs.size(1);
  auto c32 = covs.to(at::kFloat);
  auto md32 = c32.diagonal(0, 1, 2).mean(-1);
  auto pr = probes.to(c32.options());
  // one sync: which statistics are usable at all (mean diagonal finite and > 0)
  auto md_host = md32.to(at::kCPU, at::kDouble).contiguous();
  const double* mdp = md_host.data_ptr<double>();
  std::vector<double> lam(n, std::numeric_limits<double>::quiet_NaN());
  std::vector<int64_t> pending;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isfinite(mdp[i]) && mdp[i] > 0) {
      pending.push_back(i);
    } else {
      lam[i] = -1.0;  // degenerate statistic: reported to the caller, which names the layers
    }
  }
  // Rounds of trials: k = 0 first (nearly always accepted), then blocks of 4, 8, ... doublings at once, so a
  // batch costs one host sync per round instead of one per trial and per matrix.
  int64_t k0 = 0;
  int64_t width = 1;
  while (!pending.empty() && k0 < max_iter) {
    const int64_t w = std::min(width, max_iter - k0);
    const int64_t m = static_cast<int64_t>(pending.size());
    auto idx = at::tensor(pending, at::TensorOptions().dtype(at::kLong)).to(covs.device());
    std::vector<double> lams(w);
    for (int64_t j = 0; j < w; ++j) lams[j] = start * std::ldexp(1.0, static_cast<int>(k0 + j));
    auto lam_t = at::tensor(lams, at::TensorOptions().dtype(at::kDouble)).to(c32.device()).to(at::kFloat);
    auto sel = c32.index_select(0, idx);                                                   // (m, d, d)
    auto shift = (md32.index_select(0, idx).unsqueeze(1) * lam_t.unsqueeze(0));            // (m, w)
    // w copies of each pending statistic, damped in place on the diagonal (no (m, w, d, d) identity temporaries)
    auto cf = sel.unsqueeze(1).expand({m, w, d, d}).contiguous().reshape({m * w, d, d});
    cf.diagonal(0, 1, 2).add_(shift.reshape({m * w, 1}));
    auto err = probe_residual(cf, pr);
    auto err_host = err.to(at::kCPU).contiguous();  // sync of this round
    const float* e = err_host.data_ptr<float>();
    // ambiguous trials (estimate within 8x of tol either way): PEFT's LU residual decides
    std::vector<int64_t> amb;
    for (int64_t t = 0; t < m * w; ++t) {
      if (e[t] >= tol / 8 && e[t] < 8 * tol) amb.push_back(t);
    }
    std::vector<float> decided(e, e + m * w);
    if (!amb.empty()) {
      auto aidx = at::tensor(amb, at::TensorOptions().dtype(at::kLong)).to(cf.device());
      auto lu = lu_residual_safe(cf.index_select(0, aidx)).to(at::kCPU).contiguous();
      const float* l = lu.data_ptr<float>();
      for (size_t a = 0; a < amb.size(); ++a) {
        if (!std::isnan(l[a])) decided[amb[a]] = l[a];  // NaN: LU failed, the estimate decides
      }
    }
    std::vector<int64_t> still;
    for (int64_t q = 0; q < m; ++q) {
      bool done = false;
      for (int64_t j = 0; j < w && !done; ++j) {
        if (decided[q * w + j] < tol) {
          lam[pending[q]] = lams[j];
          done = true;
        }
      }
      if (!done) still.push_back(pending[q]);
    }
    pending.swap(still);
    k0 += w;
    width = std::max<int64_t>(4, 2 * width);
  }
  // pending ones keep NaN (no convergence within max_iter): the caller raises naming the layers
  auto lam_out = at::tensor(lam, at::TensorOptions().dtype(at::kDouble));
  // C_f and its Cholesky factor in the statistics' own dtype (float64 statistics keep their digits)
  auto lam_dev = at::nan_to_num(lam_out, 0.0).clamp_min(0.0).to(covs.device()).to(covs.scalar_type());
  auto md = covs.diagonal(0, 1, 2).mean(-1);
  auto cf = covs.clone();
  cf.diagonal(0, 1, 2).add_((md * lam_dev).unsqueeze(-1));
  auto chol = std::get<0>(at::linalg_cholesky_ex(cf)).contiguous();  // LAPACK returns column-major batches
  return {cf, chol, lam_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decompose_one(const at::Tensor& w, const at::Tensor& cf,
                                                             const at::Tensor& chol, int64_t rank, bool ipm,
                                                             double scaling, const std::string& method) {
  const auto out_dtype = w.scalar_type();
  const bool gram = method == "gram";
  at::Tensor m = gram ? at::matmul(w.to(at::kDouble), cf.to(at::kDouble)) : at::matmul(w, cf);
  const int64_t d_out = m.size(0), d_in = m.size(1);
  at::Tensor u_r, v_r, s_r;
  if (gram) {
    const bool small_out = d_out <= d_in;
    auto g = small_out ? at::matmul(m, m.mT()) : at::matmul(m.mT(), m);
    auto eh = at::linalg_eigh(g);  // ascending
    const auto& evals = std::get<0>(eh);
    const auto& evecs = std::get<1>(eh);
    const int64_t nn = evals.size(0);
    // kept indices in descending order of sigma, like an SVD
    auto desc = at::arange(nn - 1, -1, -1, at::TensorOptions().dtype(at::kLong).device(evals.device()));
    auto order = ipm ? desc.slice(0, 0, rank) : desc.slice(0, nn - rank, nn);
    auto s = evals.index_select(0, order).clamp_min(0).sqrt();
    const double s_max = std::sqrt(std::max(0.0, evals[nn - 1].item<double>()));
    if (s.min().item<double>() > 1e-8 * s_max) {
      auto vecs = evecs.index_select(1, order);
      if (small_out) {
        u_r = vecs;
        v_r = at::matmul(m.mT(), vecs) / s;
      } else {
        v_r = vecs;
        u_r = at::matmul(m, vecs) / s;
      }
      s_r = s;
    }
  }
  if (!u_r.defined()) {  // "svd", or kept sigma too small for the squared (Gram) route
    auto sv = at::linalg_svd(m.to(out_dtype), /*full_matrices=*/false);
    const auto& u = std::get<0>(sv);
    const auto& s = std::get<1>(sv);
    const auto& vh = std::get<2>(sv);
    const int64_t nn = s.size(0);
    const int64_t lo = ipm ? 0 : nn - rank, hi = ipm ? rank : nn;
    u_r = u.slice(1, lo, hi);
    s_r = s.slice(0, lo, hi);
    v_r = vh.slice(0, lo, hi).mT();
  }
  auto v_hat = solve_through_factor(v_r.to(chol.scalar_type()), chol);  // (d_in, r) = C_f^-1 V_r
  auto root = (s_r / scaling).sqrt();
  auto a = (v_hat * root.to(v_hat.scalar_type())).mT().contiguous();
  auto bm = (u_r * root.to(u_r.scalar_type())).contiguous();
  return {a.to(out_dtype), bm.to(out_dtype), s_r.to(out_dtype)};
}

DecomposeBatch prepare_decompose(const at::Tensor& w, const at::Tensor& cf, const at::Tensor& chol,
                                 const at::Tensor& scaling, int64_t rank, const std::string& method) {
  TORCH_CHECK(w.dim() == 3, "corda_fast: weights must be (batch, d_out, d_in), got ", w.sizes());
  check_square_batch(cf, "damped covariances");
  check_square_batch(chol, "Cholesky factors");
  TORCH_CHECK(cf.sizes() == chol.sizes() && w.size(0) == cf.size(0) && w.size(2) == cf.size(1),
              "corda_fast: batched_decompose shapes do not fit: W ", w.sizes(), ", C_f ", cf.sizes(), ", L ",
              chol.sizes());
  TORCH_CHECK(w.scalar_type() == cf.scalar_type() && cf.scalar_type() == chol.scalar_type(),
              "corda_fast: W, C_f and L must share one dtype (float32 or float64)");
  TORCH_CHECK(scaling.dim() == 1 && scaling.size(0) == w.size(0), "corda_fast: scaling must be (batch,)");
  TORCH_CHECK(rank >= 1 && rank <= std::min(w.size(1), w.size(2)), "corda_fast: rank ", rank,
              " is outside [1, min(d_out, d_in) = ", std::min(w.size(1), w.size(2)), "]");
  TORCH_CHECK(method == "gram" || method == "svd", "corda_fast: method must be 'gram' or 'svd', got '", method,
              "'");
  const int64_t b = w.size(0), d_out = w.size(1), d_in = w.size(2);
  return {at::empty({b, rank, d_in}, w.options()), at::empty({b, d_out, rank}, w.options()),
          at::empty({b, rank}, w.options()), scaling.to(at::kCPU, at::kDouble).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_decompose_cpu(const at::Tensor& w, const at::Tensor& cf,
                                                                     const at::Tensor& chol, const at::Tensor& scaling,
                                                                     int64_t rank, bool ipm, const std::string& meth) {
  auto out = prepare_decompose(w, cf, chol, scaling, rank, meth);
  auto &a = out.a, &bm = out.bm, &s = out.s;
  const double* scp = out.scaling_host.data_ptr<double>();
  const int64_t b = w.size(0);
  // One layer per thread; inside a parallel region ATen (and the BLAS/LAPACK under it) run single-threaded.
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      auto res = decompose_one(w.select(0, i), cf.select(0, i), chol.select(0, i), rank, ipm, scp[i], meth);
      a.select(0, i).copy_(std::get<0>(res));
      bm.select(0, i).copy_(std::get<1>(res));
      s.select(0, i).copy_(std::get<2>(res));
    }
  });
  return {a, bm, s};
}

}  // namespace corda
