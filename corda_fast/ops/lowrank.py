"""The GEMM of the fused low-rank layer: ``C = P·Q + S·R (+ bias)`` in one pass over the output.

Forward of a LoRA linear is ``y = x·W_resᵀ + (x·Aᵀ)·(s·B)ᵀ``: P = x, Q = W_resᵀ, S = x·Aᵀ (tokens × r), R = (s·B)ᵀ.
The input gradient is ``dX = dY·W_res + (s·dY·B)·A``: P = dY, Q = W_res, S = s·dY·B, R = A. The Triton kernel
runs the base GEMM's K-loop and then an extra r-loop into the same fp32 accumulator, adds the bias and stores once:
no ``tokens × out`` intermediate for the low-rank term, no separate add, one rounding to the output dtype.

Operands are read through their strides (``Wᵀ`` is a view, never a copy). One op,
``corda_fast::lowrank_gemm(Tensor p, Tensor q, Tensor s, Tensor r, Tensor? bias=None) -> Tensor``: its default kernel
is the torch reference (the CPU path: ``addmm`` into the output buffer, then an in-place ``addmm_`` of the low-rank
term); the Triton kernel (``backends/triton.py``) registers itself for CUDA.

Beside the kernel, the fused LoRA linear built on it: :class:`FusedLoRALinearFunction` (autograd) and
:func:`fused_lora_linear` (functional). Swapping PEFT's layers for it is ``corda_fast.fused``'s job.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import registry


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


registry.define("lowrank_gemm", lowrank_gemm_op, lowrank_gemm_torch)


def run_lowrank_gemm(p, q, s, r, bias, kernel: str) -> torch.Tensor:
    """``p @ q + s @ r (+ bias)`` by ``kernel`` (a backend name from :func:`registry.choose`)."""
    return registry.run("lowrank_gemm", kernel, p, q, s, r, bias)


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
