"""Pure-torch reference of the covariance ops (CPU path and test oracle)."""

from __future__ import annotations

import torch


def xtx_accumulate_torch(acc: torch.Tensor, x: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """``acc += Xsᵀ Xs`` with ``Xs = diag(row_scale)·X`` in ``acc.dtype``; one GEMM straight into ``acc``."""
    xs = x.to(acc.dtype) * row_scale.to(acc.dtype).unsqueeze(1)
    acc.addmm_(xs.t(), xs)
    return acc


def sample_scales(
    x: torch.Tensor, row_sample: torch.Tensor, n_samples: int, normalization: str
) -> torch.Tensor:
    """Per-row scale ``1/m_s`` of each row's sample ``s`` (shape ``(tokens,)``, float32).

    Args:
        x: ``(tokens, d)`` real (unpadded) rows of a batch.
        row_sample: ``(tokens,)`` int64 sample index of each row, in ``[0, n_samples)``.
        normalization: ``"peft"`` — ``m_s = |max(X_s)|``, the absolute value of the *signed* maximum (PEFT's
            quirk: a mostly-negative sample is divided by a small number); ``"absmax"`` — ``m_s = max|X_s|``;
            ``"none"`` — ``m_s = 1``. A zero ``m_s`` yields an infinite scale, which the caller's finiteness
            check reports.
    """
    if normalization == "none":
        return torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    row_max = (x.abs() if normalization == "absmax" else x).amax(dim=1).float()
    m = torch.full((n_samples,), float("-inf"), dtype=torch.float32, device=x.device)
    m = m.scatter_reduce(0, row_sample, row_max, reduce="amax", include_self=True)
    return m.abs().reciprocal().index_select(0, row_sample)
