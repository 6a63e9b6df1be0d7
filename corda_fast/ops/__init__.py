"""Numeric ops, one schema each, and the one place where a backend is chosen.

Every op has a pure-torch reference (the CPU path and the test oracle). Compiled backends register here when
they can run; ``CORDA_FAST_BACKEND`` forces one (``auto`` | ``torch`` | ``triton``), and forcing one that cannot
run raises :class:`BackendError`. ``auto`` picks Triton for CUDA tensors and torch on CPU.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import lowrank, native, triton_xtx  # native: registers torch.ops.corda_fast.* when the extension is built
from .covariance import sample_scales, symmetrize, triangle_blocks, xtx_accumulate_torch

BACKEND_ENV = "CORDA_FAST_BACKEND"
_KNOWN = ("torch", "triton")


class BackendError(RuntimeError):
    """A forced backend that is unknown or cannot run here."""


def available_backends() -> dict:
    return {"torch": True, "triton": triton_xtx.available()}


def active_backend(device=None, accumulate_dtype: torch.dtype = torch.float32) -> str:
    """Name of the backend the ops use for tensors on ``device`` accumulating in ``accumulate_dtype``, honouring
    ``CORDA_FAST_BACKEND`` (the Triton kernel accumulates in float32 only)."""
    wanted = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if wanted == "auto":
        is_cuda = device is not None and torch.device(device).type == "cuda"
        use_triton = is_cuda and triton_xtx.HAVE_TRITON and accumulate_dtype == torch.float32
        return "triton" if use_triton else "torch"
    if wanted == "triton" and accumulate_dtype != torch.float32:
        raise BackendError("the triton statistic kernel accumulates in float32; covariance_precision='float64' "
                           "needs CORDA_FAST_BACKEND=torch (or auto).")
    if wanted not in _KNOWN:
        raise BackendError(f"{BACKEND_ENV}={wanted!r} is not a backend of this build; known: {_KNOWN} (or 'auto').")
    if not available_backends()[wanted]:
        raise BackendError(
            f"{BACKEND_ENV}={wanted!r} cannot run here (Triton needs a CUDA device, or TRITON_INTERPRET=1 set "
            "before triton is imported for the slow CPU interpreter)."
        )
    return wanted


def xtx_accumulate(acc: torch.Tensor, x: torch.Tensor, row_scale: torch.Tensor, backend: Optional[str] = None):
    """``acc += (diag(row_scale)·X)ᵀ (diag(row_scale)·X)`` in place, on an upper triangle of blocks only.

    Args:
        acc: ``(d, d)`` float32/float64 accumulator, updated in place; read it through :func:`symmetrize`.
        x: ``(tokens, d)`` activations in any float dtype and strides (read as is).
        row_scale: ``(tokens,)`` per-row scale (``1/m`` for per-sample normalisation, 0 drops a row);
            the row weight is its square.
        backend: ``"torch"`` / ``"triton"``; default :func:`active_backend` for ``x.device``.
    """
    backend = backend or active_backend(x.device)
    if backend == "triton":
        if acc.dtype != torch.float32:
            raise BackendError("the triton statistic kernel accumulates in float32; use covariance_precision="
                               "'float32' or CORDA_FAST_BACKEND=torch.")
        torch.ops.corda_fast.xtx_accumulate_triton(acc, x, row_scale)
        return acc
    return xtx_accumulate_torch(acc, x, row_scale)


def lowrank_gemm(p, q, s, r, bias=None, backend: Optional[str] = None) -> torch.Tensor:
    """``p @ q + s @ r (+ bias)`` in one pass (the fused low-rank layer's GEMM); backend as :func:`active_backend`."""
    if (backend or active_backend(p.device)) == "triton":
        return torch.ops.corda_fast.lowrank_gemm_triton(p, q, s, r, bias)
    return lowrank.lowrank_gemm_torch(p, q, s, r, bias)


__all__ = ["active_backend", "lowrank_gemm", "available_backends", "xtx_accumulate", "symmetrize", "triangle_blocks", "sample_scales",
           "BackendError", "BACKEND_ENV"]
