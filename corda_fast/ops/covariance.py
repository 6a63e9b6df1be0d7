"""The statistic op: ``corda_fast::xtx_accumulate(Tensor(a!) acc, Tensor x, Tensor row_scale) -> ()``.

Its pure-torch reference (below) is the op's default kernel, the CPU path and the test oracle; the Triton kernel
(``backends/triton.py``) registers itself for CUDA. Also the per-sample scales and the final symmetrisation.
"""

from __future__ import annotations

import torch

from . import registry


def triangle_blocks(d: int) -> int:
    """Column blocks used for the triangular accumulation of a ``(d, d)`` statistic (1 = plain GEMM).

    With ``k`` blocks only the block upper triangle is computed: ``(k+1)/(2k)`` of the GEMM FLOPs (measured on 2
    CPU cores with 2048 rows: 0.78x the time of the full GEMM at d = 576, 0.67x at d = 1536;
    ``benchmarks/bench_ops.py``)."""
    return min(6, max(1, d // 96))


def xtx_accumulate_torch(acc: torch.Tensor, x: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """``acc += Xsᵀ Xs`` on the block upper triangle, ``Xs = diag(row_scale)·X`` in ``acc.dtype``.

    ``acc`` holds the upper block triangle (diagonal blocks complete, so its diagonal is exact); the lower
    off-diagonal blocks stay untouched until :func:`symmetrize` mirrors the upper ones. GEMMs write straight
    into views of ``acc`` (no temporaries besides the scaled copy of X)."""
    xs = x.to(acc.dtype) * row_scale.to(acc.dtype).unsqueeze(1)
    d = xs.shape[1]
    step = -(-d // triangle_blocks(d))
    for i in range(0, d, step):
        acc[i:i + step, i:].addmm_(xs[:, i:i + step].t(), xs[:, i:])
    return acc


def symmetrize(acc: torch.Tensor) -> torch.Tensor:
    """Make an accumulator filled on its upper triangle (by any backend: whatever its block layout, the upper
    triangle is complete) symmetric, in place: the strict lower triangle becomes the mirror of the upper one.
    Returns ``acc``."""
    upper = torch.triu(acc, 1)
    return acc.triu_().add_(upper.mT)


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


def _xtx_accumulate_default(acc: torch.Tensor, x: torch.Tensor, row_scale: torch.Tensor) -> None:
    xtx_accumulate_torch(acc, x, row_scale)


xtx_accumulate_op = torch.library.custom_op(
    "corda_fast::xtx_accumulate", _xtx_accumulate_default, mutates_args=("acc",),
    schema="(Tensor(a!) acc, Tensor x, Tensor row_scale) -> ()")


@xtx_accumulate_op.register_fake
def _xtx_accumulate_fake(acc, x, row_scale):  # in place on acc, no outputs
    return None


registry.define("xtx_accumulate", xtx_accumulate_op, xtx_accumulate_torch)
