// Python module of the extension: the kernels are registered with TORCH_LIBRARY (torch.ops.corda_fast_native.*);
// this only reports how the extension was built.
#include <torch/extension.h>

#include <string>

namespace {

std::string build_info() {
#ifdef CORDA_FAST_WITH_CUDA
  return "cpu+cuda";
#else
  return "cpu";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "corda_fast native ops (damped_cholesky, batched_decompose)";
  m.def("build_info", &build_info, "'cpu' or 'cpu+cuda': the devices the ops were compiled for");
}
