"""The GEMM of the fused low-rank layer: ``C = P·Q + S·R (+ bias)`` in one pass over the output.

Forward of a LoRA linear is ``y = x·W_resᵀ + (x·Aᵀ)·(s·B)ᵀ``: P = x, Q = W_resᵀ, S = x·Aᵀ (tokens × r), R = (s·B)ᵀ.
The input gradient is ``dX = dY·W_res + (s·dY·B)·A``: P = dY, Q = W_res, S = s·dY·B, R = A. The Triton kernel
runs the base GEMM's K-loop and then an extra r-loop into the same fp32 accumulator, adds the bias and stores once:
no ``tokens × out`` intermediate for the low-rank term, no separate add, one rounding to the output dtype.

Operands are read through their strides (``Wᵀ`` is a view, never a copy). One op,
``corda_fast::lowrank_gemm(Tensor p, Tensor q, Tensor s, Tensor r, Tensor? bias=None) -> Tensor``: its default kernel
is the torch reference (the CPU path: ``addmm`` into the output buffer, then an in-place ``addmm_`` of the low-rank
term), the Triton kernel is registered for CUDA.

Beside the kernel, the fused LoRA linear built on it: :class:`FusedLoRALinearFunction` (autograd) and
:func:`fused_lora_linear` (functional). Swapping PEFT's layers for it is ``corda_fast.fused``'s job.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import registry
from .triton_xtx import HAVE_TRITON, INTERPRETING

if HAVE_TRITON:
    import triton
    import triton.language as tl


def lowrank_gemm_torch(p: torch.Tensor, q: torch.Tensor, s: torch.Tensor, r: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: ``p @ q + s @ r (+ bias)``, the low-rank term added in place into the output buffer."""
    out = torch.addmm(bias, p, q) if bias is not None else p @ q
    return out.addmm_(s, r)


lowrank_gemm_op = torch.library.custom_op(
    "corda_fast::lowrank_gemm", lowrank_gemm_torch, mutates_args=(),
    schema="(Tensor p, Tensor q, Tensor s, Tensor r, Tensor? bias=None) -> Tensor")


@lowrank_gemm_op.register_fake
def _lowrank_gemm_fake(p, q, s, r, bias=None):
    return p.new_empty((p.shape[0], q.shape[1]))


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
        args = (p, q, s, r, bias_arg, out, m, n, k, rank, triton.next_power_of_2(m), p.stride(0), p.stride(1),
                q.stride(0), q.stride(1), s.stride(0), s.stride(1), r.stride(0), r.stride(1), out.stride(0), out.stride(1))
        consts = dict(HAS_BIAS=bias is not None, UPCAST=upcast, PRECISION=precision, BLOCK_R=_block_r(rank))
        if INTERPRETING:
            bm, bn, bk = 64, 64, 64
            grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
            _lowrank_gemm_kernel[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                                                    num_warps=4)
            return out
        hopper = torch.cuda.get_device_capability(p.device)[0] >= 9
        _tuned[hopper][lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
            *args, **consts)
        return out

    lowrank_gemm_op.register_kernel("cuda")(lowrank_gemm_triton)


def run_lowrank_gemm(p, q, s, r, bias, kernel: str) -> torch.Tensor:
    """``p @ q + s @ r (+ bias)`` by the named kernel (``"torch"`` or ``"triton"``, from :func:`registry.choose`).
    On CUDA the Triton kernel is reached through the op (opaque to ``torch.compile``, traced by its fake)."""
    if kernel == "torch":
        return lowrank_gemm_torch(p, q, s, r, bias)
    if p.is_cuda:
        return lowrank_gemm_op(p, q, s, r, bias)
    return lowrank_gemm_triton(p, q, s, r, bias)  # the CPU interpreter


class FusedLoRALinearFunction(torch.autograd.Function):
    """``y = x·Wᵀ (+ bias) + s·(x·Aᵀ)·Bᵀ`` with a frozen ``W``; gradients for ``x``, ``A``, ``B`` (and ``bias``)::

        forward   S  = x·Aᵀ                          (tokens × r, kept for backward)
                  y  = x·W_resᵀ + S·(s·B)ᵀ (+ bias)  one lowrank_gemm: the low-rank term is an extra K-loop
        backward  dS = s·dy·B
                  dx = dy·W_res + dS·A               one lowrank_gemm, the same kernel
                  dA = dSᵀ·x,  dB = s·dyᵀ·S           thin GEMMs

    ``x`` ``(..., K)``, ``weight`` ``(N, K)`` (any strides, e.g. a transposed Conv1D weight), ``lora_a`` ``(r, K)``,
    ``lora_b`` ``(N, r)``, all in one dtype; ``kernel`` is ``"torch"`` or ``"triton"``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, kernel: str):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        s = x2 @ lora_a.t()
        y = run_lowrank_gemm(x2, weight.t(), s, lora_b.t() * scaling, bias, kernel)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, s)
        ctx.scaling, ctx.kernel, ctx.lead = scaling, kernel, lead
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_a, lora_b, s = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        if need_w:
            raise RuntimeError("the fused LoRA layer keeps the base weight frozen; it has no weight gradient")
        dy2 = dy.reshape(-1, dy.shape[-1])
        ds = (dy2 @ lora_b).mul_(ctx.scaling) if (need_x or need_a) else None
        dx = run_lowrank_gemm(dy2, weight, ds, lora_a, None, ctx.kernel).view(*ctx.lead, x2.shape[-1]) \
            if need_x else None
        da = ds.t() @ x2 if need_a else None
        db = (dy2.t() @ s).mul_(ctx.scaling) if need_b else None
        dbias = dy2.sum(0) if need_bias else None
        return dx, None, dbias, da, db, None, None


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                      lora_b: torch.Tensor, scaling: float, backend: Optional[str] = None) -> torch.Tensor:
    """Functional fused LoRA linear. ``lora_a`` / ``lora_b`` may be in another dtype than ``x`` (cast per call; the
    cast is differentiable, so their gradients come back in their own dtype). ``weight`` must not need a grad.
    ``backend``: ``"torch"`` / ``"triton"``, default :func:`registry.choose` for ``x``'s device."""
    if weight.requires_grad:
        raise ValueError("fused_lora_linear: the base weight must be frozen (requires_grad=False)")
    if x.dtype != weight.dtype:
        raise ValueError(f"fused_lora_linear: x is {x.dtype} but the base weight is {weight.dtype}")
    kernel = backend or registry.choose("lowrank_gemm", x.device)
    return FusedLoRALinearFunction.apply(x, weight, bias, lora_a.to(x.dtype), lora_b.to(x.dtype), float(scaling),
                                         kernel)
