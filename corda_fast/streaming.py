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

import logging
import time
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import nn

from .calibrate import (CalibrationError, CovarianceStats, _Collector, _forward_runner, _model_device,
                        finish_statistics, iter_batches, model_fingerprint)
from . import distributed
from .config import CordaConfig
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


@torch.no_grad()
def iter_block_statistics(model: nn.Module, loader: Any, config: CordaConfig, targets: list[Target],
                          cache_device: Optional[torch.device] = None) -> Iterator[CovarianceStats]:
    """Yield one :class:`CovarianceStats` per block that holds targets, in model order.

    Args:
        model, loader, config, targets: as :func:`corda_fast.collect_covariance` (loader must be iterable).
        cache_device: where block inputs are kept between blocks (default: the model's device; ``"cpu"`` frees
            accelerator memory at the cost of transfers).
    The model is left as it was (hooks removed, mode restored) whatever happens, including when the consumer
    stops early.
    """
    device = _model_device(model)
    multi = distributed.is_active(config.distributed)
    cache_device = torch.device(cache_device) if cache_device is not None else device
    prefix, blocks = find_blocks(model, targets)
    fingerprint = model_fingerprint(model)
    was_training = model.training
    handles = []
    t0 = time.perf_counter()
    try:
        model.eval()
        # 1. inputs of the first block, for every batch
        cached: list[tuple[int, Optional[torch.Tensor], tuple, dict]] = []
        current: dict = {}

        def capture(module, args, kwargs):
            current["args"], current["kwargs"] = _to(args, cache_device), _to(kwargs, cache_device)
            raise _StopForward

        handles.append(blocks[0].register_forward_pre_hook(capture, with_kwargs=True))
        run = _forward_runner(model, targets)
        with distributed.stage(multi, "calibration (caching block inputs)"):
            for i, kwargs, mask in iter_batches(loader, config, device, "caching block inputs"):
                current.clear()
                try:
                    run(kwargs)
                except _StopForward:
                    pass
                if "args" not in current:
                    raise CalibrationError(f"the first block '{prefix}.0' did not run on calibration batch {i}.")
                cached.append((i, mask, current["args"], current["kwargs"]))
        handles.pop().remove()
        total = len(cached)
        if multi:
            counts = torch.tensor([len(cached)], dtype=torch.int64, device=distributed._comm_device())
            torch.distributed.all_reduce(counts)
            total = int(counts.item())
        if not total:
            raise CalibrationError("the calibration loader yielded no batches; give it at least one batch of samples."
                                   + (" (on every rank)" if multi else ""))

        # 2. block by block
        for b, block in enumerate(blocks):
            block_targets = [t for t in targets if t.name.startswith(f"{prefix}.{b}.")]
            collector = _Collector(block_targets, config, device)
            for t in block_targets:
                handles.append(t.module.register_forward_pre_hook(collector.hook, with_kwargs=True))
            try:
                with distributed.stage(multi, f"calibration of block '{prefix}.{b}'"):
                    for n, (i, mask, args, kwargs) in enumerate(cached):
                        collector.start_batch(i, mask)
                        out = block(*_to(args, device), **_to(kwargs, device))
                        collector.record_finite()
                        collector.end_batch()
                        if b + 1 < len(blocks):
                            hidden = _to(out[0] if isinstance(out, (tuple, list)) else out, cache_device)
                            if args:
                                args = (hidden,) + tuple(args[1:])
                            elif "hidden_states" in kwargs:
                                kwargs = {**kwargs, "hidden_states": hidden}
                            else:
                                raise CalibrationError(
                                    f"cannot tell which input of block '{prefix}.{b}' is its hidden state.")
                            cached[n] = (i, mask, args, kwargs)
                    collector.check_finite()
            finally:
                while handles:
                    handles.pop().remove()
            if multi:
                distributed.sync_collector(collector, len(cached))
            if block_targets:
                stats = finish_statistics(collector, block_targets, config, fingerprint, total, t0)
                stats.meta["block"] = f"{prefix}.{b}"
                yield stats
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def collect_covariance_streaming(model: nn.Module, loader: Any, config: CordaConfig, targets: list[Target],
                                 cache_device=None) -> CovarianceStats:
    """All blocks' statistics gathered from :func:`iter_block_statistics` (for tests and caches; the memory
    bound only holds when the consumer frees each block's statistics, as ``init_adapters(streaming=True)``)."""
    merged: Optional[CovarianceStats] = None
    for stats in iter_block_statistics(model, loader, config, targets, cache_device):
        if merged is None:
            merged = stats
            merged.meta.pop("block", None)
            continue
        merged.sums.update(stats.sums)
        merged.n_samples.update(stats.n_samples)
        merged.n_tokens.update(stats.n_tokens)
        merged.members.update(stats.members)
    merged.meta["model_class"] = type(model).__name__
    return merged
