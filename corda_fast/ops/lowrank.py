"""The GEMM of the fused low-rank layer: ``C = P·Q + S·R (+ bias)`` in one pass over the output.

Forward of a LoRA linear is ``y = x·W_resᵀ + (x·Aᵀ)·(s·B)ᵀ``: P = x, Q = W_resᵀ, S = x·Aᵀ (tokens × r), R = (s·B)ᵀ.
The input gradient is ``dX = dY·W_res + (s·dY·B)·A``: P = dY, Q = W_res, S = s·dY·B, R = A. The Triton kernel
runs the base GEMM's K-loop and then an extra r-loop into the same fp32 accumulator, adds the bias and stores once:
no ``tokens × out`` intermediate for the low-rank term, no separate add, one rounding to the output dtype.

Operands are read through their strides (``Wᵀ`` is a view, never a copy). Registered as the torch.library op
``corda_fast::lowrank_gemm_triton`` (``triton_op`` + ``wrap_triton``), so ``torch.compile`` traces it. The torch
reference (the CPU path) is ``addmm`` into the output buffer followed by an in-place ``addmm_`` of the low-rank
term, as Unsloth does with cuBLAS.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .triton_xtx import HAVE_TRITON, INTERPRETING

if HAVE_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton


def lowrank_gemm_torch(p: torch.Tensor, q: torch.Tensor, s: torch.Tensor, r: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: ``p @ q + s @ r (+ bias)``, the low-rank term added in place into the output buffer."""
    out = torch.addmm(bias, p, q) if bias is not None else p @ q
    return out.addmm_(s, r)


if HAVE_TRITON:

    @triton.jit
    def _lowrank_gemm_kernel(p_ptr, q_ptr, s_ptr, r_ptr, bias_ptr, c_ptr, M, N, K, R, M_BUCKET,
                             stride_pm, stride_pk, stride_qk, stride_qn, stride_sm, stride_sr, stride_rr, stride_rn,
                             stride_cm, stride_cn,
                             HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
        # grouped tile order: GROUP_M row-blocks share the same column-blocks of Q while they are in L2
        pid = tl.program_id(0)
        grid_m = tl.cdiv(M, BLOCK_M)
        grid_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * grid_n
        group = pid // width
        first_m = group * GROUP_M
        size_m = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = rows < M
        mask_n = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # the base GEMM
            ks = k0 + tl.arange(0, BLOCK_K)
            mask_k = ks < K
            a = tl.load(p_ptr + rows[:, None] * stride_pm + ks[None, :] * stride_pk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(q_ptr + ks[:, None] * stride_qk + cols[None, :] * stride_qn,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:  # the interpreter's 16-bit dot is wrong: fp32 operands there (exact products)
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        for r0 in range(0, R, BLOCK_R):  # the low-rank term: extra K-steps into the same accumulator
            rs = r0 + tl.arange(0, BLOCK_R)
            mask_r = rs < R
            a = tl.load(s_ptr + rows[:, None] * stride_sm + rs[None, :] * stride_sr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            b = tl.load(r_ptr + rs[:, None] * stride_rr + cols[None, :] * stride_rn,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])

    def _block_r(rank: int) -> int:
        """Width of the r-loop step: a power of two ≥ 16 (tl.dot's minimum), at most 64."""
        return max(16, min(64, triton.next_power_of_2(max(rank, 1))))

    def _configs(hopper: bool) -> list:
        shapes = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3)]
        if hopper:
            shapes += [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=st)
                for m, n, k, w, st in shapes]

    # keyed on the token count's power-of-two bucket, not the count: training with dynamic padding sees many
    # token counts and must not re-tune for each
    _tuned = {hopper: triton.autotune(configs=_configs(hopper), key=["M_BUCKET", "N", "K", "R"])(_lowrank_gemm_kernel)
              for hopper in (False, True)}

    @triton_op("corda_fast::lowrank_gemm_triton", mutates_args={})
    def lowrank_gemm_triton(p: torch.Tensor, q: torch.Tensor, s: torch.Tensor, r: torch.Tensor,
                            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``p (M, K) @ q (K, N) + s (M, R) @ r (R, N) (+ bias (N,))`` in ``p``'s dtype, fp32 accumulation."""
        m, k = p.shape
        n = q.shape[1]
        rank = s.shape[1]
        out = torch.empty((m, n), dtype=p.dtype, device=p.device)
        if m == 0 or n == 0:
            return out
        upcast = INTERPRETING and p.dtype != torch.float32
        # fp32 inputs follow torch's matmul setting (tf32 only when the user allowed it)
        tf32 = p.dtype == torch.float32 and p.is_cuda and torch.backends.cuda.matmul.allow_tf32
        precision = "tf32" if tf32 else "ieee"
        bias_arg = bias if bias is not None else out
        args = (p, q, s, r, bias_arg, out, m, n, k, rank, triton.next_power_of_2(m), p.stride(0), p.stride(1), q.stride(0), q.stride(1),
                s.stride(0), s.stride(1), r.stride(0), r.stride(1), out.stride(0), out.stride(1))
        consts = dict(HAS_BIAS=bias is not None, UPCAST=upcast, PRECISION=precision, BLOCK_R=_block_r(rank))
        if INTERPRETING or os.environ.get("CORDA_FAST_TRITON_AUTOTUNE", "1") == "0":
            bm, bn, bk = (64, 64, 64) if INTERPRETING else (64, 64, 32)
            grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
            wrap_triton(_lowrank_gemm_kernel)[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                                                    num_warps=4)
            return out
        hopper = torch.cuda.get_device_capability(p.device)[0] >= 9
        wrap_triton(_tuned[hopper])[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
            *args, **consts)
        return out

    @lowrank_gemm_triton.register_fake
    def _(p, q, s, r, bias=None):  # shape/dtype only (the interpreter cannot run on fake tensors)
        return p.new_empty((p.shape[0], q.shape[1]))

