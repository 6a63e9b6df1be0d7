"""Decomposition: damping, ``W·C_f``, SVD and the adapter factors for KPM / IPM — from statistics to factors.

Per distinct statistic (shared by q/k/v, gate/up) the damping search and the Cholesky factor are computed once;
per layer one decomposition of ``W·C_f``; ``V̂ = C_f⁻¹V`` is solved for the ``r`` kept columns only (PEFT multiplies
the full ``Vᵀ`` by an explicit inverse). The linear algebra itself is in ``ops`` (reference kernels in
``ops/linalg.py``, C++/CUDA kernels behind ``ops.damped_cholesky`` / ``ops.batched_decompose``); this module groups
the work, runs it on the chosen kernel and, under ``torch.distributed``, shards it over ranks
(:func:`decompose_sharded`). It reads :class:`~corda_fast.stats.CovarianceStats` and never imports calibration or PEFT.
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import distributed, offload, ops
from .config import CordaConfig
from .ops import DampingError, damp_, degenerate_error, find_damping, not_converged_error
from .stats import CovarianceStats
from .targets import Target

logger = logging.getLogger(__name__)

__all__ = ["LayerFactors", "DampingError", "decompose", "decompose_sharded", "find_damping", "map_per_core"]


@dataclass
class LayerFactors:
    """CorDA adapter of one layer: ``W ≈ W_res + scaling·B·A``.

    Shapes: ``A`` is ``(r, d_in)``, ``B`` is ``(d_out, r)``, ``singular_values`` ``(r,)`` — the adapted
    singular values of ``W·C_f`` (largest for IPM, smallest for KPM), before division by ``scaling``.
    ``A`` and ``B`` have the decomposition dtype (float32 or float64).
    """

    name: str
    A: torch.Tensor
    B: torch.Tensor
    singular_values: torch.Tensor
    scaling: float
    damping: float
    stat_key: str


def map_per_core(fn, items: list, on_cpu: bool) -> list:
    """``[fn(x) for x in items]``; on CPU with several threads, one single-threaded call per core at a time:
    LAPACK's eigh/svd scale poorly across cores at these sizes, and this gives 1.4x the throughput of one
    multi-threaded call at a time (``benchmarks/bench_ops.py``)."""
    threads = torch.get_num_threads()
    if not (on_cpu and threads > 1 and len(items) > 1):
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def decompose(stats: CovarianceStats, targets: list[Target], config: Optional[CordaConfig] = None,
              device: Optional[torch.device] = None, release: bool = False,
              bases: Optional[dict] = None) -> dict[str, LayerFactors]:
    """CorDA factors for every target that has a statistic.

    Args:
        stats: output of :func:`corda_fast.stages.collect_covariance` (or a loaded cache).
        targets: resolved targets (their ``module.weight`` is read, never written).
        config: mode, precision, svd method, damping settings.
        device: where to decompose (default: each statistic's device).
        release: drop each statistic from ``stats.sums`` once its layers are decomposed (bounds peak memory
            when the statistics are not needed afterwards).
        bases: ``{layer: (ops.gram_basis of W·C_f, eigenvalue scale)}`` computed before (CorDA++'s scoring): those
            layers skip ``W·C_f``, its Gram matrix and eigen-decomposition (each basis dropped once used).
    Returns:
        ``{layer name: LayerFactors}`` in target order.
    """
    config = config or CordaConfig()
    method = config.resolved_svd_method
    by_key = stats.groups(targets)
    t0 = time.perf_counter()
    bar = tqdm(total=sum(len(v) for v in by_key.values()), desc="corda_fast: decomposing", unit="layer",
               disable=not config.show_progress)
    stat_device = device if device is not None else next(iter(stats.sums.values())).device if stats.sums else None
    kernel = ops.choose("batched_decompose", stat_device) if by_key and not bases else "torch"
    try:
        if kernel == "native":
            out = _decompose_native(stats, by_key, config, device, release, bar)
        else:
            out = _decompose_torch(stats, by_key, config, device, release, bar, bases or {})
    finally:
        bar.close()
    logger.info("decomposed %d layers (%d distinct statistics, %s, %s, %s kernel) in %.2fs", len(out), len(by_key),
                config.precision, method, kernel, time.perf_counter() - t0)
    order = {t.name: i for i, t in enumerate(targets)}
    return dict(sorted(out.items(), key=lambda kv: order[kv[0]]))


def _decompose_torch(stats: CovarianceStats, by_key: dict, config: CordaConfig, device, release: bool,
                     bar, bases: dict) -> dict[str, LayerFactors]:
    """The reference path: per statistic (groups spread over the CPU cores) the damping search once, then every layer
    that reads it, then one Cholesky factor for all of them.

    Memory: a group holds its damped covariance (one ``d×d`` of the working dtype) plus one layer's workspace; the
    Cholesky factor is computed in the damped covariance's own storage once every layer has its kept singular
    triplets (only the final triangular solves need it), and on the host freed pages go back to the system after
    each step (:func:`~corda_fast.offload.release_host_memory`)."""
    work = torch.float64 if config.resolved_svd_method == "gram" else config.dtype
    on_cpu = all(s.device.type == "cpu" for s in stats.sums.values()) and (
        device is None or torch.device(device).type == "cpu")

    def run_group(key: str, layer_targets: list[Target]) -> list[LayerFactors]:
        c_f, lam = _damped_covariance(stats, key, [t.name for t in layer_targets], config, work, device, release,
                                      on_cpu)
        done = _group_factors(c_f, lam, key, layer_targets, config, work, bases, bar)
        if on_cpu:
            offload.release_host_memory()
        return done

    out: dict[str, LayerFactors] = {}
    # narrow statistics first: with `release`, the wide ones (the largest workspaces) run once the narrow ones'
    # statistics are gone; the output order is the targets' whatever the order of work
    items = sorted(by_key.items(), key=lambda kv: stats.sums[kv[0]].shape[0])
    for group in map_per_core(lambda kv: run_group(*kv), items, on_cpu):
        out.update((f.name, f) for f in group)
    return out


def _damped_covariance(stats: CovarianceStats, key: str, names: list, config: CordaConfig, work, device,
                       release: bool, on_cpu: bool) -> tuple[torch.Tensor, float]:
    """``(C_f, λ)`` of one statistic: the damping search on a float32 copy (damped in place) — skipped where
    ``stats.meta["damping"]`` gives the statistic's ``λ`` (CorDA++'s selected statistics, damped as they were
    scored) —, then the float64 (or working-dtype) covariance damped in its own storage; the statistic is dropped
    from ``stats`` with ``release``."""
    damping = config.damping
    lam = stats.meta.get("damping", {}).get(key)
    if lam is None:
        c32 = stats.covariance_float32(key)  # the search's input: no working-dtype d×d beside its workspace
        lam = find_damping(c32 if device is None else c32.to(device), damping.start, damping.tol, damping.max_iter,
                           what=f"layer(s) {names}", overwrite=True)
        del c32
        if on_cpu:
            offload.release_host_memory()
    c_f = stats.covariance(key, work)  # a float64 statistic keeps its digits; this job's own copy
    if device is not None:
        c_f = c_f.to(device)
    if release:
        stats.sums.pop(key, None)
    return damp_(c_f, lam), lam


def _group_factors(c_f: torch.Tensor, lam: float, key: str, layer_targets: list[Target], config: CordaConfig, work,
                   bases: dict, bar) -> list[LayerFactors]:
    """Factors of the layers reading one damped covariance: each layer's kept triplets from ``C_f``, then ``C_f`` is
    factored in place (``C_f`` itself is not needed after) and the triangular solves finish every layer."""
    method, dtype = config.resolved_svd_method, config.dtype
    kept = []
    for t in layer_targets:
        w = t.weight_matrix().detach().to(c_f.device)
        basis, scale = bases.pop(t.name, (None, 1.0)) if method == "gram" else (None, 1.0)
        if basis is not None:
            basis = tuple(x.to(c_f.device) if torch.is_tensor(x) else x for x in basis)
        kept.append(ops.kept_triplets(w if method == "gram" else w.to(work), c_f, t.rank, config.mode, method,
                                      basis=basis, eval_scale=scale))
        del w
    chol, info = ops.cholesky_in_place(c_f)
    if int(info) != 0:
        raise _not_positive_definite(layer_targets, lam)
    done = []
    for t, triplets in zip(layer_targets, kept):
        a, b, s_r = ops.finish_factors(*triplets, chol, t.scaling, work)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise DampingError(f"non-finite adapter factors for layer '{t.name}' (λ={lam}).")
        done.append(LayerFactors(t.name, a.to(dtype), b.to(dtype), s_r.to(dtype), t.scaling, lam, key))
        bar.update(1)
    return done


# Bytes of statistics (and their damped copies, factors and damping trials) one native call may hold.
NATIVE_CHUNK_BYTES = 256 * 2**20


def _check_lambdas(lam: list, chunk: list, by_key: dict, stats: CovarianceStats, work, damping) -> None:
    """Raise the damping error of the first failed statistic of a chunk (``-1`` degenerate, NaN no convergence)."""
    for i, key in enumerate(chunk):
        names = [t.name for t in by_key[key]]
        value = lam[i]
        if value == -1.0:
            raise degenerate_error(f"layer(s) {names}", float(torch.diagonal(stats.covariance(key, work)).mean()))
        if value != value:
            raise not_converged_error(f"layer(s) {names}", damping.max_iter,
                                       damping.start * 2 ** (damping.max_iter - 1), "", damping.tol)


def _not_positive_definite(layer_targets: list[Target], lam: float) -> DampingError:
    return DampingError(f"damped covariance of layer(s) {[t.name for t in layer_targets]} is not positive definite "
                        f"(λ={lam}).")


def _damped_as_given(covs: torch.Tensor, lams: list, chunk: list, by_key: dict) -> tuple:
    """``(C_f, L, λ)`` of a batch of statistics (``covs``, the caller's copy, damped in place) with given ``λ`` (no
    search), as ``damped_cholesky`` returns them; a factorization that fails names its layers."""
    for i, lam in enumerate(lams):
        damp_(covs[i], lam)
    chol, info = torch.linalg.cholesky_ex(covs)
    failed = torch.nonzero(info.reshape(-1)).flatten().tolist()
    if failed:
        raise _not_positive_definite(by_key[chunk[failed[0]]], lams[failed[0]])
    return covs, chol, list(lams)


def _decompose_native(stats: CovarianceStats, by_key: dict, config: CordaConfig, device, release: bool,
                      bar) -> dict[str, LayerFactors]:
    """The same factors through the compiled kernels: statistics of one size are damped together
    (``damped_cholesky``, one host sync per round of trials), then same-shaped layers of the same rank are
    decomposed together (``batched_decompose``, layers in parallel). Chunked to bound memory."""
    dtype = config.dtype
    method = config.resolved_svd_method
    work = torch.float64 if method == "gram" else dtype
    damping = config.damping
    given = stats.meta.get("damping", {})  # λ per statistic, used as it is (CorDA++'s selected statistics)
    by_dim: dict[tuple, list[str]] = {}
    for key in by_key:
        by_dim.setdefault((stats.sums[key].shape[0], key in given), []).append(key)
    out: dict[str, LayerFactors] = {}
    for (d, fixed), keys in by_dim.items():
        per = max(1, NATIVE_CHUNK_BYTES // (d * d * 8 * 4))
        probes = ops.damping_probes(d)
        for c0 in range(0, len(keys), per):
            chunk = keys[c0:c0 + per]
            covs = torch.stack([stats.covariance(k, work) for k in chunk])
            if device is not None:
                covs = covs.to(device)
            if fixed:
                cf, chol, lam = _damped_as_given(covs, [given[k] for k in chunk], chunk, by_key)
            else:
                cf, chol, lam = ops.damped_cholesky(covs, probes.to(covs.device), damping.start, damping.tol,
                                                    damping.max_iter, kernel="native")
                lam = lam.tolist()
                _check_lambdas(lam, chunk, by_key, stats, work, damping)
            del covs
            if release:
                for key in chunk:
                    stats.sums.pop(key, None)
            groups: dict[tuple, list] = {}
            for i, key in enumerate(chunk):
                for t in by_key[key]:
                    groups.setdefault((t.d_out, t.rank), []).append((i, t))
            for (_, rank), items in groups.items():
                idx = torch.tensor([i for i, _ in items], device=cf.device)
                w = torch.stack([t.weight_matrix().detach().to(device=cf.device, dtype=work) for _, t in items])
                scaling = torch.tensor([t.scaling for _, t in items], dtype=torch.float64)
                a, b, s = ops.batched_decompose(w, cf.index_select(0, idx), chol.index_select(0, idx), scaling, rank,
                                                config.mode == "ipm", method, kernel="native")
                del w
                finite = (torch.isfinite(a).flatten(1).all(1) & torch.isfinite(b).flatten(1).all(1)).tolist()
                for j, (i, t) in enumerate(items):
                    if not finite[j]:
                        raise DampingError(f"non-finite adapter factors for layer '{t.name}' (λ={lam[i]}).")
                    out[t.name] = LayerFactors(t.name, a[j].to(dtype), b[j].to(dtype), s[j].to(dtype), t.scaling,
                                               lam[i], chunk[i])
                bar.update(len(items))
            del cf, chol
    return out


# ---------------------------------------------------------------------------------------------------- over ranks
def _owners(stats: CovarianceStats, targets: list[Target], world: int) -> dict:
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


def _local_device(owner_device: str):
    """Where received factors live: this rank's device of the same type as the owner's (cuda:i differs by rank)."""
    kind = torch.device(owner_device).type
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def decompose_sharded(stats: CovarianceStats, targets: list[Target], config: CordaConfig, device=None,
                      release: bool = False, group=None) -> dict[str, LayerFactors]:
    """:func:`decompose` spread over the ranks of a process group: each statistic is decomposed by one owner rank
    (longest first, to the least-loaded rank) and its layers' factors broadcast from there. Collective; returns the
    same ``{name: LayerFactors}`` on every rank. Non-owners drop a statistic as soon as it is assigned elsewhere."""
    rank, world = distributed.rank_and_world() if group is None else (
        torch.distributed.get_rank(group), torch.distributed.get_world_size(group))
    owner = _owners(stats, targets, world)
    sub = stats.subset([k for k in stats.sums if owner[k] == rank])
    if release:
        stats.sums.clear()  # the owner holds its own in `sub`
    local = {}
    with distributed.stage(True, "decomposition", group):
        if sub.sums:
            local = decompose(sub, targets, config, device=device, release=release)
    meta = {name: {"A": tuple(f.A.shape), "B": tuple(f.B.shape), "s": tuple(f.singular_values.shape),
                   "dtype": str(f.A.dtype).replace("torch.", ""), "device": str(f.A.device), "scaling": f.scaling,
                   "damping": f.damping, "stat_key": f.stat_key} for name, f in local.items()}
    everyone = distributed.gather_objects(meta, group)
    comm = distributed.comm_device(group)
    out = {}
    for t in targets:  # the same order on every rank
        src = next((r for r in range(world) if t.name in everyone[r]), None)
        if src is None:
            continue
        m = everyone[src][t.name]
        if src == rank:
            f = local[t.name]
            tensors = [f.A.to(comm).contiguous(), f.B.to(comm).contiguous(), f.singular_values.to(comm).contiguous()]
        else:
            tensors = [torch.empty(m[x], dtype=getattr(torch, m["dtype"]), device=comm) for x in ("A", "B", "s")]
        for x in tensors:
            distributed.broadcast_(x, src, group)
        where = device if device is not None else (m["device"] if src == rank else _local_device(m["device"]))
        a, b, s = (x.to(where) for x in tensors)
        out[t.name] = LayerFactors(t.name, a, b, s, m["scaling"], m["damping"], m["stat_key"])
    logger.info("decomposed %d of %d statistics on rank %d of %d; %d layers' factors shared", len(sub.sums),
                len(owner), rank, world, len(out))
    return out
