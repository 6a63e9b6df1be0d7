"""The native extension ``corda_fast._C`` (``csrc/``): batched damping search, ``W·C`` and decomposition.

The ops are registered with ``TORCH_LIBRARY`` as ``torch.ops.corda_fast.{damped_cholesky, weight_cov_product,
batched_decompose}``; fake (shape-only) implementations are registered here so they trace under
``torch.compile`` and pass ``torch.library.opcheck``. Whether :func:`corda_fast.decompose` uses them is decided
by :func:`decompose_backend` (``CORDA_FAST_NATIVE=auto|1|0``); the pure-torch path in ``decompose.py`` is the
reference they are tested against.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

NATIVE_ENV = "CORDA_FAST_NATIVE"

try:
    from .. import _C  # noqa: F401

    HAVE_NATIVE = True
    BUILD = _C.build_info()
    IMPORT_ERROR = None
except ImportError as exc:  # not built (no compiler, CORDA_FAST_SKIP_EXT=1, or an isolated build without torch)
    HAVE_NATIVE = False
    BUILD = None
    IMPORT_ERROR = exc


if HAVE_NATIVE:

    @torch.library.register_fake("corda_fast::damped_cholesky")
    def _damped_cholesky_fake(covs, probes, start, tol, max_iter):
        lam = torch.empty(covs.shape[0], dtype=torch.float64, device="cpu")
        return torch.empty_like(covs), torch.empty_like(covs), lam

    @torch.library.register_fake("corda_fast::weight_cov_product")
    def _weight_cov_product_fake(w, c):
        return w.new_empty(w.shape, dtype=c.dtype)

    @torch.library.register_fake("corda_fast::batched_decompose")
    def _batched_decompose_fake(w, cf, chol, scaling, rank, ipm, method):
        b, d_out, d_in = w.shape
        return w.new_empty(b, rank, d_in), w.new_empty(b, d_out, rank), w.new_empty(b, rank)


def status() -> str:
    """One line for ``python -m corda_fast env``."""
    if HAVE_NATIVE:
        return f"built ({BUILD})"
    return f"not built ({IMPORT_ERROR}); the pure-torch path is used"


def decompose_backend(device=None) -> str:
    """``"native"`` or ``"torch"`` for decompositions on ``device``, honouring ``CORDA_FAST_NATIVE``.

    ``auto`` (default): the extension for CUDA tensors when it is built with CUDA; on CPU the pure-torch path,
    which measured 1.4x faster than the native ops there (``benchmarks/bench_decompose.py``: its thread pool runs
    independent statistic groups concurrently, the native batch does not gain from its layer parallelism).
    ``1``: the extension on any device it was built for (raises otherwise); ``0``: never."""
    from . import BackendError

    wanted = os.environ.get(NATIVE_ENV, "auto").strip().lower() or "auto"
    if wanted not in ("auto", "1", "0"):
        raise BackendError(f"{NATIVE_ENV}={wanted!r}: expected auto, 1 or 0.")
    if wanted == "0":
        return "torch"
    is_cuda = device is not None and torch.device(device).type == "cuda"
    usable = HAVE_NATIVE and (not is_cuda or "cuda" in BUILD)
    if wanted == "1" and not usable:
        why = status() if not HAVE_NATIVE else f"it was built for {BUILD}, not CUDA"
        raise BackendError(f"{NATIVE_ENV}=1 but the native extension cannot run here: {why}. Build it with "
                           "`pip install --no-build-isolation -e .`.")
    if wanted == "auto":
        return "native" if usable and is_cuda else "torch"
    return "native" if usable else "torch"
