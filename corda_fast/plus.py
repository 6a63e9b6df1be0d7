"""CorDA++ building blocks: compactness metric, covariance selection score, dynamic rank allocation.

The definitions (``docs/corda_plus.md``) leave some choices open; each is an explicit option of
:class:`~corda_fast.config.PlusConfig`:

- compactness ``π(C_f) = √(d_out·λ_max(C_f)) / λ_min(C_f)`` (eigenvalues of the damped covariance, §5.3) — the
  bound ``‖ΔY‖₁ ≤ π·σ`` on the output change from discarding a component of singular value σ;
- selection score ``log π · Σ σ_{−k}/σ_max`` summed over all components (``sum_over="all"``, as transcribed) or over
  the ``r`` adapted ones (``"adapter"``), lower is better; candidates are compared after scaling each to unit mean
  diagonal, since ``π(cC) = π(C)/√c`` while the σ-ratios are scale-free;
- rank allocation: every layer starts at ``min_rank``; the layer with the lowest score
  ``log π · σ_{−(r+1)} / Σ_{k≤R−r−1} σ_k`` (the next component's relative weight) gets the next rank, until the
  budget is used (a heap over layers and prefix sums of the spectra: O(steps · log layers)).

:func:`plan` runs the whole CorDA++ preprocessing between calibration (``calibrate.collect_candidates``: the
candidate statistics of one forward pass) and decomposition: damping, compactness and spectra per candidate,
selection per layer, allocation, and the PEFT ``rank_pattern`` / ``alpha_pattern`` to build the model with.
"""

from __future__ import annotations

import heapq
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm

from .config import PlusConfig
from .decompose import map_per_core
from .ops import damp, find_damping
from .stats import CovarianceStats

logger = logging.getLogger(__name__)


def compactness(c_f: torch.Tensor, d_out: int) -> float:
    """``π = √(d_out·λ_max) / λ_min`` of a damped (positive definite) covariance ``(d_in, d_in)``."""
    ev = torch.linalg.eigvalsh(c_f.double())
    return _pi(float(ev[0]), float(ev[-1]), d_out)


def _pi(lo: float, hi: float, d_out: int) -> float:
    if not lo > 0:
        raise ValueError(f"compactness needs a positive definite (damped) covariance; λ_min = {lo}.")
    return math.sqrt(d_out * hi) / lo


def selection_score(pi: float, sigma: torch.Tensor, rank: Optional[int] = None, sum_over: str = "all") -> float:
    """``log π · Σ σ_{−k}/σ_max`` with σ the singular values of ``W·C_f`` (descending); ``sum_over="all"`` sums
    every component, ``"adapter"`` only the ``rank`` smallest. Lower is better."""
    s = sigma.double()
    if sum_over == "all":
        tail = s
    elif sum_over == "adapter":
        if rank is None:
            raise ValueError("sum_over='adapter' needs the rank.")
        tail = s[s.numel() - rank:]
    else:
        raise ValueError(f"sum_over={sum_over!r}: expected 'all' or 'adapter'.")
    return math.log(pi) * float(tail.sum() / s[0])


def normalized(cov: torch.Tensor) -> torch.Tensor:
    """``cov`` scaled to unit mean diagonal (so candidates of different global scale compare)."""
    return cov / torch.diagonal(cov).mean()


@dataclass
class LayerSpectrum:
    """What allocation needs of one layer: singular values of ``W·C_f`` (descending), ``log π`` and the shape."""

    name: str
    sigma: torch.Tensor
    log_pi: float
    d_in: int
    d_out: int


def allocate_ranks(layers: list[LayerSpectrum], budget: int, min_rank: int = 1,
                   max_rank: Optional[int] = None, mode: str = "kpm", score_at: str = "next") -> dict[str, int]:
    """Dynamic rank allocation under a parameter budget.

    The score of layer ``l`` with ``b`` bottom components taken is ``log π · σ_{−j} / Σ_{k ≤ R−j} σ_k`` with
    ``j = b+1`` (``score_at="next"``: the component the next step takes) or ``j = max(b, 1)`` (``"current"``,
    the literal transcription). The lowest-scoring layer moves first.

    - KPM (the adapter is the ``r`` smallest components): every layer starts at ``min_rank``; the lowest-scoring
      layer's rank grows by one while the budget allows. The realised count never exceeds ``budget`` and is
      within one layer's step ``d_in + d_out`` of it (unless every layer reached its cap).
    - IPM (the adapter is the ``r`` largest): every layer starts at its cap; the lowest-scoring layer gives up its
      smallest adapted component (its ``b`` grows) until the count is ≤ ``budget``: again never above, within one
      step of it.

    Args:
        layers: spectra of the layers.
        budget: total adapter parameters ``Σ (d_in + d_out)·r_l``.
        min_rank / max_rank: bounds per layer (``max_rank`` is also capped by ``min(d_in, d_out)``).
        mode: ``"kpm"`` or ``"ipm"``; score_at: ``"next"`` or ``"current"``.
    Returns:
        ``{name: rank}``, O(steps · log layers) with a heap and prefix sums of the spectra.
    """
    if mode not in ("kpm", "ipm"):
        raise ValueError(f"mode={mode!r}: expected 'kpm' or 'ipm'.")
    if score_at not in ("next", "current"):
        raise ValueError(f"score_at={score_at!r}: expected 'next' or 'current'.")
    caps, prefix, full = {}, {}, {}
    for l in layers:
        n = min(l.d_in, l.d_out, l.sigma.numel())
        cap = n if max_rank is None else min(n, max_rank)
        if min_rank > cap:
            raise ValueError(f"min_rank={min_rank} exceeds the max rank {cap} of layer '{l.name}'.")
        caps[l.name], full[l.name] = cap, l.sigma.numel()
        prefix[l.name] = torch.cat([torch.zeros(1, dtype=torch.float64), l.sigma.double().cumsum(0)])
    floor = sum((l.d_in + l.d_out) * min_rank for l in layers)
    if floor > budget:
        raise ValueError(f"budget {budget} is below the minimum {floor} (min_rank={min_rank} on every layer).")
    # b = bottom components taken by the greedy rule: KPM rank = b, IPM rank = R − b.
    if mode == "kpm":
        taken = {l.name: min_rank for l in layers}
        rank_of = lambda l, b: b  # noqa: E731
    else:
        taken = {l.name: full[l.name] - caps[l.name] for l in layers}
        rank_of = lambda l, b: full[l.name] - b  # noqa: E731
    spent = sum((l.d_in + l.d_out) * rank_of(l, taken[l.name]) for l in layers)
    heap = [(_score(l, taken[l.name], prefix[l.name], score_at), i) for i, l in enumerate(layers)]
    heapq.heapify(heap)
    while heap:
        if mode == "ipm" and spent <= budget:
            break
        _, i = heapq.heappop(heap)
        l = layers[i]
        step = l.d_in + l.d_out
        r = rank_of(l, taken[l.name])
        if mode == "kpm":
            if r >= caps[l.name] or spent + step > budget:
                continue  # done, or this layer's step does not fit (a smaller one might)
            spent += step
        else:
            if r <= min_rank:
                continue
            spent -= step
        taken[l.name] += 1
        heapq.heappush(heap, (_score(l, taken[l.name], prefix[l.name], score_at), i))
    ranks = {l.name: rank_of(l, taken[l.name]) for l in layers}
    if spent > budget:  # IPM with every layer at min_rank cannot happen (floor checked); kept as a guard
        raise AssertionError(f"allocation overshot the budget ({spent} > {budget})")
    return ranks


def _score(l: LayerSpectrum, b: int, prefix: torch.Tensor, score_at: str = "next") -> float:
    """``log π · σ_{−j} / Σ_{k ≤ R−j} σ_k`` with ``j = b+1`` (``"next"``) or ``max(b, 1)`` (``"current"``): the
    relative weight of a bottom component against the components above it."""
    n = l.sigma.numel()
    j = b + 1 if score_at == "next" else max(b, 1)
    if j > n:
        return math.inf
    comp = float(l.sigma[n - j])
    rest = float(prefix[n - j])
    return l.log_pi * (comp / rest if rest > 0 else math.inf)


def allocation_cost(layers: list[LayerSpectrum], ranks: dict[str, int]) -> int:
    """Adapter parameter count ``Σ (d_in + d_out)·r_l``."""
    return sum((l.d_in + l.d_out) * ranks[l.name] for l in layers)


# ---------------------------------------------------------------------------------------------------- the plan
@dataclass
class PlusLayer:
    """CorDA++ decision for one layer: the chosen candidate, its compactness and the allocated rank."""

    name: str
    d_in: int
    d_out: int
    candidate: int
    scores: list[float]
    compactness: float
    damping: float
    uniform_rank: int
    rank: int = 0
    alpha: float = 0.0


@dataclass
class PlusPlan:
    """Output of :func:`plan`: the selected statistics (one :class:`CovarianceStats`, keyed per chosen
    candidate), the PEFT patterns, and the per-layer table."""

    stats: object
    rank_pattern: dict
    alpha_pattern: dict
    layers: list[PlusLayer]
    budget: int
    realised: int
    seconds: dict = field(default_factory=dict)

    def table(self) -> str:
        """A markdown table of the per-layer decisions."""
        rows = ["| layer | shape | π (compactness) | candidate | scores | rank (uniform) |",
                "|---|---|---:|---:|---|---:|"]
        for l in self.layers:
            sc = ", ".join(f"{v:.4g}" for v in l.scores)
            rows.append(f"| {l.name} | {l.d_out}×{l.d_in} | {l.compactness:.4g} | {l.candidate} | {sc} | "
                        f"{l.rank} ({l.uniform_rank}) |")
        rows.append(f"\nbudget {self.budget} adapter parameters, realised {self.realised}")
        return "\n".join(rows)

    def plot(self, path: str) -> str:
        """A PNG of per-layer log π, allocated rank and chosen candidate (needs matplotlib)."""
        try:
            import matplotlib
        except ImportError as e:
            raise ImportError("PlusPlan.plot needs matplotlib: pip install matplotlib") from e

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x = range(len(self.layers))
        fig, axes = plt.subplots(3, 1, figsize=(max(8, len(self.layers) * 0.06), 7), sharex=True)
        axes[0].plot(x, [math.log(l.compactness) for l in self.layers], ".-", lw=0.8)
        axes[0].set_ylabel("log π")
        axes[1].bar(x, [l.rank for l in self.layers], width=1.0)
        axes[1].axhline(self.layers[0].uniform_rank if self.layers else 0, color="k", lw=0.8, ls="--",
                        label="uniform rank")
        axes[1].set_ylabel("rank")
        axes[1].legend(loc="upper right")
        axes[2].plot(x, [l.candidate for l in self.layers], ".", ms=3)
        axes[2].set_ylabel("chosen candidate")
        axes[2].set_xlabel("layer (model order)")
        fig.suptitle(f"CorDA++: budget {self.budget}, realised {self.realised}")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


@torch.no_grad()
def plan(candidates: list[CovarianceStats], targets: list, config, use_rslora: bool = False) -> PlusPlan:
    """CorDA++ between calibration and decomposition.

    For every candidate statistic and layer: damping (the CorDA rule), ``π`` of the damped covariance, singular
    values of ``W·C_f`` (float64, from the Gram matrix of the smaller side); selection of the candidate with the
    lowest :func:`selection_score` per layer (ties → the lowest index); :func:`allocate_ranks` on the chosen
    spectra under ``config.plus.budget`` (default: the uniform ranks' count).

    Args:
        candidates: ``calibrate.collect_candidates`` output (same keys in every group).
        targets: resolved targets (their ``rank`` is the uniform rank; ``module.weight`` is read only).
        config: :class:`CordaConfig` (``mode``, ``damping``, ``plus``: budget, ranks, scoring options).
        use_rslora: the LoRA scaling rule (``LoraConfig.use_rslora``), for ``plus.alpha="scaling"``.
    Returns:
        :class:`PlusPlan`; ``rank_pattern`` / ``alpha_pattern`` key every layer by its escaped full name.
    """
    pconf = config.plus or PlusConfig()
    t0 = time.perf_counter()
    layer_keys = {}
    for cand in candidates:  # with unused_targets="skip" a layer may be missing from some groups
        layer_keys.update(cand.layer_keys())
    by_key: dict[str, list] = {}
    for t in targets:
        if t.name in layer_keys:
            by_key.setdefault(layer_keys[t.name], []).append(t)
    results = _score_candidates(candidates, by_key, config)
    t1 = time.perf_counter()
    layers, spectra = _select(targets, results, pconf)
    budget = pconf.budget if pconf.budget is not None else sum((l.d_in + l.d_out) * l.uniform_rank for l in layers)
    ranks = allocate_ranks(spectra, budget, pconf.min_rank, pconf.max_rank, config.mode, pconf.score_at)
    rank_pattern, alpha_pattern = _patterns(layers, ranks, {t.name: t for t in targets}, pconf, use_rslora)
    realised = allocation_cost(spectra, ranks)
    if realised < budget - max((l.d_in + l.d_out) for l in layers):
        logger.warning("CorDA++: only %d of the %d-parameter budget could be used (every layer at its max rank).",
                       realised, budget)
    stats = _selected_statistics(candidates, layers, layer_keys)
    seconds = {"score": t1 - t0, "select_allocate": time.perf_counter() - t1}
    logger.info("CorDA++: %d layers, %d candidates scored in %.2fs; ranks %d..%d, %d of %d budget parameters",
                len(layers), len(candidates), seconds["score"], min(ranks.values()), max(ranks.values()),
                realised, budget)
    return PlusPlan(stats, rank_pattern, alpha_pattern, layers, budget, realised, seconds)


def _score_candidates(candidates: list[CovarianceStats], by_key: dict, config) -> dict[str, list]:
    """``{layer: [(π, σ of W·C_f, λ) or None per candidate]}``: every (candidate, statistic) pair scored once,
    spread over the CPU cores; covariances scaled to unit mean diagonal first."""
    jobs = [(g, key) for g in range(len(candidates)) for key in by_key if key in candidates[g].sums]
    bar = tqdm(total=len(jobs), desc="corda_fast: scoring candidates", unit="stat",
               disable=not config.show_progress)
    damping = config.damping

    def run(job):
        g, key = job
        names = [t.name for t in by_key[key]]
        c = normalized(candidates[g].covariance(key, torch.float64))
        lam = find_damping(c, damping.start, damping.tol, damping.max_iter, what=f"layer(s) {names} (candidate {g})")
        c_f = damp(c, lam)
        ev = torch.linalg.eigvalsh(c_f)
        lo, hi = float(ev[0]), float(ev[-1])
        out = {}
        for t in by_key[key]:
            pi = _pi(lo, hi, t.d_out)  # > 1 on a unit-mean-diagonal covariance: log π > 0
            m = t.weight_matrix().detach().to(device=c.device, dtype=torch.float64) @ c_f
            gram = m @ m.mT if m.shape[0] <= m.shape[1] else m.mT @ m
            sigma = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().flip(0).cpu()
            out[t.name] = (pi, sigma, lam)
        bar.update(1)
        return g, out

    results: dict[str, list] = {t.name: [None] * len(candidates) for ts in by_key.values() for t in ts}
    on_cpu = all(s.device.type == "cpu" for c in candidates for s in c.sums.values())
    try:
        done = map_per_core(run, jobs, on_cpu)
    finally:
        bar.close()
    for g, out in done:
        for name, v in out.items():
            results[name][g] = v
    return results


def _select(targets: list, results: dict, pconf) -> tuple[list[PlusLayer], list[LayerSpectrum]]:
    """Per layer the candidate with the lowest selection score (a group in which the layer never ran cannot be
    chosen; ties → the lowest index)."""
    layers, spectra = [], []
    for t in targets:
        if t.name not in results:
            continue
        per = results[t.name]
        scores = [math.inf if v is None else selection_score(v[0], v[1], rank=t.rank, sum_over=pconf.selection_sum)
                  for v in per]
        best = min(range(len(scores)), key=lambda i: (scores[i], i))
        pi, sigma, lam = per[best]
        layers.append(PlusLayer(t.name, t.d_in, t.d_out, best, scores, pi, lam, t.rank))
        spectra.append(LayerSpectrum(t.name, sigma, math.log(pi), t.d_in, t.d_out))
    return layers, spectra


def _patterns(layers: list[PlusLayer], ranks: dict, by_name: dict, pconf, use_rslora: bool) -> tuple[dict, dict]:
    """PEFT ``rank_pattern`` / ``alpha_pattern`` with an escaped full-name entry for every layer."""
    rank_pattern, alpha_pattern = {}, {}
    for l in layers:
        t = by_name[l.name]
        l.rank = ranks[l.name]
        if pconf.alpha == "scaling":
            l.alpha = t.scaling * (math.sqrt(l.rank) if use_rslora else l.rank)
        else:
            l.alpha = t.alpha
        key = re.escape(l.name)
        rank_pattern[key] = l.rank
        alpha_pattern[key] = l.alpha
    return rank_pattern, alpha_pattern


def _selected_statistics(candidates: list[CovarianceStats], layers: list[PlusLayer],
                         layer_keys: dict) -> CovarianceStats:
    """One :class:`CovarianceStats` holding, per (input, chosen candidate), its statistic: key ``input@candidate``."""
    sums, n_samples, n_tokens, members = {}, {}, {}, {}
    for l in layers:
        key = layer_keys[l.name]
        src = candidates[l.candidate]
        new = f"{key}@{l.candidate}"
        if new not in sums:
            sums[new] = src.sums[key]
            n_samples[new], n_tokens[new], members[new] = src.n_samples[key], src.n_tokens[key], []
        members[new].append(l.name)
    first = candidates[0]
    return CovarianceStats(sums, n_samples, n_tokens, members, first.normalization, first.model_fingerprint,
                           meta={**first.meta, "selected": True})
