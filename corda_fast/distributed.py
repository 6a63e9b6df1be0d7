"""Collectives for data-parallel calibration over a ``torch.distributed`` process group (NCCL on GPU, gloo on CPU).

This module holds the collectives only (status exchange, gathers, reductions, broadcasts, the sampler's padding
filter) and imports nothing else of the package; calibration merges its statistics with them
(``calibrate.Collector.sync_ranks``) and decomposition shards its work with them (``decompose.decompose_sharded``).

Each rank runs its own calibration batches through its own replica of the model. The statistics stay what they are
on one process — float32 (or float64) sums of ``XᵀX`` plus sample and token counts — so the union of the data is
exactly the sum over ranks: after the forward passes every rank

1. exchanges its status (a rank that failed raises on every rank, naming the rank and its error; nobody waits on
   a collective the failed rank will never reach),
2. merges the statistic layout (keys, which layers share which input, widths) with the others — a rank that saw
   no batch at all, or on which some layer never ran, gets zero sums for it,
3. all-reduces the sums and the counts (SUM).

Uneven shards cannot hang: the forward passes contain no collective, the reduction runs once every rank is done.
Samples that ``DistributedSampler`` repeats to pad the last round (``drop_last=False``) are recognised from the
sampler and masked out of the statistics on the rank that holds the copy (:class:`PaddingFilter`).

Decomposition (``decompose.decompose_sharded``): statistics are assigned to owner ranks by estimated cost (longest
first, to the least-loaded rank), each owner decomposes its share, and the factors are broadcast from their owner,
so every rank builds the identical PEFT model. Non-owners drop a statistic as soon as it is assigned elsewhere.

The model must not run collectives in its forward (a plain replicated model): initialise adapters before wrapping
it with DDP / FSDP / DeepSpeed, as PEFT recommends for its own initialisations.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch

logger = logging.getLogger(__name__)

__all__ = ["is_active", "rank_and_world", "shard", "PaddingFilter", "DistributedError", "exchange_status", "stage",
           "gather_objects", "all_reduce_sum", "broadcast_", "comm_device"]


class DistributedError(RuntimeError):
    """Another rank failed during a distributed stage; the message names it and its error."""


def _dist():
    import torch.distributed as dist

    return dist


def is_active(setting=True) -> bool:
    """Whether the distributed path runs for ``CalibrationConfig.distributed = setting``."""
    if setting is False:
        return False
    dist = _dist()
    up = dist.is_available() and dist.is_initialized()
    if setting is True and not up:
        raise DistributedError("CalibrationConfig.distributed=True but no torch.distributed process group is initialised: "
                               "call torch.distributed.init_process_group() (e.g. under torchrun) first.")
    return bool(up and dist.get_world_size() > 1)


def rank_and_world() -> tuple[int, int]:
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: list, rank: Optional[int] = None, world: Optional[int] = None) -> list:
    """This rank's share of ``items``: every ``world``-th item from ``rank`` (uneven shards, no repeats)."""
    r, w = rank_and_world()
    rank = r if rank is None else rank
    world = w if world is None else world
    return list(items[rank::world])


def comm_device(group=None) -> torch.device:
    """Where tensors of collectives live: this rank's GPU under NCCL, the CPU otherwise."""
    dist = _dist()
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------- status
def exchange_status(error: Optional[BaseException], stage: str, group=None) -> None:
    """Collective: every rank says whether ``stage`` failed on it. A failed rank re-raises its own error; the others
    raise :class:`DistributedError` naming the failed rank(s) and their errors."""
    mine = None if error is None else f"{type(error).__name__}: {error}"
    everyone = gather_objects(mine, group)
    failed = [(r, m) for r, m in enumerate(everyone) if m is not None]
    if not failed:
        return
    if error is not None:
        raise error
    detail = "; ".join(f"rank {r}: {m}" for r, m in failed)
    raise DistributedError(f"{stage} failed on {len(failed)} of {len(everyone)} ranks ({detail})")


@contextlib.contextmanager
def stage(multi: bool, name: str, group=None):
    """With several ranks, every rank reports success or failure of the ``name`` stage at its end (an exception
    inside is exchanged, then re-raised), so a failure on one rank raises on all instead of leaving the others
    waiting in the next collective. A no-op for one process."""
    if not multi:
        yield
        return
    try:
        yield
    except Exception as exc:
        exchange_status(exc, name, group)
        raise
    exchange_status(None, name, group)


# ------------------------------------------------------------------------------------------------- padding
class PaddingFilter:
    """Marks the samples ``DistributedSampler`` repeated to pad its last round, for a DataLoader over it.

    With ``n`` samples and ``w`` replicas the sampler pads its index list to ``ceil(n/w)·w`` by repeating its first
    entries; rank ``r`` takes positions ``r, r+w, r+2w, …``, so its ``j``-th sample is a repeat iff ``r + j·w ≥ n``
    (shuffled or not). Batches are assumed to hold the sampler's samples in order, one row each (the default
    batch sampler)."""

    def __init__(self, n: int, rank: int, world: int):
        self.n, self.rank, self.world = n, rank, world
        self.seen = 0

    @classmethod
    def from_loader(cls, loader) -> Optional["PaddingFilter"]:
        from torch.utils.data import DistributedSampler

        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
            return None
        try:
            n = len(sampler.dataset)
        except TypeError:
            return None
        if n % sampler.num_replicas == 0:
            return None  # nothing padded
        return cls(n, sampler.rank, sampler.num_replicas)

    def repeated(self, rows: int) -> torch.Tensor:
        """Boolean ``(rows,)``: which rows of the next batch are padding repeats."""
        j = torch.arange(self.seen, self.seen + rows)
        self.seen += rows
        return self.rank + j * self.world >= self.n


# ------------------------------------------------------------------------------------------------- collectives
def gather_objects(obj, group=None) -> list:
    """Collective: every rank's ``obj`` (picklable), in rank order."""
    dist = _dist()
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, obj, group=group)
    return everyone


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Collective: ``tensor`` summed over ranks, in place."""
    _dist().all_reduce(tensor, group=group)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Collective: ``tensor`` overwritten with rank ``src``'s (``src`` is the rank within ``group``)."""
    dist = _dist()
    dist.broadcast(tensor, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
    return tensor


# ---------------------------------------------------------------------------------------------------- statistics
def merge_statistics(groups: list[tuple[dict, dict, dict]], order: list[str], members: dict[str, list[str]],
                     assigned: dict[str, str], n_batches: int, dtype: torch.dtype, device, group=None) -> int:
    """Collective: make every rank's calibration statistics the sum over ranks, in place.

    ``groups`` holds one ``(sums, n_samples, n_tokens)`` triple of dicts per candidate group; ``order`` / ``members``
    / ``assigned`` are the statistic layout (key order, layers reading each key, each layer's key). The layouts are
    merged first (a rank on which some layer never ran gets zero sums for it; ranks that disagree on the model
    raise :class:`DistributedError`), then every sum and count is all-reduced. Returns the number of batches over
    ranks."""
    dims = {}
    for sums, _, _ in groups:
        dims.update({k: int(v.shape[0]) for k, v in sums.items()})
    layout = {"batches": n_batches, "order": list(order), "members": members, "assigned": assigned, "dims": dims}
    everyone = gather_objects(layout, group)
    new_order, new_members, new_assigned, all_dims = _merge_layouts(everyone)
    order[:] = new_order
    members.clear()
    members.update(new_members)
    assigned.clear()
    assigned.update(new_assigned)
    for sums, n_samples, n_tokens in groups:
        keys = [k for k in new_order if k in all_dims]
        for k in keys:
            if k not in sums:
                sums[k] = torch.zeros(all_dims[k], all_dims[k], dtype=dtype, device=device)
                n_samples[k] = n_tokens[k] = 0
            all_reduce_sum(sums[k], group)
        counts = torch.tensor([[n_samples[k], n_tokens[k]] for k in keys], dtype=torch.int64,
                              device=comm_device(group)).reshape(-1, 2)
        all_reduce_sum(counts, group)
        for k, (ns, nt) in zip(keys, counts.tolist()):
            n_samples[k], n_tokens[k] = int(ns), int(nt)
    return sum(lay["batches"] for lay in everyone)


def _merge_layouts(everyone: list[dict]) -> tuple[list, dict, dict, dict]:
    """``(order, members, assigned, dims)`` merged over ranks, the same on every rank (rank order)."""
    order, members, assigned, all_dims = [], {}, {}, {}
    for r, lay in enumerate(everyone):
        for k in lay["order"]:
            if k not in members:
                order.append(k)
                members[k] = []
            for name in lay["members"].get(k, []):
                if name not in members[k]:
                    members[k].append(name)
        for name, k in lay["assigned"].items():
            if assigned.setdefault(name, k) != k:
                raise DistributedError(
                    f"layer '{name}' shares its input with '{assigned[name]}' on one rank and with '{k}' on rank "
                    f"{r}: the ranks run different models?")
        for k, d in lay["dims"].items():
            if all_dims.setdefault(k, d) != d:
                raise DistributedError(
                    f"the input of '{k}' is {all_dims[k]} wide on one rank and {d} on rank {r}: the ranks run "
                    "different models?")
    return order, members, assigned, all_dims
