"""Triton kernels of two ops: the statistic ``xtx_accumulate`` and the fused layer's ``lowrank_gemm``.

**xtx_accumulate** — ``acc += (diag(s)·X)ᵀ (diag(s)·X)`` on the upper triangle of tiles. X is read in its own dtype
and strides (no upcast copy, no contiguous copy); each program owns one ``BLOCK × BLOCK`` tile ``(i, j)`` with
``j ≥ i`` of the fp32 accumulator, streams the token dimension and adds its partial product in place (no atomics:
tiles are disjoint). Tiles below the diagonal are skipped, so about half the FLOPs of a full ``XᵀX``;
``corda_fast.ops.symmetrize`` mirrors the triangle once, when the statistic is finalised.

**lowrank_gemm** — ``C = P·Q + S·R (+ bias)``: the base GEMM's K-loop, then an extra r-loop into the same fp32
accumulator, the bias, one store (no ``tokens × out`` intermediate for the low-rank term, one rounding).

On CUDA the tile shapes are autotuned (a Hopper set and a generic set) and both kernels are registered as the ops'
automatic CUDA kernels. On CPU they run through the Triton interpreter (``TRITON_INTERPRET=1`` set before triton
is imported) when ``CORDA_FAST_BACKEND=triton`` or ``kernel="triton"`` forces them, which is how CI checks their
logic. This module registers with ``ops/registry.py`` and nothing calls it directly.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .. import covariance, lowrank, registry  # noqa: F401  (they define the ops registered here)

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
    _WHY = None
except Exception as exc:  # pragma: no cover - triton missing or broken
    HAVE_TRITON = False
    _WHY = f"triton cannot be imported ({type(exc).__name__}: {exc})"

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

if HAVE_TRITON:

    @triton.jit
    def _xtx_tile_kernel(x_ptr, s_ptr, acc_ptr, n_tokens, d, stride_xt, stride_xd, stride_s, stride_am, stride_an,
                         BLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
        pid_i = tl.program_id(0)
        pid_j = tl.program_id(1)
        if pid_j < pid_i:  # lower triangle of tiles: mirrored later, never computed
            return
        cols_i = pid_i * BLOCK + tl.arange(0, BLOCK)
        cols_j = pid_j * BLOCK + tl.arange(0, BLOCK)
        mask_i = cols_i < d
        mask_j = cols_j < d
        part = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for t0 in range(0, n_tokens, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            mask_t = rows < n_tokens
            scale = tl.load(s_ptr + rows * stride_s, mask=mask_t, other=0.0).to(tl.float32)
            a = tl.load(x_ptr + rows[:, None] * stride_xt + cols_i[None, :] * stride_xd,
                        mask=mask_t[:, None] & mask_i[None, :], other=0.0).to(tl.float32)
            b = tl.load(x_ptr + rows[:, None] * stride_xt + cols_j[None, :] * stride_xd,
                        mask=mask_t[:, None] & mask_j[None, :], other=0.0).to(tl.float32)
            # fp32 operands: exact products of 16-bit inputs, and the interpreter's 16-bit dot is wrong
            part += tl.dot(tl.trans(a * scale[:, None]), b * scale[:, None], input_precision="ieee")
        out = acc_ptr + cols_i[:, None] * stride_am + cols_j[None, :] * stride_an
        omask = mask_i[:, None] & mask_j[None, :]
        tl.store(out, tl.load(out, mask=omask, other=0.0) + part, mask=omask)

    def _config(d: int, n_tokens: int) -> tuple[int, int, int]:
        """(BLOCK, BLOCK_T, num_warps) of the untuned launch: the interpreter wants few, large tiles."""
        if INTERPRETING:
            return 64, 128, 4
        block = 64 if d <= 1024 else 128
        return block, 32, 4 if block == 64 else 8

    def _xtx_configs(hopper: bool) -> list:
        """Autotuning candidates: a Hopper (sm_90, e.g. H200) set with deeper pipelines and wider tiles, and a
        generic set. Keyed on ``d`` only (token counts vary batch to batch)."""
        shapes = [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3)]
        if hopper:
            shapes += [(128, 64, 8, 4), (128, 128, 8, 4), (64, 128, 4, 4)]
        return [triton.Config({"BLOCK": b, "BLOCK_T": t}, num_warps=w, num_stages=st) for b, t, w, st in shapes]

    # restore_value: the autotuner's trial launches add into the accumulator too; it must be put back after them
    _xtx_tuned = {hopper: triton.autotune(configs=_xtx_configs(hopper), key=["d"],
                                          restore_value=["acc_ptr"])(_xtx_tile_kernel) for hopper in (False, True)}

    def xtx_accumulate_triton(acc: torch.Tensor, x: torch.Tensor, row_scale: torch.Tensor) -> None:
        """``acc (d, d) fp32 += (diag(row_scale)·x)ᵀ (diag(row_scale)·x)`` on the upper tile triangle;
        ``x`` is ``(tokens, d)`` fp32/fp16/bf16 with any strides, ``row_scale`` ``(tokens,)``."""
        n_tokens, d = x.shape
        if n_tokens == 0 or d == 0:
            return
        args = (x, row_scale, acc, n_tokens, d, x.stride(0), x.stride(1), row_scale.stride(0), acc.stride(0),
                acc.stride(1))
        if INTERPRETING:
            block, block_t, warps = _config(d, n_tokens)
            tiles = triton.cdiv(d, block)
            _xtx_tile_kernel[(tiles, tiles)](*args, BLOCK=block, BLOCK_T=block_t, num_warps=warps)
            return
        hopper = torch.cuda.get_device_capability(x.device)[0] >= 9
        _xtx_tuned[hopper][lambda meta: (triton.cdiv(d, meta["BLOCK"]), triton.cdiv(d, meta["BLOCK"]))](*args)

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

    def _gemm_configs(hopper: bool) -> list:
        shapes = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3)]
        if hopper:
            shapes += [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=st)
                for m, n, k, w, st in shapes]

    # keyed on the token count's power-of-two bucket, not the count: training with dynamic padding sees many
    # token counts and must not re-tune for each
    _gemm_tuned = {hopper: triton.autotune(configs=_gemm_configs(hopper),
                                           key=["M_BUCKET", "N", "K", "R"])(_lowrank_gemm_kernel)
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
        _gemm_tuned[hopper][lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
            *args, **consts)
        return out


def _register() -> None:
    """Register both kernels: automatic on CUDA; on CPU too under the interpreter (forced only)."""
    if not HAVE_TRITON:
        for op in ("xtx_accumulate", "lowrank_gemm"):
            registry.unavailable(op, "triton", _WHY)
        return
    devices = ("cuda", "cpu") if INTERPRETING else ("cuda",)
    registry.register("xtx_accumulate", "triton", xtx_accumulate_triton, devices, auto=("cuda",),
                      accumulates=(torch.float32,))
    registry.register("lowrank_gemm", "triton", lowrank_gemm_triton, devices, auto=("cuda",))


_register()
