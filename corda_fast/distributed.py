"""Data-parallel calibration over a ``torch.distributed`` process group (NCCL on GPU, gloo on CPU).

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

Decomposition (:func:`decompose_sharded`): statistics are assigned to owner ranks by estimated cost (longest
first, to the least-loaded rank), each owner decomposes its share, and the factors are broadcast from their owner,
so every rank builds the identical PEFT model. Non-owners drop a statistic as soon as it is assigned elsewhere.

The model must not run collectives in its forward (a plain replicated model): initialise adapters before wrapping
it with DDP / FSDP / DeepSpeed, as PEFT recommends for its own initialisations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import logging
from typing import Optional

import torch

logger = logging.getLogger(__name__)

__all__ = ["is_active", "rank_and_world", "shard", "PaddingFilter", "DistributedError", "exchange_status", "stage",
           "sync_collector", "decompose_sharded"]


class DistributedError(RuntimeError):
    """Another rank failed during a distributed stage; the message names it and its error."""


def _dist():
    import torch.distributed as dist

    return dist


def is_active(setting=True) -> bool:
    """Whether the distributed path runs for ``CordaConfig.distributed = setting``."""
    if setting is False:
        return False
    dist = _dist()
    up = dist.is_available() and dist.is_initialized()
    if setting is True and not up:
        raise DistributedError("CordaConfig.distributed=True but no torch.distributed process group is initialised: "
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


def _comm_device(group=None) -> torch.device:
    dist = _dist()
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------- status
def exchange_status(error: Optional[BaseException], stage: str, group=None) -> None:
    """Collective: every rank says whether ``stage`` failed on it. A failed rank re-raises its own error; the others
    raise :class:`DistributedError` naming the failed rank(s) and their errors."""
    dist = _dist()
    mine = None if error is None else f"{type(error).__name__}: {error}"
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
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


# ------------------------------------------------------------------------------------------------- statistics
def sync_collector(collector, n_batches: int, group=None) -> int:
    """Collective: merge the statistic layout of every rank into ``collector`` and sum its accumulators and counts
    over ranks, in place. Returns the total number of batches over ranks."""
    dist = _dist()
    dims = {}
    for sums, _, _ in collector.groups:
        dims.update({k: int(v.shape[0]) for k, v in sums.items()})
    layout = {"batches": n_batches, "order": list(collector.order), "members": collector.members,
              "assigned": collector.assigned, "dims": dims}
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, layout, group=group)
    order, members, assigned, all_dims = [], {}, {}, {}
    for r, lay in enumerate(everyone):  # the same merge, in rank order, on every rank
        for k in lay["order"]:
            if k not in members:
                order.append(k)
                members[k] = []
            for name in lay["members"].get(k, []):
                if name not in members[k]:
                    members[k].append(name)
        for name, k in lay["assigned"].items():
            if assigned.setdefault(name, k) != k:
                raise DistributedError(f"layer '{name}' shares its input with '{assigned[name]}' on one rank and "
                                       f"with '{k}' on rank {r}: the ranks run different models?")
        for k, d in lay["dims"].items():
            if all_dims.setdefault(k, d) != d:
                raise DistributedError(f"the input of '{k}' is {all_dims[k]} wide on one rank and {d} on rank {r}: "
                                       "the ranks run different models?")
    collector.order[:] = order
    collector.members.clear()
    collector.members.update(members)
    collector.assigned.clear()
    collector.assigned.update(assigned)
    device = collector.device
    for sums, n_samples, n_tokens in collector.groups:
        keys = [k for k in order if k in all_dims]
        for k in keys:
            if k not in sums:
                sums[k] = torch.zeros(all_dims[k], all_dims[k], dtype=collector.dtype, device=device)
                n_samples[k] = n_tokens[k] = 0
            dist.all_reduce(sums[k], group=group)
        counts = torch.tensor([[n_samples[k], n_tokens[k]] for k in keys], dtype=torch.int64,
                              device=_comm_device(group)).reshape(-1, 2)
        dist.all_reduce(counts, group=group)
        for k, (ns, nt) in zip(keys, counts.tolist()):
            n_samples[k], n_tokens[k] = int(ns), int(nt)
    return sum(lay["batches"] for lay in everyone)


# ------------------------------------------------------------------------------------------------- decomposition
def _owners(stats, targets, world: int) -> dict:
    """``{statistic key: owner rank}``: longest-processing-time-first onto the least-loaded rank."""
    layer_keys = stats.layer_keys()
    cost = {}
    for k, s in stats.sums.items():
        d = s.shape[0]
        cost[k] = float(d) ** 3  # damping + Cholesky
    for t in targets:
        k = layer_keys.get(t.name)
        if k in cost:
            cost[k] += float(t.d_out) * t.d_in * min(t.d_out, t.d_in)  # W·C_f and its Gram / SVD
    heap = [(0.0, r) for r in range(world)]
    owner = {}
    for k in sorted(cost, key=lambda k: (-cost[k], k)):
        load, r = heapq.heappop(heap)
        owner[k] = r
        heapq.heappush(heap, (load + cost[k], r))
    return owner


def decompose_sharded(stats, targets, config, device=None, release: bool = False, group=None) -> dict:
    """:func:`corda_fast.decompose` spread over the ranks: each statistic is decomposed by one owner rank and its
    layers' factors broadcast from there. Collective; returns the same ``{name: LayerFactors}`` on every rank."""
    from .decompose import LayerFactors, decompose

    dist = _dist()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    owner = _owners(stats, targets, world)
    mine = [k for k in stats.sums if owner[k] == rank]
    sub = dataclasses.replace(stats, sums={k: stats.sums[k] for k in mine},
                              n_samples={k: stats.n_samples[k] for k in mine},
                              n_tokens={k: stats.n_tokens[k] for k in mine},
                              members={k: stats.members[k] for k in mine})
    if release:
        for k in list(stats.sums):
            stats.sums.pop(k)  # the owner holds its own in `sub`
    local = {}
    with stage(True, "decomposition", group):
        if mine:
            local = decompose(sub, targets, config, device=device, release=release)
    meta = {name: {"A": tuple(f.A.shape), "B": tuple(f.B.shape), "s": tuple(f.singular_values.shape),
                   "dtype": str(f.A.dtype).replace("torch.", ""), "device": str(f.A.device), "scaling": f.scaling,
                   "damping": f.damping, "stat_key": f.stat_key} for name, f in local.items()}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, meta, group=group)
    comm = _comm_device(group)
    out = {}
    for t in targets:  # the same order on every rank
        src = next((r for r in range(world) if t.name in everyone[r]), None)
        if src is None:
            continue
        m = everyone[src][t.name]
        dtype = getattr(torch, m["dtype"])
        if src == rank:
            f = local[t.name]
            tensors = [f.A.to(comm).contiguous(), f.B.to(comm).contiguous(), f.singular_values.to(comm).contiguous()]
        else:
            tensors = [torch.empty(m[x], dtype=dtype, device=comm) for x in ("A", "B", "s")]
        for x in tensors:
            dist.broadcast(x, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
        where = device if device is not None else (m["device"] if src == rank else _local_device(m["device"]))
        a, b, s = (x.to(where) for x in tensors)
        out[t.name] = LayerFactors(t.name, a, b, s, m["scaling"], m["damping"], m["stat_key"])
    logger.info("decomposed %d of %d statistics on rank %d of %d; %d layers' factors shared", len(mine),
                len(owner), rank, world, len(out))
    return out


def _local_device(owner_device: str):
    """Where received factors live: this rank's device of the same type as the owner's (cuda:i differs by rank)."""
    kind = torch.device(owner_device).type
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)
