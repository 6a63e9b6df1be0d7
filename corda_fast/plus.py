"""CorDA++ building blocks: compactness metric, covariance selection score, dynamic rank allocation.

The definitions (``docs/corda_plus.md``) leave some choices open; those that mattered in
``benchmarks/ablation_plus.py`` are options of :class:`~corda_fast.config.PlusConfig`, the others arguments of
:func:`decide`:

- compactness ``π(C_f) = √(d_out·λ_max(C_f)) / λ_min(C_f)`` (extreme eigenvalues of the damped covariance) — the
  bound ``‖ΔY‖₁ ≤ π·σ`` on the output change from discarding a component of singular value σ. All candidates of one
  statistic are damped with one ``λ`` (the largest any of them needs), so the comparison between them is not
  decided by the damping search (``λ_min(C_f)`` is mostly ``λ`` on real activations);
- selection score ``log π · Σ σ_k/σ_max`` over all components (``"all"``, as transcribed), over the ``r`` adapted
  ones (``"adapter"``), or ``log π · Σσ²/σ_max²`` (``"frobenius"``, the stable rank); lower is better;
  candidates are compared after scaling each to unit mean diagonal, since ``π(cC) = π(C)/√c`` while the σ-ratios
  are scale-free;
- rank allocation: every layer starts at ``min_rank``; the layer with the lowest score
  ``log π · σ_{−r} / Σ_{k≤R−r} σ_k`` (the relative weight of the component last taken, as transcribed; ``"next"``
  uses the component the next step would take) gets the next rank, until the budget is used (a heap over layers
  and prefix sums of the spectra: O(steps · log layers)).

:func:`plan` runs the whole CorDA++ preprocessing between calibration (``calibrate.collect_candidates``: the
candidate statistics of one forward pass) and decomposition: :func:`score_candidates` (damping, compactness and
spectra per candidate) and :func:`decide` (selection per layer, allocation, the PEFT ``rank_pattern`` /
``alpha_pattern`` to build the model with).
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

from . import offload
from .config import PlusConfig
from .decompose import map_per_core
from .ops import damp_, find_damping, gram_basis, gram_matrix, trim_basis
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
                   max_rank: Optional[int] = None, mode: str = "kpm", score_at: str = "current",
                   layer_caps: Optional[dict] = None) -> dict[str, int]:
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
        layer_caps: optional per-layer caps ``{name: max rank}`` on top of ``max_rank``.
        mode: ``"kpm"`` or ``"ipm"``; score_at: ``"next"`` or ``"current"``.
    Returns ``{name: rank}``, O(steps · log layers) with a heap and prefix sums of the spectra.
    """
    if mode not in ("kpm", "ipm"):
        raise ValueError(f"mode={mode!r}: expected 'kpm' or 'ipm'.")
    if score_at not in ("next", "current"):
        raise ValueError(f"score_at={score_at!r}: expected 'next' or 'current'.")
    caps, prefix, full = _allocation_bounds(layers, budget, min_rank, max_rank, layer_caps)
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


def _allocation_bounds(layers: list[LayerSpectrum], budget: int, min_rank: int, max_rank: Optional[int],
                       layer_caps: Optional[dict]) -> tuple[dict, dict, dict]:
    """``(cap, prefix sums of σ, number of σ)`` per layer; raises when ``min_rank`` or ``budget`` cannot be met."""
    caps, prefix, full = {}, {}, {}
    for l in layers:
        n = min(l.d_in, l.d_out, l.sigma.numel())
        cap = n if max_rank is None else min(n, max_rank)
        if layer_caps is not None:
            cap = min(cap, layer_caps[l.name])
        if min_rank > cap:
            raise ValueError(f"min_rank={min_rank} exceeds the max rank {cap} of layer '{l.name}'.")
        caps[l.name], full[l.name] = cap, l.sigma.numel()
        prefix[l.name] = torch.cat([torch.zeros(1, dtype=torch.float64), l.sigma.double().cumsum(0)])
    floor = sum((l.d_in + l.d_out) * min_rank for l in layers)
    if floor > budget:
        raise ValueError(f"budget {budget} is below the minimum {floor} (min_rank={min_rank} on every layer).")
    return caps, prefix, full


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
    bases: dict = field(default_factory=dict)  # layer -> (gram basis, eigenvalue scale), with plan(keep_bases=True)

    def rank_histogram(self) -> dict:
        """``{module kind: {rank: number of layers}}``, the kind being the last component of the layer name."""
        out: dict = {}
        for l in self.layers:
            kind = out.setdefault(l.name.rsplit(".", 1)[-1], {})
            kind[l.rank] = kind.get(l.rank, 0) + 1
        return {k: dict(sorted(v.items())) for k, v in out.items()}

    def histogram_table(self) -> str:
        """The allocation per module kind as a markdown table: layers, mean / min / max rank, and the number of
        layers per rank range (powers of two)."""
        edges = [1, 2, 4, 8, 16, 32, 64, 128, 256]
        labels = [f"{a}" if b - a == 1 else f"{a}–{b - 1}" for a, b in zip(edges, edges[1:])] + [f"≥{edges[-1]}"]
        rows = ["| module | layers | mean | min | max | " + " | ".join(labels) + " |",
                "|---|---:|---:|---:|---:|" + "---:|" * len(labels)]
        for kind, hist in self.rank_histogram().items():
            ranks = [r for r, n in hist.items() for _ in range(n)]
            counts = [0] * len(labels)
            for r in ranks:
                counts[sum(r >= e for e in edges) - 1] += 1
            rows.append(f"| {kind} | {len(ranks)} | {sum(ranks) / len(ranks):.1f} | {min(ranks)} | {max(ranks)} | "
                        + " | ".join(str(c) if c else "" for c in counts) + " |")
        return "\n".join(rows)

    def table(self) -> str:
        """A markdown table of the per-layer decisions, then the rank histogram per module kind."""
        rows = ["| layer | shape | π (compactness) | candidate | scores | rank (uniform) |",
                "|---|---|---:|---:|---|---:|"]
        for l in self.layers:
            sc = ", ".join(f"{v:.4g}" for v in l.scores)
            rows.append(f"| {l.name} | {l.d_out}×{l.d_in} | {l.compactness:.4g} | {l.candidate} | {sc} | "
                        f"{l.rank} ({l.uniform_rank}) |")
        rows.append(f"\nbudget {self.budget} adapter parameters, realised {self.realised}\n")
        rows.append(self.histogram_table())
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


@dataclass
class CandidateScore:
    """What selection and allocation need of one candidate on one layer, at the layer's shared damping ``λ``.

    ``log_pi``: log compactness of the damped unit-mean-diagonal covariance; ``frobenius``: ``Σσ²/σ_max²`` of
    ``W·C_f`` (its stable rank); ``sigma``: the spectrum of ``W·C_f`` (descending, float64); ``scale``: the raw
    covariance's mean diagonal (what normalisation divided out)."""

    log_pi: float
    frobenius: float
    sigma: torch.Tensor
    scale: float
    basis: Optional[tuple] = None  # :func:`ops.gram_basis` of the normalized W·C_f, kept for the decomposition


@dataclass
class CandidateScores:
    """Output of :func:`score_candidates`: ``layers[name][g]`` (``None`` where candidate ``g`` never saw the layer)
    and the damping ``λ`` shared by all candidates of each statistic."""

    layers: dict
    damping: dict
    layer_keys: dict
    seconds: float = 0.0


@torch.no_grad()
def plan(candidates: list[CovarianceStats], targets: list, config, use_rslora: bool = False,
         keep_bases: bool = False) -> PlusPlan:
    """CorDA++ between calibration and decomposition: :func:`score_candidates`, then :func:`decide`.

    Args:
        candidates: ``calibrate.collect_candidates`` output (same keys in every group).
        targets: resolved targets (their ``rank`` is the uniform rank; ``module.weight`` is read only).
        config: :class:`CordaConfig` (``mode``, ``damping``, ``plus``: budget, ranks, scoring options).
        use_rslora: the LoRA scaling rule (``LoraConfig.use_rslora``), for ``plus.alpha="scaling"``.
        keep_bases: keep each layer's scored eigen-decomposition (one candidate only) in ``PlusPlan.bases``, so the
            decomposition reuses it instead of computing it again: the eigenvalues and the eigenvectors a rank up to
            the layer's cap (else ``KEEP_FACTOR`` times its uniform rank) needs, float64, held meanwhile.
    Returns:
        :class:`PlusPlan`; ``rank_pattern`` / ``alpha_pattern`` key every layer by its escaped full name.
    """
    scores = score_candidates(candidates, targets, config, keep_bases=keep_bases and len(candidates) == 1)
    return decide(candidates, scores, targets, config, use_rslora=use_rslora)


@torch.no_grad()
def score_candidates(candidates: list[CovarianceStats], targets: list, config,
                     keep_bases: bool = False) -> CandidateScores:
    """Every candidate of every layer scored at one damping per statistic.

    Per statistic (one job per statistic, spread over the CPU cores): each candidate's covariance scaled to unit mean
    diagonal; the damping ``λ`` is the largest any candidate needs (the CorDA rule, searched from the previous
    candidate's ``λ`` up, so the extra candidates mostly cost one Cholesky trial), and every candidate is damped with
    it — the candidates of a layer differ in their data only, never in their damping. Then the extreme eigenvalues
    of ``C_f`` (for ``π``) and, per layer, the spectrum of ``M = W·C_f`` (float64, from its Gram matrix).
    """
    t0 = time.perf_counter()
    by_key = CovarianceStats.groups_over(candidates, targets)
    layer_keys = {t.name: key for key, group in by_key.items() for t in group}
    bar = tqdm(total=len(by_key), desc="corda_fast: scoring candidates", unit="stat", disable=not config.show_progress)
    damping = config.damping
    on_cpu = all(s.device.type == "cpu" for c in candidates for s in c.sums.values())

    def run(key):
        lam, scales = _shared_damping(candidates, key, [t.name for t in by_key[key]], damping)
        if on_cpu:
            offload.release_host_memory()
        out = {t.name: [None] * len(candidates) for t in by_key[key]}
        for g, scale in enumerate(scales):
            if scale is None:
                continue
            c_f = damp_(_normalized(candidates[g], key, scale), lam)  # unit mean diagonal: C + λ·I
            ev = torch.linalg.eigvalsh(c_f)
            lo, hi = float(ev[0]), float(ev[-1])
            for t in by_key[key]:
                sigma, basis = _layer_spectrum(t, c_f, _kept_vectors(t, config) if keep_bases else 0, config.mode)
                out[t.name][g] = CandidateScore(math.log(_pi(lo, hi, t.d_out)),
                                                float((sigma**2).sum() / sigma[0] ** 2), sigma, scale, basis)
            del c_f, ev
            if on_cpu:
                offload.release_host_memory()
        bar.update(1)
        return key, lam, out

    try:
        done = map_per_core(run, list(by_key), on_cpu)
    finally:
        bar.close()
    layers, lams = {}, {}
    for key, lam, out in done:
        lams[key] = lam
        layers.update(out)
    return CandidateScores(layers, lams, layer_keys, time.perf_counter() - t0)


def candidate_score(s: CandidateScore, selection_sum: str, rank: int, mode: str, normalize: bool = True) -> float:
    """Selection score of one candidate (lower is better): ``log π ·`` ``Σσ/σ_max`` over all components
    (``"all"``), over the ``rank`` adapted ones (``"adapter"``: the smallest in KPM, the largest in IPM), or
    ``Σσ²/σ_max²`` (``"frobenius"``: the stable rank). ``normalize=False`` scores the raw
    covariance (``π(cC) = π(C)/√c``): kept for the ablation only."""
    log_pi = s.log_pi if normalize else s.log_pi - 0.5 * math.log(s.scale)
    if selection_sum == "frobenius":
        return log_pi * s.frobenius
    sig = s.sigma.double()
    if selection_sum == "adapter":
        sig = sig[sig.numel() - rank:] if mode == "kpm" else sig[:rank]
    elif selection_sum != "all":
        raise ValueError(f"selection_sum={selection_sum!r}: expected 'all', 'adapter' or 'frobenius'.")
    return log_pi * float(sig.sum() / s.sigma[0])


@torch.no_grad()
def decide(candidates: Optional[list[CovarianceStats]], scores: CandidateScores, targets: list, config,
           use_rslora: bool = False, selection_sum: str = "all", score_at: str = "current",
           normalize: bool = True) -> PlusPlan:
    """Selection (per layer the candidate with the lowest :func:`candidate_score`; ties → the lowest index; a group
    in which the layer never ran cannot be chosen), :func:`allocate_ranks` under ``config.plus.budget`` (default:
    the uniform ranks' count) and the PEFT patterns.

    ``candidates=None`` (streaming CorDA++: the statistics are gone once scored) leaves ``PlusPlan.stats`` empty;
    :func:`selected_statistics` picks each block's chosen statistics in the second pass.

    ``selection_sum`` (:func:`candidate_score`), ``score_at`` (:func:`allocate_ranks`) and ``normalize`` are the
    transcription's open choices; ``benchmarks/ablation_plus.py`` found no reason to offer them (docs/corda_plus.md):
    ``"adapter"`` sums learned less in both modes, ``score_at="next"`` gave KPM the same result and IPM more
    forgetting than the literal ``"current"``, raw covariances changed few choices and make ``π`` scale-dependent.
    They stay arguments here for the ablation, not options of :class:`~corda_fast.config.PlusConfig`."""
    pconf = config.plus or PlusConfig()
    t0 = time.perf_counter()
    layers, chosen = [], []
    for t in targets:
        if t.name not in scores.layers:
            continue
        per = scores.layers[t.name]
        sel = [math.inf if v is None else candidate_score(v, selection_sum, t.rank, config.mode, normalize)
               for v in per]
        best = min(range(len(sel)), key=lambda i: (sel[i], i))
        key = scores.layer_keys[t.name]
        layers.append(PlusLayer(t.name, t.d_in, t.d_out, best, sel, math.exp(per[best].log_pi),
                                scores.damping[key], t.rank))
        chosen.append((t, best, per[best]))
    spectra = [LayerSpectrum(t.name, s.sigma, s.log_pi, t.d_in, t.d_out) for t, g, s in chosen]
    budget = pconf.budget if pconf.budget is not None else sum((l.d_in + l.d_out) * l.uniform_rank for l in layers)
    ranks = allocate_ranks(spectra, budget, pconf.min_rank, pconf.max_rank, config.mode, score_at,
                           layer_caps=_caps(layers, pconf))
    rank_pattern, alpha_pattern = _patterns(layers, ranks, {t.name: t for t in targets}, pconf, use_rslora)
    realised = allocation_cost(spectra, ranks)
    if realised < budget - max((l.d_in + l.d_out) for l in layers):
        logger.warning("CorDA++: only %d of the %d-parameter budget could be used (every layer at its max rank).",
                       realised, budget)
    stats = _selected_statistics(candidates, layers, scores.layer_keys) if candidates is not None else None
    seconds = {"score": scores.seconds, "select_allocate": time.perf_counter() - t0}
    logger.info("CorDA++: %d layers, %d candidates scored in %.2fs; ranks %d..%d, %d of %d budget parameters",
                len(layers), len(layers[0].scores) if layers else 0, seconds["score"], min(ranks.values()), max(ranks.values()),
                realised, budget)
    bases = {l.name: (scores.layers[l.name][l.candidate].basis, scores.layers[l.name][l.candidate].scale ** 2)
             for l in layers if scores.layers[l.name][l.candidate].basis is not None}
    return PlusPlan(stats, rank_pattern, alpha_pattern, layers, budget, realised, seconds, bases)


def _caps(layers: list[PlusLayer], pconf) -> Optional[dict]:
    """Per-layer rank caps from ``max_rank_factor`` (a multiple of the layer's uniform rank), or ``None``."""
    if pconf.max_rank_factor is None:
        return None
    return {l.name: max(pconf.min_rank, int(pconf.max_rank_factor * l.uniform_rank)) for l in layers}


# Eigenvectors kept per layer for the decomposition to reuse, as a multiple of its uniform rank (when no cap bounds
# the allocated rank): a layer allocated more is computed afresh.
KEEP_FACTOR = 4


def _kept_vectors(t, config) -> int:
    """How many eigenvectors of ``t``'s scored basis the decomposition may need: its rank cap, else
    ``KEEP_FACTOR`` times its uniform rank."""
    pconf = config.plus or PlusConfig()
    caps = [c for c in (pconf.max_rank, int(pconf.max_rank_factor * t.rank) if pconf.max_rank_factor else None)
            if c is not None]
    return max(1, min(caps) if caps else KEEP_FACTOR * t.rank)


def _normalized(cand: CovarianceStats, key: str, scale: float) -> torch.Tensor:
    """The candidate's float64 covariance scaled to unit mean diagonal (a zero statistic left as it is: the damping
    search refuses it by name)."""
    c = cand.covariance(key, torch.float64)
    return c.div_(scale) if scale > 0 else c


def _shared_damping(candidates: list[CovarianceStats], key: str, names: list, damping) -> tuple[float, list]:
    """``(λ, [scale or None per candidate])``: the largest damping any candidate of statistic ``key`` needs, searched
    candidate after candidate from the previous one's ``λ`` up on a float32 copy (one candidate's float64 at a
    time, never all of them at once)."""
    lam, scales = damping.start, []
    for g, cand in enumerate(candidates):
        if key not in cand.sums:
            scales.append(None)
            continue
        c = cand.covariance(key, torch.float64)
        scale = float(torch.diagonal(c).mean())
        c32 = (c.div_(scale) if scale > 0 else c).float()
        del c
        lam = find_damping(c32, lam, damping.tol, damping.max_iter, what=f"layer(s) {names} (candidate {g})",
                           overwrite=True)
        del c32
        scales.append(scale)
    return lam, scales


def _layer_spectrum(t, c_f: torch.Tensor, keep: int, mode: str) -> tuple[torch.Tensor, Optional[tuple]]:
    """``(σ of W·C_f descending, the gram basis or None)``; with ``keep`` > 0 the eigenvectors are computed too and
    the ``keep`` a decomposition can use are kept (:func:`ops.trim_basis`)."""
    w = t.weight_matrix().detach().to(c_f.device)  # converted to float64 a row block at a time
    if not keep:
        return torch.linalg.eigvalsh(gram_matrix(w, c_f)).clamp(min=0).sqrt().flip(0).cpu(), None
    basis, _ = gram_basis(w, c_f, keep_m=False)
    return basis[0].clamp(min=0).sqrt().flip(0).cpu(), trim_basis(basis, keep, mode)


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


def merge_scores(into: Optional[CandidateScores], more: CandidateScores) -> CandidateScores:
    """The scores of two disjoint sets of layers (streaming CorDA++: block after block) as one."""
    if into is None:
        return more
    into.layers.update(more.layers)
    into.damping.update(more.damping)
    into.layer_keys.update(more.layer_keys)
    into.seconds += more.seconds
    return into


def selected_statistics(candidates: list[CovarianceStats], plan: PlusPlan, layer_keys: dict) -> CovarianceStats:
    """The chosen statistics of the layers ``candidates`` hold (one block's, in streaming CorDA++'s second pass),
    keyed and damped as :func:`decide` would have kept them."""
    present = {n for c in candidates for n in c.layer_keys()}
    return _selected_statistics(candidates, [l for l in plan.layers if l.name in present], layer_keys)


def _selected_statistics(candidates: list[CovarianceStats], layers: list[PlusLayer],
                         layer_keys: dict) -> CovarianceStats:
    """One :class:`CovarianceStats` holding, per (input, chosen candidate), its statistic: key ``input@candidate``;
    ``meta["damping"]`` carries the shared ``λ`` each was scored with: the decomposition damps it with that ``λ`` as it
    is (no second search, which could round the other way and damp the adapters unlike the scores)."""
    sums, n_samples, n_tokens, members, starts = {}, {}, {}, {}, {}
    for l in layers:
        key = layer_keys[l.name]
        src = candidates[l.candidate]
        new = f"{key}@{l.candidate}"
        if new not in sums:
            sums[new] = src.sums[key]
            n_samples[new], n_tokens[new], members[new] = src.n_samples[key], src.n_tokens[key], []
            starts[new] = l.damping
        members[new].append(l.name)
    first = candidates[0]
    return CovarianceStats(sums, n_samples, n_tokens, members, first.normalization, first.model_fingerprint,
                           meta={**first.meta, "selected": True, "damping": starts})
