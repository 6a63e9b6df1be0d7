"""Fingerprints: what a statistics cache records to know it belongs to a model and to the calibration data.

- :func:`model_fingerprint` — a cheap identity of a model's configuration *and* weights (offloaded weights are
  identified through ``offload`` without being loaded).
- :func:`sample_digests` / :func:`combine_digests` — one digest per calibration sample, combined independently of
  order, batching, padding side and split over ranks (as the statistics themselves are).
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

import torch
from torch import nn

from . import distributed, offload

_VOLATILE_CONFIG = ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset",
                    "_attn_implementation_internal", "name_or_path")


def _config_text(model: nn.Module) -> str:
    """The model's configuration as text: a transformers config (without fields that name the checkpoint's location
    or the library version), else the module tree (types and their ``extra_repr``)."""
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        try:
            d = {k: v for k, v in to_dict().items() if k not in _VOLATILE_CONFIG}
            return json.dumps(d, sort_keys=True, default=str)
        except Exception:  # an exotic config: fall back to the module tree
            pass
    return "\n".join(f"{n}:{type(m).__name__}({m.extra_repr()})" for n, m in model.named_modules())


def _sample(data: torch.Tensor) -> bytes:
    flat = data.detach().reshape(-1)
    step = max(1, flat.numel() // 64)
    return flat[::step][:64].to(torch.float64).cpu().numpy().tobytes()


def model_fingerprint(model: nn.Module) -> str:
    """A cheap identity of a model's configuration *and* weights (class, config — e.g. the activation function —,
    every parameter's name, shape, dtype and a strided sample of its values; for a weight an accelerate hook keeps
    offloaded, its sample if in host memory, else the identity of the file it is read from). Statistics depend on
    every upstream weight and on how the model computes, so all of them count."""
    h = hashlib.sha256(type(model).__name__.encode())
    h.update(_config_text(model).encode())
    seen: set = set()  # a tied parameter counts once, under its first name (as named_parameters() gives it)
    for mod_name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{local}" if mod_name else local
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            data = p.data
            if data.device.type == "meta":
                h.update(offload.offloaded_identity(module, local, _sample))
                continue
            if type(data) is not torch.Tensor:  # quantized tensor subclass (torchao): hash its values
                data = data.dequantize() if callable(getattr(data, "dequantize", None)) else None
                if data is None:
                    h.update(type(p.data).__name__.encode())
                    continue
            h.update(_sample(data))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- data
def sample_digests(digests: list, kwargs: dict, mask: Optional[torch.Tensor]) -> None:
    """Append one digest per sample of a batch: its real tokens (or embeddings) and which of them enter the
    statistics. Sorted and combined (:func:`combine_digests`), they fingerprint the data whatever its order,
    batching, padding side or split over ranks — as the statistics themselves."""
    x = (kwargs["input_ids"] if "input_ids" in kwargs else kwargs["inputs_embeds"]).detach().cpu()
    attn = kwargs.get("attention_mask")
    real = (attn.detach().cpu() != 0) if torch.is_tensor(attn) and tuple(attn.shape) == tuple(x.shape[:2]) \
        else torch.ones(x.shape[:2], dtype=torch.bool)
    # multimodal inputs (pixel_values, image_grid_thw, ...) are folded into each sample's digest; text batches keep
    # the digests they always had (caches written before stay valid)
    extra = hashlib.sha256()
    extra_keys = sorted(k for k, v in kwargs.items() if torch.is_tensor(v) and k not in (
        "input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids"))
    for key in extra_keys:
        v = kwargs[key].detach().cpu().contiguous()
        extra.update(f"{key}:{v.dtype}:{tuple(v.shape)}".encode())
        extra.update(v.view(torch.uint8).numpy().tobytes())
    for r in range(x.shape[0]):
        keep = None if mask is None else (mask[r][real[r]] != 0)
        if keep is not None and not bool(keep.any()):
            continue  # enters no statistic (a sampler's padding repeat, a fully masked sample)
        h = hashlib.sha256(f"{x.dtype}:{tuple(x.shape[2:])}".encode())
        h.update(x[r][real[r]].contiguous().view(torch.uint8).numpy().tobytes())
        if keep is not None:
            h.update(keep.numpy().tobytes())
        if extra_keys:
            h.update(extra.digest())
        digests.append(h.digest())


def combine_digests(digests: list, multi: bool) -> str:
    """The fingerprint of the samples' digests (every rank's, when distributed): order-independent."""
    if multi:
        digests = [d for rank in distributed.gather_objects(digests) for d in rank]
    return hashlib.sha256(b"".join(sorted(digests))).hexdigest()
