"""Checks that run before anything changes, and the snapshot that undoes a change that fails.

:func:`preflight` is called by ``init_adapters`` before the first forward pass: every check that can be made up front
is made there (existing adapters, the task type, shared weights, writable output and cache paths, the cache's
compatibility), so a mistake costs seconds, not a calibration. :class:`ModelSnapshot` records what the PEFT wrapping
changes on the user's model (each parameter's ``requires_grad``, each module's mode) so that a failure after the
wrapping (saving the initial adapter, fusing) leaves the model exactly as it was.
"""

from __future__ import annotations

import os
from typing import Optional

from torch import nn

from . import offload
from .config import CordaConfig, CordaConfigError
from .targets import Target, TargetError


class AdapterError(ValueError):
    """The model already carries LoRA adapters."""


def check_no_adapters(model: nn.Module) -> None:
    """Refuse a model that already has LoRA layers (a ``PeftModel``, or the base object of an earlier call)."""
    if hasattr(model, "peft_config") or type(model).__name__.startswith("PeftModel"):
        where = "it is a PEFT model" if type(model).__name__.startswith("PeftModel") else "it has a peft_config"
    else:
        found = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
        if not found:
            return
        where = f"LoRA layers at {found[:3]}" + (" ..." if len(found) > 3 else "")
    raise AdapterError(
        f"the model already has LoRA adapters ({where}). CorDA initialises adapters on a base model: pass the base "
        "model itself — `peft_model.unload()` gives it back without the adapters (keeping a CorDA residual in its "
        "weights), `peft_model.merge_and_unload()` folds trained adapters in — or load the base model again.")


def check_task_type(task_type: Optional[str]) -> None:
    """``task_type`` must be one of PEFT's task types (a typo would otherwise fail after calibration)."""
    if task_type is None:
        return
    from peft import TaskType

    allowed = tuple(t.value for t in TaskType)
    if task_type not in allowed:
        raise CordaConfigError(f"LoraConfig.task_type={task_type!r} is invalid: expected None or one of {allowed}.")


def check_shared_weights(model: nn.Module, targets: list[Target]) -> None:
    """A targeted layer whose weight is also another module's (tied embeddings and LM head, weight sharing) would
    get its residual written into that other module: refuse it, naming both."""
    owners: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    for t in targets:
        weight = getattr(t.module, "weight", None)
        names = sorted(set(owners.get(id(weight), [])))
        others = [n for n in names if n != f"{t.name}.weight"]
        if others:
            targeted = {f"{u.name}.weight" for u in targets}
            also = [n for n in others if n in targeted]
            raise TargetError(
                f"layer '{t.name}' shares its weight with {others[:3]}"
                + (" (also targeted)" if also else "") + ": its residual W − s·B·A would be written into "
                + ("both layers" if also else "that module too") + ". Exclude one of them (exclude_modules / "
                "target_modules) or untie the weights first (e.g. clone the LM head's weight).")


def check_experts(model: nn.Module, targets: list[Target], lora, config: CordaConfig) -> None:
    """Expert parameters (``target_parameters``) with what cannot serve them, refused by name with the reason."""
    experts = [t for t in targets if t.expert is not None]
    if not experts:
        return
    first = experts[0].param_key
    if config.plus is not None:
        raise CordaConfigError(
            f"CorDA++ (corda_config.plus) with expert parameters ('{first}', ...): PEFT's ParamWrapper holds one rank "
            "for all experts of a parameter, while CorDA++ allocates a rank per layer — per expert here — and would "
            "need ranks PEFT cannot store. Use CorDA (plus=None) for expert parameters, or CorDA++ on target_modules.")
    if lora.lora_dropout:
        raise CordaConfigError(f"lora_dropout={lora.lora_dropout} with expert parameters ('{first}', ...): PEFT's "
                               "ParamWrapper cannot apply dropout to a parameter's input; set lora_dropout=0.")
    if offload.is_dispatched(model):
        raise offload.OffloadError(
            f"expert parameters ('{first}', ...) in a model accelerate dispatched (device_map): their residuals are "
            "not written through offload hooks. Load the model on one device (streaming=True bounds the statistics' "
            "memory to one block), or sequential onloading (streaming=True, onload_device=...).")


def check_offload(model: nn.Module, targets: list[Target], config: CordaConfig) -> dict:
    """Models accelerate dispatched (``device_map``) and sequential onloading: the combinations that cannot work are
    refused by name, and the residual store a disk-offloaded model needs is found (nothing is written). Returns how
    many targeted weights live in the module, in host memory and on disk."""
    where = {"module": 0, "host": 0, "disk": 0}
    for t in targets:
        where[offload.location(t.module)] += 1
    dispatched = offload.is_dispatched(model)
    onload = config.calibration.onload_device
    if onload is not None:
        if dispatched:
            raise offload.OffloadError(
                "CalibrationConfig.onload_device is for a model held in host memory; this one is dispatched by "
                "accelerate (device_map), whose hooks already move each module to its execution device: drop "
                "onload_device.")
        if config.calibration.streaming is not True:
            raise offload.OffloadError("CalibrationConfig.onload_device moves one block at a time to the device: it "
                                       "needs streaming=True.")
        if any(t.quant is not None for t in targets):
            raise offload.OffloadError("CalibrationConfig.onload_device does not move quantized layers (their "
                                       "quantization state stays behind): load the quantized model on its device.")
    if dispatched and any(t.quant is not None for t in targets):
        raise offload.OffloadError("quantized layers in a model accelerate dispatched are not supported: load the "
                                   "quantized model on one device, or the float model with a device_map.")
    if where["disk"]:
        store = offload.residual_store(model, [(t.name, t.module) for t in targets], config.residual_folder)
        check_writable(store.parent, "CordaConfig.residual_folder folder")
    return where


def check_spill(targets: list[Target], config: CordaConfig) -> None:
    """The build's spill file (``CordaConfig.spill`` ``"auto"`` / ``"disk"``) fits where it goes: its folder is
    writable and has room for the originals of the targeted weights held in host memory (plus 5%)."""
    import shutil
    import tempfile

    if config.spill not in ("auto", "disk"):
        return
    held = [t for t in targets if t.expert is None and t.quant is None and offload.location(t.module) == "module"]
    tensors = [t.module.weight for t in held]
    tensors += list({t.param_key: getattr(t.module, t.param_name) for t in targets if t.expert is not None}.values())
    need = sum(w.numel() * w.element_size() for w in tensors
               if config.spill == "disk" or w.device.type == "cpu")
    if not need:
        return
    folder = config.spill_folder or tempfile.gettempdir()
    check_writable(folder, "CordaConfig.spill_folder folder")
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(os.path.abspath(probe))
    free = shutil.disk_usage(probe).free
    if free < need * 1.05:
        raise OSError(f"the build spills the originals of the targeted weights ({need / 2**30:.2f} GiB) to '{folder}', "
                      f"which has {free / 2**30:.2f} GiB free: set CordaConfig.spill_folder to a larger disk, or "
                      "spill='host' (a copy in host memory) / 'memory' (beside each weight).")


def check_writable(path: Optional[str], what: str) -> None:
    """``path`` (a file, or a folder when ``what`` ends in "folder") can be written: an existing one is of the
    right kind and writable, a new one's nearest existing parent is a writable folder."""
    if path is None:
        return
    path = os.path.abspath(os.fspath(path))
    wants_folder = what.endswith("folder")
    if os.path.exists(path):
        if wants_folder != os.path.isdir(path):
            raise ValueError(f"{what} '{path}' exists and is " + ("not a folder." if wants_folder else "a folder."))
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{what} '{path}' cannot be written (no write permission). Choose another path.")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} '{path}' cannot be written: '{parent}' is not a writable folder. Choose "
                              "another path.")


class ModelSnapshot:
    """What wrapping a model in PEFT changes besides its layers and weights: every parameter's ``requires_grad``
    and every module's ``training`` flag. :meth:`restore` puts them back."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.modes = [(m, m.training) for m in model.modules()]

    def restore(self) -> None:
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        for m, mode in self.modes:
            m.training = mode
