// Python module of the extension, corda_fast.ops._C: plain functions, no operator namespace of its own. The one
// public op of each kind (corda_fast::damped_cholesky, corda_fast::batched_decompose) is defined in Python with its
// schema, fake and pure-torch reference (corda_fast/ops/linalg.py); corda_fast/ops/backends/native.py registers
// these functions as that op's "native" kernels (CPU, and CUDA when built with it).
#include <torch/extension.h>

#include <string>

#include "corda_ops.h"

namespace {

std::string build_info() {
#ifdef CORDA_FAST_WITH_CUDA
  return "cpu+cuda";
#else
  return "cpu";
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_decompose(const at::Tensor& w, const at::Tensor& cf,
                                                                 const at::Tensor& chol, const at::Tensor& scaling,
                                                                 int64_t rank, bool ipm, const std::string& method) {
#ifdef CORDA_FAST_WITH_CUDA
  if (w.is_cuda()) {
    return corda::batched_decompose_cuda(w, cf, chol, scaling, rank, ipm, method);
  }
#endif
  TORCH_CHECK(w.device().is_cpu(), "corda_fast: batched_decompose was not built for ", w.device());
  return corda::batched_decompose_cpu(w, cf, chol, scaling, rank, ipm, method);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "corda_fast native kernels (damped_cholesky, batched_decompose)";
  m.def("build_info", &build_info, "'cpu' or 'cpu+cuda': the devices the kernels were compiled for");
  // the GIL is released: decomposition jobs may run on Python threads
  m.def("damped_cholesky", &corda::damped_cholesky, "(C_f, L, lambda) per statistic of covs (n, d, d)",
        py::arg("covs"), py::arg("probes"), py::arg("start"), py::arg("tol"), py::arg("max_iter"),
        py::call_guard<py::gil_scoped_release>());
  m.def("batched_decompose", &batched_decompose, "(A, B, S) of a batch of same-shaped layers", py::arg("w"),
        py::arg("cf"), py::arg("chol"), py::arg("scaling"), py::arg("rank"), py::arg("ipm"), py::arg("method"),
        py::call_guard<py::gil_scoped_release>());
}
