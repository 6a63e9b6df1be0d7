"""Numeric ops, one schema each, and the one place where a backend is chosen.

Every op has a pure-torch reference (the CPU path and the test oracle). Compiled backends (Triton, the C++/CUDA
extension) register themselves here when they exist; ``CORDA_FAST_BACKEND`` forces one
(``auto`` | ``torch`` | a compiled backend's name), and forcing one that cannot run raises.
"""

from __future__ import annotations

import os

from .covariance import sample_scales, symmetrize, triangle_blocks, xtx_accumulate_torch

_AVAILABLE = {"torch": True}
BACKEND_ENV = "CORDA_FAST_BACKEND"


class BackendError(RuntimeError):
    """A forced backend that is unknown or cannot run here."""


def active_backend(device=None) -> str:
    """Name of the backend the ops use on ``device``, honouring ``CORDA_FAST_BACKEND``."""
    wanted = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if wanted == "auto":
        return "torch"
    if wanted not in _AVAILABLE:
        raise BackendError(
            f"{BACKEND_ENV}={wanted!r} is not a backend of this build; available: {sorted(_AVAILABLE)} (or 'auto')."
        )
    return wanted


def available_backends() -> dict:
    return dict(_AVAILABLE)


def xtx_accumulate(acc, x, row_scale):
    """``acc += (diag(row_scale)·X)ᵀ (diag(row_scale)·X)`` in place, on the block upper triangle only.

    Args:
        acc: ``(d, d)`` float32/float64 accumulator, updated in place; read it through :func:`symmetrize`.
        x: ``(tokens, d)`` activations in any float dtype (read as is; upcast happens inside the op).
        row_scale: ``(tokens,)`` per-row scale (``1/m`` for per-sample normalisation); row weight = scale².
    """
    active_backend(x.device)
    return xtx_accumulate_torch(acc, x, row_scale)


__all__ = ["active_backend", "available_backends", "xtx_accumulate", "symmetrize", "triangle_blocks", "sample_scales",
           "BackendError"]
