"""The one registration path of kernels, and the one place a kernel is chosen for an op.

Each op is defined once, where its reference lives (``covariance.py``, ``lowrank.py``, ``linalg.py``): a
``torch.library`` schema, a fake (shape-only) implementation and a pure-torch default kernel, which is the CPU path
and the test oracle. :func:`define` records it here under the backend name ``"torch"``. Compiled kernels live in
``backends/`` (``triton.py``, ``native.py``); each backend module calls :func:`register` for every kernel it can
offer in this process, or :func:`unavailable` with the reason it cannot (not installed, not built). Nothing else
reaches a compiled kernel: callers go through ``corda_fast.ops`` (``xtx_accumulate``, ``lowrank_gemm``,
``damped_cholesky``, ``batched_decompose``), which asks :func:`choose` and runs the choice with :func:`run`.

A kernel registered as the automatic choice on CUDA also becomes the CUDA kernel of the ``torch.ops.corda_fast.*``
op, so ``torch.compile`` traces it through the op's fake and the dispatcher reaches the same kernel as
:func:`choose`.

``CORDA_FAST_BACKEND`` chooses among registrations only: ``auto`` (default) or a comma-separated list of backend
names (``torch``, ``triton``, ``native``). For each op, the first listed backend that the op has is forced (a
:class:`BackendError` naming why if it cannot run here); ops that have none of the listed backends choose
automatically. So ``torch`` runs every reference, ``triton`` forces the Triton kernels (e.g. under the CPU
interpreter, ``TRITON_INTERPRET=1``), ``native`` forces the C++ kernels on any device they were built for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

BACKEND_ENV = "CORDA_FAST_BACKEND"
BACKENDS = ("torch", "triton", "native")


class BackendError(RuntimeError):
    """A forced kernel that is unknown or cannot run here."""


@dataclass(frozen=True)
class Kernel:
    """One registered kernel of an op.

    ``devices``: device types it runs on; ``auto``: device types where it is chosen without being forced;
    ``accumulates``: accumulator dtypes it supports (``None``: any; only ``xtx_accumulate`` has an accumulator).
    """

    op: str
    backend: str
    fn: Callable
    devices: tuple[str, ...]
    auto: tuple[str, ...] = ()
    accumulates: Optional[tuple[torch.dtype, ...]] = None


_OPS: dict[str, Any] = {}  # op name -> its torch.library custom op
_KERNELS: dict[str, dict[str, Kernel]] = {}  # op name -> {backend: kernel}
_MISSING: dict[str, dict[str, str]] = {}  # op name -> {backend: why it is not registered}


def define(name: str, custom_op, reference: Callable) -> None:
    """Record op ``name`` (``corda_fast::name``) with its pure-torch ``reference`` as the ``"torch"`` kernel."""
    _OPS[name] = custom_op
    _KERNELS[name] = {"torch": Kernel(name, "torch", reference, ("*",))}
    _MISSING.setdefault(name, {})


def register(op: str, backend: str, fn: Callable, devices: tuple[str, ...], auto: tuple[str, ...] = (),
             accumulates: Optional[tuple[torch.dtype, ...]] = None) -> None:
    """Register ``fn`` as ``backend``'s kernel of ``op`` on ``devices``; automatic on the ``auto`` device types.
    On CUDA the automatic kernel also becomes the CUDA kernel of the op itself."""
    if op not in _OPS:
        raise KeyError(f"unknown op {op!r}; ops: {sorted(_OPS)}")
    if backend not in BACKENDS or backend == "torch":
        raise ValueError(f"backend {backend!r}: expected one of {BACKENDS[1:]}")
    if backend in _KERNELS[op]:
        raise ValueError(f"{backend!r} already registered a kernel for {op}")
    _KERNELS[op][backend] = Kernel(op, backend, fn, tuple(devices), tuple(auto), accumulates)
    _MISSING[op].pop(backend, None)
    if "cuda" in auto:
        _OPS[op].register_kernel("cuda")(fn)


def unavailable(op: str, backend: str, why: str) -> None:
    """Record that ``backend`` has a kernel of ``op`` that cannot be registered in this process, and why."""
    if backend not in _KERNELS.get(op, {}):
        _MISSING.setdefault(op, {})[backend] = why


def forced() -> list[str]:
    """The backends ``CORDA_FAST_BACKEND`` lists, in order (empty for ``auto``)."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value == "auto":
        return []
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise BackendError(f"{BACKEND_ENV}={value!r}: {unknown[0] if unknown else value!r} is not a backend; "
                           f"expected 'auto' or a comma-separated list of {BACKENDS}.")
    return names


def _why_not(kernel: Kernel, device_type: str, accumulate: Optional[torch.dtype]) -> Optional[str]:
    """None if ``kernel`` runs on ``device_type`` with that accumulator dtype, else why not."""
    if "*" not in kernel.devices and device_type not in kernel.devices:
        return (f"it is registered for {', '.join(kernel.devices)}, not {device_type}"
                + (" (Triton runs on CPU only under TRITON_INTERPRET=1, set before triton is imported)"
                   if kernel.backend == "triton" and device_type == "cpu" else ""))
    if kernel.accumulates is not None and accumulate is not None and accumulate not in kernel.accumulates:
        names = ", ".join(str(d).replace("torch.", "") for d in kernel.accumulates)
        return f"it accumulates in {names} only (precision='float64' needs the torch kernel)"
    return None


def why_not(op: str, backend: str, device=None, accumulate_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None if ``backend``'s kernel of ``op`` can run on ``device`` (default: CUDA when there is one, else CPU) with
    that accumulator dtype, else why not."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kernel = _KERNELS[op].get(backend)
    if kernel is None:
        return _MISSING[op].get(backend, f"{op} has no {backend!r} kernel")
    return _why_not(kernel, torch.device(device).type, accumulate_dtype)


def choose(op: str, device=None, accumulate_dtype: Optional[torch.dtype] = None) -> str:
    """The backend (``"torch"``, ``"triton"`` or ``"native"``) whose kernel ``op`` runs for tensors on ``device``.

    ``accumulate_dtype`` matters for ``xtx_accumulate`` only (its Triton kernel accumulates in float32).
    Raises :class:`BackendError` when ``CORDA_FAST_BACKEND`` forces a kernel that cannot run here.
    """
    if op not in _KERNELS:
        raise KeyError(f"unknown op {op!r}; ops: {sorted(_KERNELS)}")
    device_type = torch.device(device).type if device is not None else "cpu"
    own = set(_KERNELS[op]) | set(_MISSING[op])
    wanted = next((b for b in forced() if b in own), None)
    if wanted is None:
        for kernel in _KERNELS[op].values():
            if device_type in kernel.auto and _why_not(kernel, device_type, accumulate_dtype) is None:
                return kernel.backend
        return "torch"
    why = why_not(op, wanted, device_type, accumulate_dtype)
    if why is not None:
        raise BackendError(f"{BACKEND_ENV} forces the {wanted!r} kernel of {op}, which cannot run here: {why}.")
    return wanted


def run(op: str, backend: str, *args):
    """Run ``backend``'s kernel of ``op``. On CUDA the automatic kernel is reached through the op itself (opaque to
    ``torch.compile``, traced by its fake); any other choice calls the kernel directly."""
    kernel = _KERNELS[op].get(backend)
    if kernel is None:
        raise BackendError(f"{op} has no {backend!r} kernel here: {_MISSING[op].get(backend, 'not registered')}.")
    first = args[0]
    if backend != "torch" and first.is_cuda and "cuda" in kernel.auto:
        return _OPS[op](*args)
    return kernel.fn(*args)


def available() -> dict[str, bool]:
    """Which backends registered a kernel of some op in this process (``torch``: always)."""
    have = {b for kernels in _KERNELS.values() for b in kernels}
    return {b: b in have for b in BACKENDS}


def registrations() -> dict[str, dict[str, str]]:
    """``{op: {backend: "devices ..." or "unavailable: why"}}`` (``python -m corda_fast env``)."""
    out: dict[str, dict[str, str]] = {}
    for op, kernels in _KERNELS.items():
        row = {b: ("any device" if "*" in k.devices else "on " + ", ".join(k.devices))
               + (f"; automatic on {', '.join(k.auto)}" if k.auto else "") for b, k in kernels.items()}
        row.update({b: f"unavailable: {why}" for b, why in _MISSING[op].items()})
        out[op] = row
    return out


def describe(device=None) -> dict[str, str]:
    """``{op: backend}`` for tensors on ``device``; errors become strings."""
    out = {}
    for op in _KERNELS:
        try:
            out[op] = choose(op, device)
        except BackendError as exc:
            out[op] = f"error: {exc}"
    return out
