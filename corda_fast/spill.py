"""The originals of the weights a build overwrites, kept away from the memory that holds the model.

Building the PEFT model writes ``W_res = W − s·B·A`` into each targeted weight *in place*. A failure must put the
model back bit for bit, and ``W_res + s·B·A`` does not round back to ``W``, so each original is copied somewhere
else first — one layer at a time, never two copies of the model:

========  ==========================================================================================================
where     what it costs
========  ==========================================================================================================
``disk``  one temporary file (``spill_folder``, default the system's temporary folder), written layer by layer and
          read back (memory-mapped, one layer at a time) only on failure. The default for weights in host memory.
``host``  a host-memory copy per layer: the default for weights on an accelerator (its memory is what is scarce).
``memory`` a copy next to the weight, on its own device: no disk, but the targeted weights twice (the old peak).
========  ==========================================================================================================

The file is removed when the build is over (success or failure) or, at the latest, when the process exits.
"""

from __future__ import annotations

import logging
import os
import tempfile
import weakref
from typing import Optional

import numpy as np
import torch

from .config import SPILL_MODES

logger = logging.getLogger(__name__)


def _remove(path: Optional[str]) -> None:
    if path and os.path.exists(path):
        try:
            os.remove(path)
        except OSError:  # pragma: no cover - already gone, or a read-only folder
            pass


class Spill:
    """Copies of tensors about to be overwritten in place; :meth:`restore` writes each back into its tensor."""

    def __init__(self, mode: str = "auto", folder: Optional[str] = None):
        if mode not in SPILL_MODES:
            raise ValueError(f"spill mode {mode!r} is invalid: expected one of {SPILL_MODES}.")
        self.mode = mode
        self.folder = folder
        self.path: Optional[str] = None
        self._file = None
        self._entries: dict = {}  # key -> (tensor to restore into, ("file", offset, nbytes) | ("copy", tensor))
        self.bytes_on_disk = 0
        self.bytes_in_memory = 0
        self._finalizer = None

    def _where(self, tensor: torch.Tensor) -> str:
        if self.mode != "auto":
            return self.mode
        return "disk" if tensor.device.type == "cpu" else "host"

    def _open(self) -> None:
        folder = self.folder or tempfile.gettempdir()
        os.makedirs(folder, exist_ok=True)
        fd, self.path = tempfile.mkstemp(prefix="corda_spill_", suffix=".bin", dir=folder)
        self._file = os.fdopen(fd, "wb")
        self._finalizer = weakref.finalize(self, _remove, self.path)

    def keep(self, key: str, tensor: torch.Tensor) -> None:
        """Copy ``tensor``'s values away before it is overwritten in place (once per key: the first copy wins)."""
        if key in self._entries:
            return
        where = self._where(tensor)
        if where == "disk":
            if self._file is None:
                self._open()
            data = tensor.detach().contiguous().cpu()
            raw = data.view(torch.uint8).reshape(-1).numpy() if data.numel() else np.zeros(0, np.uint8)
            offset = self._file.tell()
            self._file.write(memoryview(raw))
            self._entries[key] = (tensor, ("file", offset, raw.nbytes))
            self.bytes_on_disk += raw.nbytes
        else:
            copy = tensor.detach().to("cpu", copy=True) if where == "host" else tensor.detach().clone()
            self._entries[key] = (tensor, ("copy", copy))
            self.bytes_in_memory += copy.numel() * copy.element_size()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def restore(self) -> None:
        """Write every kept copy back into its tensor, bit for bit (latest first)."""
        if self._file is not None and not self._file.closed:
            self._file.flush()
        for key, (tensor, (kind, *rest)) in reversed(list(self._entries.items())):
            if kind == "copy":
                tensor.copy_(rest[0])
                continue
            offset, nbytes = rest
            if nbytes == 0:
                continue
            raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=(nbytes,))
            values = torch.from_numpy(np.array(raw)).view(tensor.dtype).reshape(tensor.shape)
            del raw
            tensor.copy_(values)

    def close(self) -> None:
        """Drop every copy and remove the file."""
        self._entries.clear()
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._finalizer is not None:
            self._finalizer()
        self.path = None
