"""Numeric ops: one schema each, a pure-torch reference as the default kernel, compiled kernels per device.

=============================================  =====================  ==========================================
op (``torch.ops.corda_fast.*``)                reference (oracle)     compiled kernels
=============================================  =====================  ==========================================
``xtx_accumulate(acc!, x, row_scale)``         ``covariance.py``      Triton (``triton_xtx.py``), CUDA
``lowrank_gemm(p, q, s, r, bias?)``            ``lowrank.py``         Triton (``lowrank.py``), CUDA
``damped_cholesky(covs, probes, …)``           ``linalg.py``          C++ / CUDA (``native.py``, ``csrc/``)
``batched_decompose(w, cf, chol, …)``          ``linalg.py``          C++ / CUDA (``native.py``, ``csrc/``)
=============================================  =====================  ==========================================

The functions below are how the package calls them: each asks :func:`registry.choose` (the one place a kernel is
chosen; ``CORDA_FAST_BACKEND`` overrides it) and runs that kernel. This package imports nothing of ``corda_fast``
outside ``ops/``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import linalg, lowrank, native, registry, triton_xtx
from .covariance import sample_scales, symmetrize, triangle_blocks, xtx_accumulate_torch
from .linalg import DampingError, damp, damping_probes, decompose_layer, find_damping
from .lowrank import FusedLoRALinearFunction, fused_lora_linear
from .registry import BACKEND_ENV, BackendError, available, choose

__all__ = ["linalg", "lowrank", "native", "registry", "triton_xtx",
           "xtx_accumulate", "lowrank_gemm", "damped_cholesky", "batched_decompose", "choose", "available",
           "BackendError", "BACKEND_ENV", "symmetrize", "triangle_blocks", "sample_scales", "find_damping", "damp",
           "damping_probes", "decompose_layer", "DampingError", "FusedLoRALinearFunction", "fused_lora_linear"]


def xtx_accumulate(acc: torch.Tensor, x: torch.Tensor, row_scale: torch.Tensor,
                   kernel: Optional[str] = None) -> torch.Tensor:
    """``acc += (diag(row_scale)·X)ᵀ (diag(row_scale)·X)`` in place, on an upper triangle of blocks only.

    Args:
        acc: ``(d, d)`` float32/float64 accumulator, updated in place; read it through :func:`symmetrize`.
        x: ``(tokens, d)`` activations in any float dtype and strides (read as is).
        row_scale: ``(tokens,)`` per-row scale (``1/m`` for per-sample normalisation, 0 drops a row);
            the row weight is its square.
        kernel: ``"torch"`` / ``"triton"``; default :func:`choose` for ``x.device`` and ``acc.dtype``.
    Returns ``acc``.
    """
    kernel = kernel or choose("xtx_accumulate", x.device, acc.dtype)
    if kernel == "torch":
        return xtx_accumulate_torch(acc, x, row_scale)
    if acc.dtype != torch.float32:
        raise BackendError("the triton statistic kernel accumulates in float32; use precision='float32' or "
                           f"{BACKEND_ENV}=torch.")
    if x.is_cuda:
        torch.ops.corda_fast.xtx_accumulate(acc, x, row_scale)
    else:  # the CPU interpreter
        triton_xtx.xtx_accumulate_triton(acc, x, row_scale)
    return acc


def lowrank_gemm(p, q, s, r, bias=None, kernel: Optional[str] = None) -> torch.Tensor:
    """``p (M, K) @ q (K, N) + s (M, R) @ r (R, N) (+ bias (N,))`` in one pass; kernel as :func:`choose`."""
    return lowrank.run_lowrank_gemm(p, q, s, r, bias, kernel or choose("lowrank_gemm", p.device))


def damped_cholesky(covs: torch.Tensor, probes: torch.Tensor, start: float, tol: float, max_iter: int,
                    kernel: Optional[str] = None):
    """``(C_f, L, λ)`` for a batch of statistics ``(n, d, d)`` (see ``linalg.py``); kernel as :func:`choose`."""
    kernel = kernel or choose("damped_cholesky", covs.device)
    if kernel == "torch":
        return linalg.damped_cholesky_reference(covs, probes, start, tol, max_iter)
    fn = torch.ops.corda_fast.damped_cholesky if covs.is_cuda else native.kernels().damped_cholesky
    return fn(covs, probes, start, tol, max_iter)


def batched_decompose(w: torch.Tensor, cf: torch.Tensor, chol: torch.Tensor, scaling: torch.Tensor, rank: int,
                      ipm: bool, method: str, kernel: Optional[str] = None):
    """``(A (n, r, d_in), B (n, d_out, r), S (n, r))`` for a batch of same-shaped layers; kernel as :func:`choose`."""
    kernel = kernel or choose("batched_decompose", w.device)
    if kernel == "torch":
        return linalg.batched_decompose_reference(w, cf, chol, scaling, rank, ipm, method)
    fn = torch.ops.corda_fast.batched_decompose if w.is_cuda else native.kernels().batched_decompose
    return fn(w, cf, chol, scaling, rank, ipm, method)
