"""Triton kernel for the statistic: ``acc += (diag(s)·X)ᵀ (diag(s)·X)`` on the upper triangle of tiles.

X is read in its own dtype and strides (no upcast copy, no contiguous copy); each program owns one
``BLOCK × BLOCK`` tile ``(i, j)`` with ``j ≥ i`` of the fp32 accumulator, streams the token dimension and adds its
partial product in place (no atomics: tiles are disjoint). Tiles below the diagonal are skipped, so about half
the FLOPs of a full ``XᵀX``; :func:`corda_fast.ops.symmetrize` mirrors the triangle once, when the statistic
is finalised.

On CUDA the tile shape is autotuned per ``d`` (a Hopper set and a generic set). :func:`xtx_accumulate_triton` is
registered as the CUDA kernel of the op ``corda_fast::xtx_accumulate`` (``covariance.py``); on CPU it runs through the
Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported) when forced, which is how CI checks its
logic.
"""

from __future__ import annotations

import os

import torch

from .covariance import xtx_accumulate_op

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except Exception:  # pragma: no cover - triton missing or broken
    HAVE_TRITON = False

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

    def _configs(hopper: bool) -> list:
        """Autotuning candidates: a Hopper (sm_90, e.g. H200) set with deeper pipelines and wider tiles, and a
        generic set. Keyed on ``d`` only (token counts vary batch to batch)."""
        shapes = [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3)]
        if hopper:
            shapes += [(128, 64, 8, 4), (128, 128, 8, 4), (64, 128, 4, 4)]
        return [triton.Config({"BLOCK": b, "BLOCK_T": t}, num_warps=w, num_stages=st) for b, t, w, st in shapes]

    # restore_value: the autotuner's trial launches add into the accumulator too; it must be put back after them
    _tuned = {hopper: triton.autotune(configs=_configs(hopper), key=["d"], restore_value=["acc_ptr"])(_xtx_tile_kernel)
              for hopper in (False, True)}

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
        _tuned[hopper][lambda meta: (triton.cdiv(d, meta["BLOCK"]), triton.cdiv(d, meta["BLOCK"]))](*args)

    xtx_accumulate_op.register_kernel("cuda")(xtx_accumulate_triton)


def available() -> bool:
    """Triton can run here: a CUDA device, or the interpreter on CPU."""
    return HAVE_TRITON and (torch.cuda.is_available() or INTERPRETING)
