"""The one place where a kernel is chosen for an op.

Each op (``corda_fast::xtx_accumulate``, ``corda_fast::lowrank_gemm``, ``corda_fast::damped_cholesky``,
``corda_fast::batched_decompose``) has one schema, a pure-torch reference (its default kernel: the CPU path and the
test oracle) and compiled kernels:

=====================  =========================  ===================================================
op                     compiled kernel            chosen automatically for
=====================  =========================  ===================================================
``xtx_accumulate``     ``triton`` (Triton)        CUDA tensors accumulating in float32
``lowrank_gemm``       ``triton`` (Triton)        CUDA tensors
``damped_cholesky``    ``native`` (C++/CUDA)      CUDA tensors, when the extension is built with CUDA
``batched_decompose``  ``native`` (C++/CUDA)      CUDA tensors, when the extension is built with CUDA
=====================  =========================  ===================================================

One environment variable overrides the choice: ``CORDA_FAST_BACKEND`` is ``auto`` (default) or a comma-separated
list of kernels among ``torch``, ``triton``, ``native``. For each op, the first listed kernel that the op has is
forced (an error if it cannot run here: :class:`BackendError`); ops that have none of the listed kernels choose
automatically. So ``torch`` runs every reference, ``triton`` forces the two Triton ops (e.g. under the CPU
interpreter, ``TRITON_INTERPRET=1``), ``native`` forces the C++ ops on any device they were built for.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import native, triton_xtx

BACKEND_ENV = "CORDA_FAST_BACKEND"
KERNELS = ("torch", "triton", "native")
OPS = {
    "xtx_accumulate": ("torch", "triton"),
    "lowrank_gemm": ("torch", "triton"),
    "damped_cholesky": ("torch", "native"),
    "batched_decompose": ("torch", "native"),
}


class BackendError(RuntimeError):
    """A forced kernel that is unknown or cannot run here."""


def forced() -> list[str]:
    """The kernels ``CORDA_FAST_BACKEND`` lists, in order (empty for ``auto``)."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value == "auto":
        return []
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in KERNELS]
    if unknown or not names:
        raise BackendError(f"{BACKEND_ENV}={value!r}: {unknown[0] if unknown else value!r} is not a kernel of this "
                           f"build; expected 'auto' or a comma-separated list of {KERNELS}.")
    return names


def available() -> dict[str, bool]:
    """Which kernels can run in this process (on some device)."""
    return {"torch": True, "triton": triton_xtx.available(), "native": native.HAVE_NATIVE}


def _can_run(kernel: str, device: Optional[torch.device]) -> Optional[str]:
    """None if ``kernel`` can run on ``device``, else why not."""
    is_cuda = device is not None and device.type == "cuda"
    if kernel == "triton":
        if not triton_xtx.HAVE_TRITON:
            return "triton is not installed"
        if not (is_cuda or triton_xtx.INTERPRETING):
            return "Triton needs a CUDA device, or TRITON_INTERPRET=1 set before triton is imported (CPU interpreter)"
    if kernel == "native":
        if not native.HAVE_NATIVE:
            return native.status() + ". Build it with `pip install --no-build-isolation -e .`"
        if is_cuda and "cuda" not in native.BUILD:
            return f"the extension was built for {native.BUILD}, not CUDA"
    return None


def choose(op: str, device=None, accumulate_dtype: torch.dtype = torch.float32) -> str:
    """The kernel (``"torch"``, ``"triton"`` or ``"native"``) that ``op`` uses for tensors on ``device``.

    ``accumulate_dtype`` matters for ``xtx_accumulate`` only: its Triton kernel accumulates in float32.
    Raises :class:`BackendError` when ``CORDA_FAST_BACKEND`` forces a kernel that cannot run here.
    """
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; ops: {sorted(OPS)}")
    device = torch.device(device) if device is not None else None
    own = OPS[op]
    wanted = next((k for k in forced() if k in own), None)
    if wanted is None:  # automatic
        compiled = own[1]
        if device is None or device.type != "cuda" or _can_run(compiled, device) is not None:
            return "torch"
        if op == "xtx_accumulate" and accumulate_dtype != torch.float32:
            return "torch"
        return compiled
    if wanted == "torch":
        return "torch"
    why = _can_run(wanted, device)
    if why is None and op == "xtx_accumulate" and accumulate_dtype != torch.float32:
        why = "its statistic kernel accumulates in float32 (precision='float64' needs the torch kernel)"
    if why is not None:
        raise BackendError(f"{BACKEND_ENV} forces the {wanted!r} kernel of {op}, which cannot run here: {why}.")
    return wanted


def describe(device=None) -> dict[str, str]:
    """``{op: kernel}`` for tensors on ``device`` (``python -m corda_fast env``); errors become strings."""
    out = {}
    for op in OPS:
        try:
            out[op] = choose(op, device)
        except BackendError as exc:
            out[op] = f"error: {exc}"
    return out
