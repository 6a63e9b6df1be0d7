"""Quantized base weights: detection, layer-by-layer dequantization for ``W·C``, and the residual's storage.

Supported: bitsandbytes 4-bit layers (``Linear4bit``: NF4 / FP4, any blocksize, double quantization) and torchao
quantized weight tensors (anything with ``.dequantize()``, e.g. ``Int8WeightOnlyConfig``). Detection is by class,
not by dtype (a 4-bit weight stored as float ``quant_storage`` is still caught). Anything else quantized raises
:class:`UnsupportedQuantization` naming the layer and its type.

CorDA works on the dequantized weight ``W_q = deq(Q(W))`` (one layer at a time, never the whole model). The
residual ``W_res = W_q − s·B·A`` is then either

- ``"requantize"`` (QLoRA + CorDA, default): stored back in the layer's own format (bitsandbytes: same quant type,
  blocksize, double quantization, storage; torchao: ``quantize_`` with the ``requantize_config`` the user gives,
  since a torchao tensor does not carry the config that made it). The model then computes
  ``deq(Q(W_res)) + s·B·A``, which differs from the quantized model by the quantization error of ``W_res``;
  :func:`residual_error` measures it per layer and :class:`corda_fast.InitReport` reports it.
- ``"keep"``: the layer becomes a plain ``nn.Linear`` holding ``W_res`` in the compute dtype — the output at
  initialisation equals the quantized model's up to that dtype's rounding, at the memory of an unquantized layer.

Note (PEFT's caveat): ``Q(W_res) + B·A ≠ Q(W) + 0``; CorDA's KPM components are small, so the extra error is the
quantization noise of a slightly different matrix, not of the adapted part.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

SUPPORTED = ("bitsandbytes 4-bit (Linear4bit, nf4/fp4) and torchao quantized weight tensors (e.g. "
             "Int8WeightOnlyConfig)")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class UnsupportedQuantization(ValueError):
    """A targeted layer's weights are quantized in a format corda_fast cannot dequantize."""


def _is_torchao(weight) -> bool:
    mod = type(weight).__module__ or ""
    return mod.startswith("torchao") and callable(getattr(weight, "dequantize", None))


def kind(module: nn.Module) -> Optional[str]:
    """``None`` for a float weight, ``"bnb4"`` or ``"torchao"`` for a supported quantized one; raises
    :class:`UnsupportedQuantization` (message without the layer name; the caller adds it) otherwise."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    cls = type(weight).__name__
    if cls == "Params4bit":
        if getattr(weight, "quant_state", None) is None:
            raise UnsupportedQuantization("bitsandbytes Params4bit that is not quantized yet (move the model to its "
                                          "device first)")
        return "bnb4"
    if "bitsandbytes" in (type(module).__module__ or "") or cls == "Int8Params":
        raise UnsupportedQuantization(f"bitsandbytes {cls} ({type(module).__name__}); supported: {SUPPORTED}")
    if _is_torchao(weight) or _is_torchao(getattr(weight, "data", None)):
        return "torchao"
    if weight.dtype not in _FLOAT_DTYPES:
        raise UnsupportedQuantization(f"dtype {weight.dtype}; supported: {SUPPORTED}")
    if type(weight.data) is not torch.Tensor:
        raise UnsupportedQuantization(f"tensor subclass {type(weight.data).__name__}; supported: {SUPPORTED}")
    return None


def shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a quantized linear (packed storage has another shape)."""
    if kind(module) == "bnb4":
        return int(module.out_features), int(module.in_features)
    return tuple(module.weight.shape)


def _bnb_settings(weight) -> dict:
    """quant type, blocksize, double quantization and original dtype of a 4-bit weight, also after bitsandbytes'
    CPU inference repacking (which rewrites its quant_state in place)."""
    qs = weight.quant_state
    packed = getattr(qs, "packing_format_for_cpu", False)
    return {"quant_type": qs.quant_type, "blocksize": qs.blocksize,
            "nested": bool(qs.original_nested if packed else qs.nested),
            "dtype": qs.original_dtype if packed else qs.dtype}


def _bnb_unpacked(weight):
    """``(packed 4-bit codes, QuantState)`` in bitsandbytes' standard layout. On CPU, the first forward in eval mode
    repacks a Linear4bit in place for a bf16 kernel (codes re-laid out, absmax rounded to bf16 and transposed,
    double quantization undone), after which ``dequantize_4bit`` on the stored data is wrong; this undoes the
    layout on a copy, keeping the bf16-rounded absmax the layer now computes with."""
    qs = weight.quant_state
    if not getattr(qs, "packing_format_for_cpu", False):
        return weight.data, qs
    import copy

    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = copy.deepcopy(qs)
    state.original_nested = False  # keep the float absmax rather than re-quantizing it
    codes, state = _convert_weight_packed_for_cpu_inverse(weight.data.clone(), state)
    state.absmax = qs.absmax.t().reshape(-1).float().contiguous()
    state.nested = False
    return codes, state


def describe(module: nn.Module) -> str:
    k = kind(module)
    if k == "bnb4":
        st = _bnb_settings(module.weight)
        return f"bitsandbytes {st['quant_type']} blocksize {st['blocksize']}" + (" double-quant" if st["nested"] else "")
    if k == "torchao":
        return f"torchao {type(module.weight).__name__}"
    return "float"


def dequantize(module: nn.Module) -> torch.Tensor:
    """``deq(Q(W))`` as a new ``(d_out, d_in)`` tensor in the layer's original dtype."""
    k = kind(module)
    w = module.weight
    if k == "bnb4":
        import bitsandbytes.functional as bnbf

        codes, state = _bnb_unpacked(w)
        return bnbf.dequantize_4bit(codes, state)
    if k == "torchao":
        return w.dequantize()
    return w.detach()


def store_residual(module: nn.Module, w_res: torch.Tensor, requantize_config: Any = None) -> None:
    """Write ``w_res`` (``(d_out, d_in)``) into a quantized ``module`` in its own format, in place."""
    k = kind(module)
    old = module.weight
    if k == "bnb4":
        import bitsandbytes as bnb

        st = _bnb_settings(old)
        new = bnb.nn.Params4bit(w_res.detach().to(st["dtype"]).cpu().contiguous(), requires_grad=False,
                                blocksize=st["blocksize"], compress_statistics=st["nested"],
                                quant_type=st["quant_type"], quant_storage=old.quant_storage, module=module)
        module.weight = new.to(old.device)  # quantizes
        return
    if k == "torchao":
        if requantize_config is None:
            raise UnsupportedQuantization(
                "a torchao weight does not record the config that quantized it: pass requantize_config=<the torchao "
                "config, e.g. Int8WeightOnlyConfig()> or quantized_residual='keep'")
        from torchao.quantization import quantize_

        tmp = nn.Linear(w_res.shape[1], w_res.shape[0], bias=False, device=w_res.device, dtype=w_res.dtype)
        tmp.weight.data = w_res.detach().contiguous()
        quantize_(tmp, requantize_config)
        module.weight = tmp.weight
        return
    raise ValueError("store_residual: the layer is not quantized")


def float_linear(module: nn.Module, w: torch.Tensor) -> nn.Linear:
    """A plain ``nn.Linear`` with weight ``w`` (``(d_out, d_in)``, its dtype) and the module's bias."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=getattr(module, "bias", None) is not None, device="meta")
    lin.weight = nn.Parameter(w.detach().contiguous(), requires_grad=False)
    if lin.bias is not None:
        lin.bias = nn.Parameter(module.bias.detach().to(w.dtype).clone(), requires_grad=module.bias.requires_grad)
    return lin


@torch.no_grad()
def residual_error(module: nn.Module, w_q: torch.Tensor, delta: torch.Tensor) -> dict:
    """How far the adapted layer is from the quantized model it came from: ``‖W_now + ΔW − W_q‖ / ‖W_q‖`` (Frobenius,
    float64), with ``W_now`` what the layer stores now; and the quantization noise of the residual itself."""
    w_now = dequantize(module).double()
    w_q = w_q.double().to(w_now.device)
    delta = delta.double().to(w_now.device)
    w_res = w_q - delta
    return {"model_vs_quantized": float(torch.linalg.norm(w_now + delta - w_q) / torch.linalg.norm(w_q)),
            "residual_quantization": float(torch.linalg.norm(w_now - w_res) / torch.linalg.norm(w_res))}
