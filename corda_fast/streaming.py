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
from .block_cache import BlockCache
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
from .fingerprint import combine_digests, model_fingerprint
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
        other = _other_block_list(model, outside, name)
        why = (f" They lie in another list of blocks, '{other}'. Two lists (a vision-language model's vision tower "
               "and language model) are joined by modules that run between them (the projector, the merge of image "
               "features into the token sequence), which streaming does not replay: stream the language model's "
               "targets alone, or calibrate all with streaming=False." if other
               else " Exclude them or use streaming=False.")
        raise CalibrationError(
            f"streaming calibration walks one list of blocks, '{name}.*'; targets outside it: {outside[:5]}." + why)
    return name, blocks


def block_cache(folder: str, model: nn.Module, targets: list[Target], config: CordaConfig) -> BlockCache:
    """The :class:`~corda_fast.block_cache.BlockCache` of ``targets`` (all inside one list of blocks) in ``folder``."""
    prefix, _ = find_blocks(model, targets)
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        by_block.setdefault(int(t.name[len(prefix) + 1:].split(".")[0]), []).append(t)
    return BlockCache(folder, prefix, dict(sorted(by_block.items())), config)


def _other_block_list(model: nn.Module, names: list[str], chosen: str) -> Optional[str]:
    """The name of a ``ModuleList`` other than ``chosen`` that holds some of ``names``, if any."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name != chosen and any(n.startswith(f"{name}.") for n in names):
            return name
    return None


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


def block_kinds(model: nn.Module, blocks: nn.ModuleList) -> list:
    """Each block's kind: ``config.layer_types`` where the model has one entry per block (transformers' hybrids —
    gpt-oss, Gemma 2/3, sliding-window Qwen / Mistral layers — give full and sliding attention layers different
    masks), else one kind for all."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    kinds = getattr(config, "layer_types", None)
    if isinstance(kinds, (list, tuple)) and len(kinds) == len(blocks):
        return list(kinds)
    return [None] * len(blocks)


def _cache_first_block_inputs(model: nn.Module, loader: Any, config: CordaConfig, targets: list[Target], prefix: str,
                              blocks: nn.ModuleList, kinds: list, device, cache_device,
                              multi: bool, digest: Optional[list] = None) -> tuple[list, int]:
    """Run the model up to its first block on every batch — up to the first block of each kind when blocks differ
    (their masks do) — and return ``([(index, mask, (batch, seq), args, kwargs, {kind: (args, kwargs)})], total
    batches over ranks)`` with the inputs on ``cache_device``: block 0's are the stream's start, each other kind's
    give that kind's masks and positions."""
    cached: list = []
    current: dict = {}
    firsts = {}
    for b, kind in enumerate(kinds):
        firsts.setdefault(kind, b)
    last = max(firsts.values())

    def capture(b: int):
        def hook(module, args, kwargs):
            current[kinds[b]] = (_to(args, cache_device), _to(kwargs, cache_device))
            if b == last:
                raise _StopForward
        return hook

    handles = [blocks[b].register_forward_pre_hook(capture(b), with_kwargs=True) for b in sorted(firsts.values())]
    try:
        run = forward_runner(model, targets)
        with distributed.stage(multi, "calibration (caching block inputs)"):
            for i, kwargs, mask in iter_batches(loader, config, device, "caching block inputs", digest=digest):
                current.clear()
                try:
                    run(kwargs)
                except _StopForward:
                    pass
                if len(current) < len(firsts):
                    raise CalibrationError(f"the first block '{prefix}.0' did not run on calibration batch {i}.")
                args, kw = current[kinds[0]]
                per_kind = {k: _with_hidden(*v, None) for k, v in current.items()} if len(firsts) > 1 else {}
                cached.append((i, mask, batch_lead(kwargs), args, kw, per_kind))
    finally:
        for h in handles:
            h.remove()
    total = len(cached)
    if multi:
        total = int(distributed.all_reduce_sum(torch.tensor([total], dtype=torch.int64,
                                                            device=distributed.comm_device())).item())
    if not total:
        raise CalibrationError("the calibration loader yielded no batches; give it at least one batch of samples."
                               + (" (on every rank)" if multi else ""))
    return cached, total


def _hidden_of(args: tuple, kwargs: dict, name: str):
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise CalibrationError(f"cannot tell which input of block '{name}' is its hidden state.")


def _with_hidden(args: tuple, kwargs: dict, hidden) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _run_block(block: nn.Module, name: str, cached: list, collector: Collector, device, cache_device,
               feed_next: bool, trim: bool = False, kind=None) -> None:
    """Run ``block`` on every cached input (statistics into ``collector``); with ``feed_next`` its outputs replace
    the cached hidden states, as the next block's inputs. A block of another kind than the first takes its own
    kind's masks and positions with the streamed hidden states."""
    for n, (i, mask, lead, args, kwargs, per_kind) in enumerate(cached):
        collector.start_batch(i, mask, lead)
        call_args, call_kwargs = args, kwargs
        if kind in per_kind:
            call_args, call_kwargs = _with_hidden(*per_kind[kind], _hidden_of(args, kwargs, name))
        out = block(*_to(call_args, device), **_to(call_kwargs, device))
        collector.record_finite()
        collector.end_batch()
        if feed_next:
            hidden = _to(out[0] if isinstance(out, (tuple, list)) else out, cache_device)
            _hidden_of(args, kwargs, name)  # raises for a block whose hidden state cannot be told apart
            args, kwargs = _with_hidden(args, kwargs, hidden)
            cached[n] = (i, mask, lead, args, kwargs, per_kind)
        del out
        if trim:  # offloaded weights were loaded and freed for this batch: give the pages back
            offload.release_host_memory()
    collector.check_finite()


def iter_block_statistics(model: nn.Module, loader: Any, config: CordaConfig, targets: list[Target],
                          cache_device: Optional[torch.device] = None,
                          cache: Optional[BlockCache] = None) -> Iterator[CovarianceStats]:
    """Yield one :class:`CovarianceStats` per block that holds targets, in model order.

    Args:
        model, loader, config, targets: as :func:`corda_fast.stages.collect_covariance` (loader must be iterable).
        cache_device: where block inputs are kept between blocks (default: ``config.calibration.cache_device``,
            else the model's device; ``"cpu"`` frees accelerator memory at the cost of transfers).
        cache: a :class:`~corda_fast.block_cache.BlockCache`: blocks written as they complete, done ones read.
    The model is left as it was (hooks removed, every module's mode restored) whatever happens, including when the
    consumer stops early.
    """
    for group_stats in iter_block_candidates(model, loader, config, targets, 1, cache_device, cache):
        yield group_stats[0]


def _devices(model: nn.Module, config: CordaConfig, cache_device) -> tuple:
    """``(the model's device, the onload device or None, where block inputs are kept, where blocks run)``."""
    device = model_device(model)
    onload = config.calibration.onload_device
    onload = torch.device(onload) if onload is not None else None
    cache_device = cache_device if cache_device is not None else config.calibration.cache_device
    cache_device = torch.device(cache_device) if cache_device is not None else device
    return device, onload, cache_device, onload if onload is not None else device


class _NoStatistics:
    """A collector that collects nothing: completed blocks of a resumed run only feed the next block."""

    def start_batch(self, *args) -> None:
        pass

    record_finite = end_batch = check_finite = start_batch


@torch.no_grad()
def iter_block_candidates(model: nn.Module, loader: Any, config: CordaConfig, targets: list[Target], groups: int,
                          cache_device: Optional[torch.device] = None,
                          cache: Optional[BlockCache] = None) -> Iterator[list[CovarianceStats]]:
    """:func:`iter_block_statistics` for CorDA++: per block, the statistics of each of ``groups`` candidate groups
    (calibration batch ``i`` feeds group ``i mod groups``, as :func:`corda_fast.stages.collect_candidates`).

    ``cache`` (a :class:`~corda_fast.block_cache.BlockCache`, one group only): each block's statistics are written to
    its file as the block completes; blocks whose file is already there (checked against this model and data) are
    read instead, and run without statistics only when a later block still has to be computed."""
    device, onload, cache_device, block_device = _devices(model, config, cache_device)
    multi = distributed.is_active(config.calibration.distributed)
    prefix, blocks = find_blocks(model, targets)
    kinds = block_kinds(model, blocks)
    dispatched = offload.is_dispatched(model)
    fingerprint = model_fingerprint(model)
    t0 = time.perf_counter()
    digests: Optional[list] = [] if cache is not None else None
    with eval_mode(model):
        cached, total = _cache_first_block_inputs(model, loader, config, targets, prefix, blocks, kinds, device,
                                                  cache_device, multi, digests)
        if cache is not None:
            cache.bind(fingerprint, combine_digests(digests, multi))
        last_to_compute = max((b for b in (cache.by_block if cache else ()) if b not in cache.done), default=-1)
        if total < groups:
            raise CalibrationError(f"the calibration loader yielded {total} batch(es) but {groups} candidate groups "
                                   "were asked for (batch i feeds group i mod candidates): give at least as many "
                                   "batches as candidates, or lower `candidates`.")
        for b, block in enumerate(tqdm(blocks, desc="corda_fast: calibrating block by block", unit="block",
                                       disable=not config.show_progress)):
            block_targets = [t for t in targets if t.name.startswith(f"{prefix}.{b}.")]
            if cache is not None and (b in cache.done or not block_targets):
                if b < last_to_compute:  # feed a later block that still has to be computed
                    with onloaded(block, onload):
                        _run_block(block, f"{prefix}.{b}", cached, _NoStatistics(), block_device, cache_device, True,
                                   trim=dispatched, kind=kinds[b])
                if block_targets:
                    yield [cache.read(b)]
                continue
            collector = Collector(block_targets, config, block_device, groups)
            handles = collector.attach(block_targets)
            try:
                with onloaded(block, onload), distributed.stage(multi, f"calibration of block '{prefix}.{b}'"):
                    _run_block(block, f"{prefix}.{b}", cached, collector, block_device, cache_device,
                               b + 1 < len(blocks), trim=dispatched, kind=kinds[b])
            finally:
                for h in handles:
                    h.remove()
            if multi:
                collector.sync_ranks(len(cached))
            if block_targets:
                out = _group_statistics(collector, block_targets, config, fingerprint, total, t0, groups,
                                        f"{prefix}.{b}")
                if cache is not None:
                    cache.write(b, out[0])
                del collector  # with the block's activations and hooks' workspace, back to the system before the yield
                offload.release_host_memory()
                yield out
                del out
            offload.release_host_memory()  # one block's worth of host memory at a time, not a growing heap


def _group_statistics(collector, block_targets: list[Target], config: CordaConfig, fingerprint: str, total: int,
                      t0: float, groups: int, block: str) -> list[CovarianceStats]:
    """One block's statistics of each candidate group, labelled with the block's name."""
    out = [finish_statistics(collector, block_targets, config, fingerprint, total, t0, group=g) for g in range(groups)]
    for stats in out:
        stats.meta["block"] = block
    return out


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
