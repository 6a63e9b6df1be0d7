"""The native extension ``corda_fast.ops._C`` (``csrc/``): C++ (CPU) and CUDA kernels of the decomposition ops.

The extension exposes plain functions (no operator namespace of its own); this module registers them as the
``"native"`` kernels of the ops ``corda_fast::damped_cholesky`` and ``corda_fast::batched_decompose``, whose schema,
fake and pure-torch reference live in ``linalg.py``. On CUDA (an extension built with CUDA) they are the automatic
choice; on CPU the reference stays the default (it measured 1.4x faster there: ``benchmarks/bench_decompose.py``)
and ``CORDA_FAST_BACKEND=native`` forces them. Nothing calls this module directly.
"""

from __future__ import annotations

from .. import linalg, registry  # noqa: F401  (linalg defines the ops registered here)

try:
    from .._C import batched_decompose, build_info, damped_cholesky

    HAVE_NATIVE = True
    BUILD = build_info()
    IMPORT_ERROR = None
except ImportError as exc:  # not built (no compiler, CORDA_FAST_SKIP_EXT=1, or an isolated build without torch)
    HAVE_NATIVE = False
    BUILD = None
    IMPORT_ERROR = exc


def status() -> str:
    """One line: how the extension was built, or why it is missing."""
    if HAVE_NATIVE:
        return f"built ({BUILD})"
    return f"not built ({IMPORT_ERROR}); the pure-torch path is used"


def _register() -> None:
    ops = ("damped_cholesky", "batched_decompose")
    if not HAVE_NATIVE:
        for op in ops:
            registry.unavailable(op, "native", status() + ". Build it with `pip install --no-build-isolation -e .`")
        return
    cuda = "cuda" in BUILD
    devices = ("cpu", "cuda") if cuda else ("cpu",)
    auto = ("cuda",) if cuda else ()
    registry.register("damped_cholesky", "native", damped_cholesky, devices, auto=auto)
    registry.register("batched_decompose", "native", batched_decompose, devices, auto=auto)


_register()
