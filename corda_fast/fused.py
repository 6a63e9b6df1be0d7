"""Fused low-rank training path: swaps PEFT ``lora.Linear`` layers to one fused forward/backward, in place.

The fused op itself (``ops.lowrank``: the ``corda_fast::lowrank_gemm`` kernel, :class:`FusedLoRALinearFunction` and
:func:`fused_lora_linear`) computes, for a frozen residual ``W_res`` and a trainable LoRA pair ``(A, B)`` with scaling
``s``, ``y = x·W_resᵀ + (x·Aᵀ)·(s·B)ᵀ`` with the low-rank term as extra K-steps of one GEMM, forward and backward.
This module only decides which PEFT layers take it. PEFT's layer runs the base GEMM, two thin GEMMs, a scale and an
add as separate ops, materialises the
``tokens × out`` low-rank output and, for 16-bit models with float32 adapters (PEFT's default
``autocast_adapter_dtype``), a float32 copy of ``x`` that it keeps for backward. The fused path computes in the
activations' dtype with float32 accumulation (the adapters are cast to it per call, gradients come back in the
adapters' own dtype) and keeps only ``x`` and ``S``.

:func:`fuse` changes each eligible layer's class to :class:`FusedLoraLinear` (a subclass of PEFT's
``lora.Linear``: same parameters, state dict, ``save_pretrained`` / ``from_pretrained``, ``merge`` / ``unmerge``);
:func:`unfuse` restores the class. A fused layer takes PEFT's own path whenever the fused one does not apply to a
call: adapters disabled or merged, several active adapters, ``adapter_names``, variants (DoRA), a LoRA bias,
``lora_dropout > 0`` while training, a trainable base weight, hooks on the base layer, mismatched dtypes.

Kernel: chosen by ``corda_fast.ops`` (the Triton kernel for CUDA tensors, the torch reference — ``addmm`` into the
output buffer, in-place ``addmm_`` of the low-rank term — on CPU; ``CORDA_FAST_BACKEND`` overrides).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from . import ops
from .ops import FusedLoRALinearFunction, fused_lora_linear

log = logging.getLogger(__name__)

__all__ = ["fuse", "unfuse", "FuseReport", "FusedLoraLinear", "fused_lora_linear", "FusedLoRALinearFunction"]


def _plain_base(base: nn.Module):
    """``(weight as (out, in), bias)`` of a plain nn.Linear / transformers Conv1D, or None for anything else."""
    from transformers.pytorch_utils import Conv1D

    if type(base).forward is nn.Linear.forward:
        return base.weight, base.bias
    if type(base).forward is Conv1D.forward:
        return base.weight.t(), base.bias
    return None


def _static_reason(module) -> Optional[str]:
    """Why a PEFT lora.Linear can never take the fused path (None: it can)."""
    base = module.get_base_layer()
    if _plain_base(base) is None:
        return f"base layer {type(base).__name__} is not a plain nn.Linear/Conv1D (quantized or custom)"
    if not base.weight.is_floating_point():
        return f"base weight dtype {base.weight.dtype} is not floating point"
    return None


def _call_reason(module, x, args, kwargs) -> Optional[str]:
    """Why this call goes through PEFT's path (None: fused)."""
    if args or kwargs:
        return "extra forward arguments"
    if module.disable_adapters or module.merged:
        return "adapters disabled or merged"
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        return "not exactly one active adapter"
    name = active[0]
    if name in module.lora_variant:
        return "adapter variant (e.g. DoRA)"
    if module.lora_B[name].bias is not None:
        return "LoRA bias"
    drop = module.lora_dropout[name]
    if not (isinstance(drop, nn.Identity) or not drop.training or getattr(drop, "p", 0.0) == 0.0):
        return "lora_dropout > 0 while training"
    base = module.get_base_layer()
    if base._forward_hooks or base._forward_pre_hooks:
        return "hooks on the base layer"
    if base.weight.requires_grad:
        return "trainable base weight"
    return None


class FusedLoraLinear(PeftLoraLinear):
    """PEFT's ``lora.Linear`` with the fused forward/backward (installed by :func:`fuse` by changing the class)."""

    def forward(self, x, *args, **kwargs):
        if _call_reason(self, x, args, kwargs) is not None:
            return super().forward(x, *args, **kwargs)
        name = next(a for a in self.active_adapters if a in self.lora_A)
        weight, bias = _plain_base(self.get_base_layer())
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        backend = getattr(self, "_corda_fast_backend", None)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # what autocast does for F.linear: every operand in its dtype
            dtype = torch.get_autocast_dtype(dev)
            with torch.autocast(dev, enabled=False):
                return fused_lora_linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                         a, b, self.scaling[name], backend=backend)
        if x.dtype != weight.dtype:
            return super().forward(x, *args, **kwargs)
        return fused_lora_linear(x, weight, bias, a, b, self.scaling[name], backend=backend)

    def __repr__(self):
        return "fused_" + super().__repr__()


@dataclass
class FuseReport:
    """Result of :func:`fuse`: names of the fused layers and, for PEFT LoRA layers left alone, why."""

    fused: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.fused)


def fuse(model: nn.Module, backend: Optional[str] = None) -> FuseReport:
    """Switch every eligible PEFT ``lora.Linear`` of ``model`` to the fused path, in place.

    Args:
        model: a ``PeftModel`` (or any module holding PEFT LoRA layers).
        backend: ``"torch"`` | ``"triton"`` for every call; default: chosen per call by
            ``corda_fast.ops.choose`` (Triton on CUDA, torch on CPU, ``CORDA_FAST_BACKEND`` honoured).

    Returns a :class:`FuseReport`. Raises ``ValueError`` if ``model`` holds no PEFT LoRA linear layer.
    """
    if backend is not None and backend not in ("torch", "triton"):
        raise ValueError(f"fuse(backend={backend!r}): expected 'torch', 'triton' or None")
    if backend == "triton":
        why = ops.why_not("lowrank_gemm", "triton")
        if why is not None:
            raise ops.BackendError(f"fuse(backend='triton'): Triton cannot run here: {why}")
    from peft.tuners.lora.layer import LoraLayer

    lora_linear, fused_cls = PeftLoraLinear, FusedLoraLinear
    report = FuseReport()
    seen = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        seen += 1
        if not isinstance(module, lora_linear):  # embeddings, convolutions, quantized (bnb / torchao) LoRA layers
            report.skipped[name] = f"{type(module).__name__}: only PEFT's lora.Linear is fused"
            continue
        if type(module) is fused_cls:
            module._corda_fast_backend = backend
            report.fused.append(name)
            continue
        if type(module) is not lora_linear:
            report.skipped[name] = f"subclass {type(module).__name__} of lora.Linear"
            continue
        reason = _static_reason(module)
        if reason:
            report.skipped[name] = reason
            continue
        module.__class__ = fused_cls
        module._corda_fast_backend = backend
        report.fused.append(name)
    if not seen:
        raise ValueError(f"fuse(): {type(model).__name__} holds no PEFT LoRA layer")
    log.info("fused %d LoRA layers%s", len(report.fused),
             f"; {len(report.skipped)} left on PEFT's path" if report.skipped else "")
    for name, reason in report.skipped.items():
        log.info("not fused: %s (%s)", name, reason)
    return report


def unfuse(model: nn.Module) -> int:
    """Restore PEFT's ``lora.Linear`` on every fused layer of ``model``; returns how many were restored."""
    lora_linear, fused_cls = PeftLoraLinear, FusedLoraLinear
    n = 0
    for module in model.modules():
        if type(module) is fused_cls:
            module.__class__ = lora_linear
            module.__dict__.pop("_corda_fast_backend", None)
            n += 1
    return n
