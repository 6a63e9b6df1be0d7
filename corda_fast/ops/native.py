"""The native extension ``corda_fast.ops._C`` (``csrc/``): C++ (CPU) and CUDA kernels of the decomposition ops.

The extension registers its kernels as ``torch.ops.corda_fast_native.{damped_cholesky, batched_decompose}``
(CPU, and CUDA when built with it). Here they get fake (shape-only) implementations, so they trace under
``torch.compile`` and pass ``torch.library.opcheck``, and, when built with CUDA, become the CUDA kernels of the
public ops ``corda_fast::damped_cholesky`` / ``corda_fast::batched_decompose`` (defined in ``linalg.py`` with the
pure-torch reference as default). On CPU the reference is the default (it measured 1.4x faster there:
``benchmarks/bench_decompose.py``); ``CORDA_FAST_BACKEND=native`` forces the C++ kernels (``registry.py``).
"""

from __future__ import annotations

import torch

from .linalg import batched_decompose_op, damped_cholesky_op

try:
    from ._C import build_info  # loading the extension registers torch.ops.corda_fast_native.*

    HAVE_NATIVE = True
    BUILD = build_info()
    IMPORT_ERROR = None
except ImportError as exc:  # not built (no compiler, CORDA_FAST_SKIP_EXT=1, or an isolated build without torch)
    HAVE_NATIVE = False
    BUILD = None
    IMPORT_ERROR = exc


if HAVE_NATIVE:

    @torch.library.register_fake("corda_fast_native::damped_cholesky")
    def _damped_cholesky_fake(covs, probes, start, tol, max_iter):
        lam = torch.empty(covs.shape[0], dtype=torch.float64, device="cpu")
        return torch.empty_like(covs), torch.empty_like(covs), lam

    @torch.library.register_fake("corda_fast_native::batched_decompose")
    def _batched_decompose_fake(w, cf, chol, scaling, rank, ipm, method):
        b, d_out, d_in = w.shape
        return w.new_empty(b, rank, d_in), w.new_empty(b, d_out, rank), w.new_empty(b, rank)

    if "cuda" in BUILD:
        damped_cholesky_op.register_kernel("cuda")(
            lambda covs, probes, start, tol, max_iter: torch.ops.corda_fast_native.damped_cholesky(
                covs, probes, start, tol, max_iter))
        batched_decompose_op.register_kernel("cuda")(
            lambda w, cf, chol, scaling, rank, ipm, method: torch.ops.corda_fast_native.batched_decompose(
                w, cf, chol, scaling, rank, ipm, method))


def status() -> str:
    """One line for ``python -m corda_fast env``."""
    if HAVE_NATIVE:
        return f"built ({BUILD})"
    return f"not built ({IMPORT_ERROR}); the pure-torch path is used"


def kernels():
    """The raw native kernels (``torch.ops.corda_fast_native``); only when :data:`HAVE_NATIVE`."""
    return torch.ops.corda_fast_native
