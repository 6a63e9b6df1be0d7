"""Models bigger than the device, or than memory: accelerate-dispatched models and sequential onloading.

A model loaded with ``from_pretrained(..., device_map=..., max_memory=..., offload_folder=...)`` keeps the weights of
offloaded modules out of the module (its parameters are on the ``meta`` device) and an accelerate hook
(``module._hf_hook``, an ``AlignDevicesHook`` with ``offload=True``) loads them from a *weights map* for each
forward: host memory (``cpu`` offload) or disk (the checkpoint's own safetensors files, or ``.dat`` files in the
offload folder). This module reads and replaces those weights without materialising the model:

- :func:`read_tensor` — a module's tensor wherever it lives (only that tensor is loaded);
- :func:`store_residual` — puts ``W_res`` where an offloaded ``W`` lived: into the host weights map (``cpu``
  offload), or into a :class:`ResidualStore` of its own on disk (never the user's checkpoint), pointing the hook at
  it; returns the undo (weights held by their module are written by the caller);
- :func:`iter_state` — the model's tensors one at a time (for writing a checkpoint block by block).

Nothing here imports PEFT or the rest of the package; accelerate is only needed when a model carries its hooks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from typing import Callable, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

META = torch.device("meta")


class OffloadError(ValueError):
    """An offloaded model cannot be handled as asked (names the module and what to do)."""


# ---------------------------------------------------------------------------------------------------- inspection
def _hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])  # SequentialHook holds several


def offload_hook(module: nn.Module):
    """The accelerate hook that loads ``module``'s own weights for each forward, or ``None``."""
    for h in _hooks(module):
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def is_offloaded(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` is held by an accelerate hook rather than by the module (it is on ``meta``)."""
    t = getattr(module, name, None)
    return t is not None and t.device == META and offload_hook(module) is not None


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate has dispatched ``model`` (``device_map``): some module carries an accelerate hook."""
    return getattr(model, "hf_device_map", None) is not None or any(_hooks(m) for m in model.modules())


def execution_device(module: nn.Module) -> Optional[torch.device]:
    """The device an accelerate hook runs ``module`` on, if any."""
    for h in _hooks(module):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    return None


def model_execution_device(model: nn.Module) -> torch.device:
    """Where a forward of ``model`` starts: its first real (non-meta) parameter's device, else its hooks'."""
    for p in model.parameters():
        if p.device != META:
            return p.device
    for m in model.modules():
        dev = execution_device(m)
        if dev is not None:
            return dev
    return torch.device("cpu")


def _where(hook, name: str) -> tuple[str, object, str]:
    """``(kind, container, key)`` of an offloaded tensor: kind ``"host"`` (a dict in memory: ``container[key]``)
    or ``"disk"`` (a file)."""
    wm = hook.weights_map
    prefix = getattr(wm, "prefix", "")
    dataset = getattr(wm, "dataset", wm)
    key = prefix + name
    state = getattr(dataset, "state_dict", None)
    if isinstance(state, dict) and key in state:
        return "host", state, key
    if isinstance(dataset, dict):
        return "host", dataset, key
    return "disk", dataset, key


def location(module: nn.Module, name: str = "weight") -> str:
    """``"module"`` (the tensor is in the module, on its device), ``"host"`` (offloaded to host memory) or
    ``"disk"`` (offloaded to disk)."""
    if not is_offloaded(module, name):
        return "module"
    return _where(offload_hook(module), name)[0]


def read_tensor(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """``module.<name>`` as a real tensor: the module's own, or loaded from the hook's weights map (one tensor)."""
    t = getattr(module, name)
    if t.device != META:
        return t
    hook = offload_hook(module)
    if hook is None:
        raise OffloadError(f"{type(module).__name__}.{name} is on the meta device and no accelerate hook holds its "
                           "values: load the model's weights before calibrating.")
    return hook.weights_map[name]


def disk_folders(model: nn.Module) -> list[str]:
    """The offload folders of a dispatched model's disk-offloaded weights (accelerate's ``save_folder``)."""
    found = []
    for m in model.modules():
        h = offload_hook(m)
        if h is None:
            continue
        folder = getattr(getattr(h.weights_map, "dataset", None), "save_folder", None)
        if folder and folder not in found:
            found.append(folder)
    return found


def release_host_memory() -> None:
    """Hand freed heap memory back to the operating system: glibc's ``malloc_trim`` and, where torch's BLAS is MKL,
    the calling thread's cached MKL buffers (a no-op where neither exists). Loading offloaded weights allocates and
    frees many large blocks, and each decomposition leaves its workspaces in the calling thread's allocator and MKL
    pools; without this, resident memory grows with each block instead of staying at one block's worth."""
    global _TRIM, _MKL_FREE
    if _TRIM is None:
        _TRIM, _MKL_FREE = _find_release_functions()
    if _TRIM:
        _TRIM(0)
    if _MKL_FREE:
        _MKL_FREE()  # this thread's buffers only: safe while other threads run MKL


def _find_release_functions():
    import ctypes

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        trim = False
    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        mkl = ctypes.CDLL(lib).mkl_serv_thread_free_buffers if os.path.exists(lib) else False
    except (OSError, AttributeError):
        mkl = False
    return trim, mkl


_TRIM = None
_MKL_FREE = None


# ---------------------------------------------------------------------------------------------------- residual store
def offloaded_identity(module: nn.Module, local: str, sample: Callable[[torch.Tensor], bytes]) -> bytes:
    """Identity of a tensor an accelerate hook holds for ``module`` (its parameter is on ``meta``) without loading it:
    ``sample(tensor)`` when it is in host memory, else the file it is read from (path, tensor name, size, mtime)."""
    for hook in getattr(getattr(module, "_hf_hook", None), "hooks", None) or [getattr(module, "_hf_hook", None)]:
        wm = getattr(hook, "weights_map", None)
        if wm is None:
            continue
        dataset, key = getattr(wm, "dataset", wm), getattr(wm, "prefix", "") + local
        state = dataset if isinstance(dataset, dict) else getattr(dataset, "state_dict", None) or {}
        if key in state:
            return sample(state[key])
        entry = dict(getattr(dataset, "index", {}).get(key, {}))
        path = entry.get("safetensors_file") or os.path.join(getattr(dataset, "save_folder", "") or "", key + ".dat")
        try:
            st = os.stat(path)
            entry.update(size=st.st_size, mtime=st.st_mtime_ns)
        except OSError:
            pass
        return json.dumps({"path": path, **entry}, sort_keys=True, default=str).encode()
    return b"meta"


class ResidualStore:
    """A folder of safetensors files, one per layer, holding residual weights of disk-offloaded layers. The folder
    is a new subfolder of ``parent``, made on the first write (nothing is created before)."""

    def __init__(self, parent: str):
        self.parent = parent
        self.folder: Optional[str] = None

    def path(self, name: str) -> str:
        if self.folder is None:
            os.makedirs(self.parent, exist_ok=True)
            self.folder = tempfile.mkdtemp(prefix="corda_residuals_", dir=self.parent)
            logger.info("residuals of disk-offloaded layers are written to %s (keep it while the model is used)",
                        self.folder)
        return os.path.join(self.folder, re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".safetensors")

    def put(self, name: str, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        save_file({"weight": tensor.detach().contiguous().cpu()}, self.path(name))

    def get(self, name: str) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(self.path(name))["weight"]

    def remove(self, name: str) -> None:
        if self.folder is not None and os.path.exists(self.path(name)):
            os.remove(self.path(name))
            if not os.listdir(self.folder):
                os.rmdir(self.folder)
                self.folder = None


def residual_store(model: nn.Module, modules: list[tuple[str, nn.Module]],
                   folder: Optional[str]) -> Optional[ResidualStore]:
    """The store for the residuals of those ``(name, module)`` whose weight is offloaded to disk: under ``folder``,
    else under the model's offload folder; ``None`` when none is on disk. Raises :class:`OffloadError` (before
    anything is written) when there is nowhere to put them."""
    disk = [name for name, m in modules if location(m) == "disk"]
    if not disk:
        return None
    parent = folder or next(iter(disk_folders(model)), None)
    if parent is None:
        raise OffloadError(f"{len(disk)} targeted layer(s) are offloaded to disk (e.g. '{disk[0]}') and the model "
                           "has no offload folder to hold their residuals: pass CordaConfig(residual_folder=...).")
    return ResidualStore(parent)


class _ResidualMap(Mapping):
    """A hook's weights map with one entry served from a :class:`ResidualStore` (the rest from the original)."""

    def __init__(self, original, name: str, store: ResidualStore, layer: str):
        self.original, self.name, self.store, self.layer = original, name, store, layer

    def __getitem__(self, key):
        return self.store.get(self.layer) if key == self.name else self.original[key]

    def __iter__(self):
        return iter(self.original.keys())

    def __len__(self):
        return len(self.original.keys())


def store_residual(module: nn.Module, w_res: torch.Tensor, layer: str,
                   store: Optional[ResidualStore], spill=None) -> Callable[[], None]:
    """Put ``w_res`` (already in the weight's layout and dtype) in place of an offloaded ``module.weight`` where it
    lives, and return the zero-argument undo. Disk-offloaded weights go to ``store`` (their original files are never
    written); ``store`` may be ``None`` only when none is disk-offloaded. A host-map weight is overwritten in place
    when a ``spill`` (:class:`corda_fast.spill.Spill`) keeps its original, else replaced (the original stays
    referenced by the undo)."""
    kind = location(module)
    if kind == "module":
        raise OffloadError(f"layer '{layer}' holds its weight itself: write the residual into the module.")
    hook = offload_hook(module)
    if kind == "host":
        _, container, key = _where(hook, "weight")
        old = container[key]
        if spill is not None and old.shape == w_res.shape and old.dtype == w_res.dtype:
            spill.keep(layer, old)  # restored by the spill; nothing to undo here
            old.copy_(w_res)
            return lambda: None
        container[key] = w_res.to(old.device)

        def undo_host():
            container[key] = old

        return undo_host
    if store is None:
        raise OffloadError(f"layer '{layer}' is offloaded to disk and no residual store was given.")
    store.put(layer, w_res)
    original = hook.weights_map
    hook.weights_map = _ResidualMap(original, "weight", store, layer)

    def undo_disk():
        hook.weights_map = original
        store.remove(layer)

    return undo_disk


# ---------------------------------------------------------------------------------------------------- iteration
def iter_state(model: nn.Module, rename: Callable[[str], Optional[str]] = lambda n: n
               ) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """``(name, load)`` for every persistent tensor of ``model`` (state-dict names, tied duplicates once), where
    ``load()`` returns the tensor wherever it lives (so a caller holds one block's tensors at a time). ``rename``
    maps a state-dict name to the name to write, or ``None`` to leave it out."""
    seen: set = set()
    modules = dict(model.named_modules())
    for full, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            continue
        seen.add(id(value))
        out = rename(full)
        if out is None:
            continue
        owner, _, local = full.rpartition(".")
        module = modules[owner] if owner else model
        yield out, (lambda module=module, local=local: read_tensor(module, local))
