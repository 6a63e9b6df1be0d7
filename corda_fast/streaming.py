"""Streaming calibration: statistics one transformer block at a time, with bounded memory.

The model runs up to its first block once per batch and the block inputs (positional and keyword arguments, i.e.
hidden states, masks, rotary embeddings...) are cached on ``cache_device``. Then, block after block, only that
block's targets are hooked, the block runs on every cached input, its statistics are finalised and handed to the
caller (who typically decomposes and frees them), and the block outputs become the next block's inputs. Peak
statistic memory is one block's worth instead of the whole model's; the activation cache holds one hidden state
per calibration token. Each block sees exactly the inputs it sees in a full forward, so the statistics equal
all-at-once calibration.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed, offload
from .calibrate import (
    CalibrationError,
    Collector,
    batch_lead,
    eval_mode,
    finish_statistics,
    forward_runner,
    iter_batches,
    model_device,
)
from .config import CordaConfig
from .fingerprint import model_fingerprint
from .stats import CovarianceStats
from .targets import Target

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised from the first block's pre-hook once its inputs are captured."""


def find_blocks(model: nn.Module, targets: list[Target]) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of repeated blocks holding the targets (e.g. ``model.layers``, ``transformer.h``,
    ``encoder.layer``). Raises :class:`CalibrationError` if some target lies outside every block."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 1:
            inside = sum(1 for t in targets if t.name.startswith(f"{name}."))
            if best is None or inside > best[2]:
                best = (name, module, inside)
    if best is None or best[2] == 0:
        raise CalibrationError("streaming calibration needs the targets inside an nn.ModuleList of blocks; found none.")
    name, blocks, inside = best
    if inside != len(targets):
        outside = [t.name for t in targets if not t.name.startswith(f"{name}.")]
        raise CalibrationError(
            f"streaming calibration needs every target inside the blocks '{name}.*'; outside: {outside[:5]}. "
            "Exclude them or use streaming=False."
        )
    return name, blocks


def _to(obj: Any, device) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _cache_first_block_inputs(model: nn.Module, loader: Any, config: CordaConfig, targets: list[Target], prefix: str,
                              blocks: nn.ModuleList, device, cache_device, multi: bool) -> tuple[list, int]:
    """Run the model up to its first block on every batch; returns ``([(index, mask, args, kwargs)], total batches
    over ranks)`` with the block inputs on ``cache_device`` (``[(index, mask, (batch, seq), args, kwargs)]``)."""
    cached: list[tuple[int, Optional[torch.Tensor], tuple, tuple, dict]] = []
    current: dict = {}

    def capture(module, args, kwargs):
        current["args"], current["kwargs"] = _to(args, cache_device), _to(kwargs, cache_device)
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        run = forward_runner(model, targets)
        with distributed.stage(multi, "calibration (caching block inputs)"):
            for i, kwargs, mask in iter_batches(loader, config, device, "caching block inputs"):
                current.clear()
                try:
                    run(kwargs)
                except _StopForward:
                    pass
                if "args" not in current:
                    raise CalibrationError(f"the first block '{prefix}.0' did not run on calibration batch {i}.")
                cached.append((i, mask, batch_lead(kwargs), current["args"], current["kwargs"]))
    finally:
        handle.remove()
    total = len(cached)
    if multi:
        total = int(distributed.all_reduce_sum(torch.tensor([total], dtype=torch.int64,
                                                            device=distributed.comm_device())).item())
    if not total:
        raise CalibrationError("the calibration loader yielded no batches; give it at least one batch of samples."
                               + (" (on every rank)" if multi else ""))
    return cached, total


def _run_block(block: nn.Module, name: str, cached: list, collector: Collector, device, cache_device,
               feed_next: bool, trim: bool = False) -> None:
    """Run ``block`` on every cached input (statistics into ``collector``); with ``feed_next`` its outputs replace
    the cached hidden states, as the next block's inputs."""
    for n, (i, mask, lead, args, kwargs) in enumerate(cached):
        collector.start_batch(i, mask, lead)
        out = block(*_to(args, device), **_to(kwargs, device))
        collector.record_finite()
        collector.end_batch()
        if feed_next:
            hidden = _to(out[0] if isinstance(out, (tuple, list)) else out, cache_device)
            if args:
                args = (hidden,) + tuple(args[1:])
            elif "hidden_states" in kwargs:
                kwargs = {**kwargs, "hidden_states": hidden}
            else:
                raise CalibrationError(f"cannot tell which input of block '{name}' is its hidden state.")
            cached[n] = (i, mask, lead, args, kwargs)
        del out
        if trim:  # offloaded weights were loaded and freed for this batch: give the pages back
            offload.release_host_memory()
    collector.check_finite()


@torch.no_grad()
def iter_block_statistics(model: nn.Module, loader: Any, config: CordaConfig, targets: list[Target],
                          cache_device: Optional[torch.device] = None) -> Iterator[CovarianceStats]:
    """Yield one :class:`CovarianceStats` per block that holds targets, in model order.

    Args:
        model, loader, config, targets: as :func:`corda_fast.stages.collect_covariance` (loader must be iterable).
        cache_device: where block inputs are kept between blocks (default: ``config.calibration.cache_device``,
            else the model's device; ``"cpu"`` frees accelerator memory at the cost of transfers).
    The model is left as it was (hooks removed, every module's mode restored) whatever happens, including when the
    consumer stops early.
    """
    device = model_device(model)
    multi = distributed.is_active(config.calibration.distributed)
    onload = config.calibration.onload_device
    onload = torch.device(onload) if onload is not None else None
    cache_device = cache_device if cache_device is not None else config.calibration.cache_device
    cache_device = torch.device(cache_device) if cache_device is not None else device
    block_device = onload if onload is not None else device
    prefix, blocks = find_blocks(model, targets)
    dispatched = offload.is_dispatched(model)
    fingerprint = model_fingerprint(model)
    t0 = time.perf_counter()
    with eval_mode(model):
        cached, total = _cache_first_block_inputs(model, loader, config, targets, prefix, blocks, device,
                                                  cache_device, multi)
        for b, block in enumerate(tqdm(blocks, desc="corda_fast: calibrating block by block", unit="block",
                                       disable=not config.show_progress)):
            block_targets = [t for t in targets if t.name.startswith(f"{prefix}.{b}.")]
            collector = Collector(block_targets, config, block_device)
            handles = [t.module.register_forward_pre_hook(collector.hook, with_kwargs=True) for t in block_targets]
            try:
                with onloaded(block, onload), distributed.stage(multi, f"calibration of block '{prefix}.{b}'"):
                    _run_block(block, f"{prefix}.{b}", cached, collector, block_device, cache_device,
                               b + 1 < len(blocks), trim=dispatched)
            finally:
                for h in handles:
                    h.remove()
            if multi:
                collector.sync_ranks(len(cached))
            if block_targets:
                stats = finish_statistics(collector, block_targets, config, fingerprint, total, t0)
                stats.meta["block"] = f"{prefix}.{b}"
                yield stats
                del stats
            offload.release_host_memory()  # one block's worth of host memory at a time, not a growing heap


@contextlib.contextmanager
def onloaded(block: nn.Module, device: Optional[torch.device]):
    """Sequential onloading: ``block``'s weights on ``device`` for the duration, then back where each was (the same
    Parameter objects, values unchanged), whatever happens."""
    if device is None:
        yield
        return
    homes = {}
    for t in list(block.parameters()) + list(block.buffers()):
        homes.setdefault(id(t), (t, t.data))
    for t, data in homes.values():
        t.data = data.to(device, non_blocking=True)
    try:
        yield
    finally:
        for t, data in homes.values():
            t.data = data
