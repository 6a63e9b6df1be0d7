"""Numeric ops: each defined once (schema + fake + pure-torch default kernel = oracle), compiled kernels per backend.

=============================================  =====================  ==========================================
op (``torch.ops.corda_fast.*``)                defined with its       compiled kernels (``backends/``)
                                               reference in
=============================================  =====================  ==========================================
``xtx_accumulate(acc!, x, row_scale)``         ``covariance.py``      ``triton`` (CUDA; CPU interpreter forced)
``lowrank_gemm(p, q, s, r, bias?)``            ``lowrank.py``         ``triton`` (CUDA; CPU interpreter forced)
``damped_cholesky(covs, probes, …)``           ``linalg.py``          ``native`` (C++ CPU forced; CUDA automatic)
``batched_decompose(w, cf, chol, …)``          ``linalg.py``          ``native`` (C++ CPU forced; CUDA automatic)
=============================================  =====================  ==========================================

The functions below are the only way the package reaches a kernel: each asks :func:`choose` (``registry.py``, where
``CORDA_FAST_BACKEND`` is read) and runs the choice through the registry. Backends register themselves when
``backends`` is imported, below. This package imports nothing of ``corda_fast`` outside ``ops/``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backends as _backends  # noqa: F401  (registers the compiled kernels)
from . import covariance, linalg, lowrank, registry
from .covariance import sample_scales, symmetrize, triangle_blocks
from .linalg import (
    DampingError,
    cholesky_in_place,
    cholesky_solve_lower,
    damp,
    damp_,
    damping_probes,
    decompose_layer,
    degenerate_error,
    find_damping,
    finish_factors,
    gram_basis,
    gram_matrix,
    kept_triplets,
    not_converged_error,
    trim_basis,
    triplets_from_basis,
)
from .lowrank import FusedLoRALinearFunction, fused_lora_linear
from .registry import BACKEND_ENV, BackendError, available, choose, describe, registrations, why_not

__all__ = ["covariance", "linalg", "lowrank", "registry",
           "xtx_accumulate", "lowrank_gemm", "damped_cholesky", "batched_decompose", "choose", "available",
           "describe", "registrations", "why_not", "extension_status", "BackendError", "BACKEND_ENV", "symmetrize",
           "triangle_blocks", "sample_scales", "find_damping", "damp", "damp_", "damping_probes", "decompose_layer",
           "gram_basis", "gram_matrix", "triplets_from_basis", "trim_basis", "kept_triplets", "finish_factors",
           "cholesky_in_place", "cholesky_solve_lower",
           "degenerate_error", "not_converged_error", "DampingError", "FusedLoRALinearFunction", "fused_lora_linear"]


def extension_status() -> str:
    """How the native extension was built, or why it is missing (one line)."""
    return _backends.native.status()


def xtx_accumulate(acc: torch.Tensor, x: torch.Tensor, row_scale: torch.Tensor,
                   kernel: Optional[str] = None) -> torch.Tensor:
    """``acc += (diag(row_scale)·X)ᵀ (diag(row_scale)·X)`` in place, on an upper triangle of blocks only.

    Args:
        acc: ``(d, d)`` float32/float64 accumulator, updated in place; read it through :func:`symmetrize`.
        x: ``(tokens, d)`` activations in any float dtype and strides (read as is).
        row_scale: ``(tokens,)`` per-row scale (``1/m`` for per-sample normalisation, 0 drops a row);
            the row weight is its square.
        kernel: a backend name (``"torch"`` / ``"triton"``); default :func:`choose` for ``x.device`` and
            ``acc.dtype``. A kernel that cannot accumulate in ``acc.dtype`` raises :class:`BackendError`.
    Returns ``acc``.
    """
    if kernel is None:
        kernel = choose("xtx_accumulate", x.device, acc.dtype)
    else:
        why = why_not("xtx_accumulate", kernel, x.device, acc.dtype)
        if why is not None:
            raise BackendError(f"the {kernel!r} kernel of xtx_accumulate cannot run here: {why}.")
    registry.run("xtx_accumulate", kernel, acc, x, row_scale)
    return acc


def lowrank_gemm(p, q, s, r, bias=None, kernel: Optional[str] = None) -> torch.Tensor:
    """``p (M, K) @ q (K, N) + s (M, R) @ r (R, N) (+ bias (N,))`` in one pass; kernel as :func:`choose`."""
    return registry.run("lowrank_gemm", kernel or choose("lowrank_gemm", p.device), p, q, s, r, bias)


def damped_cholesky(covs: torch.Tensor, probes: torch.Tensor, start: float, tol: float, max_iter: int,
                    kernel: Optional[str] = None):
    """``(C_f, L, λ)`` for a batch of statistics ``(n, d, d)`` (see ``linalg.py``); kernel as :func:`choose`."""
    return registry.run("damped_cholesky", kernel or choose("damped_cholesky", covs.device), covs, probes,
                        float(start), float(tol), int(max_iter))


def batched_decompose(w: torch.Tensor, cf: torch.Tensor, chol: torch.Tensor, scaling: torch.Tensor, rank: int,
                      ipm: bool, method: str, kernel: Optional[str] = None):
    """``(A (n, r, d_in), B (n, d_out, r), S (n, r))`` for a batch of same-shaped layers; kernel as :func:`choose`."""
    return registry.run("batched_decompose", kernel or choose("batched_decompose", w.device), w, cf, chol, scaling,
                        int(rank), bool(ipm), method)
