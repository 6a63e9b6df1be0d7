"""CorDA++ building blocks: compactness metric, covariance selection score, dynamic rank allocation.

The definitions follow ``shared/reference/corda_spec.md`` §5.2 (transcribed, not yet checked against the paper) with
every uncertain choice an explicit option:

- compactness ``π(C_f) = √(d_out·λ_max(C_f)) / λ_min(C_f)`` (eigenvalues of the damped covariance, §5.3) — the
  bound ``‖ΔY‖₁ ≤ π·σ`` on the output change from discarding a component of singular value σ;
- selection score ``log π · Σ σ_{−k}/σ_max`` summed over all components (``sum_over="all"``, as transcribed) or over
  the ``r`` adapted ones (``"adapter"``), lower is better; candidates are compared after scaling each to unit mean
  diagonal (``normalize=True``), since ``π(cC) = π(C)/√c`` while the σ-ratios are scale-free;
- rank allocation: every layer starts at ``min_rank``; the layer with the lowest score
  ``log π · σ_{−(r+1)} / Σ_{k≤R−r−1} σ_k`` (the next component's relative weight) gets the next rank, until the
  budget is used (a heap over layers and prefix sums of the spectra: O(steps · log layers)).

Not wired into ``init_adapters`` yet (candidate statistics from one forward pass are the missing piece).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Optional

import torch


def compactness(c_f: torch.Tensor, d_out: int) -> float:
    """``π = √(d_out·λ_max) / λ_min`` of a damped (positive definite) covariance ``(d_in, d_in)``."""
    ev = torch.linalg.eigvalsh(c_f.double())
    lo, hi = float(ev[0]), float(ev[-1])
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
                   max_rank: Optional[int] = None) -> dict[str, int]:
    """Dynamic rank allocation under a parameter budget.

    Args:
        layers: spectra of the candidate layers.
        budget: total adapter parameters ``Σ (d_in + d_out)·r_l`` to reach (default in CorDA++: the count of a
            uniform rank).
        min_rank / max_rank: bounds per layer (``max_rank`` is also capped by ``min(d_in, d_out)``).
    Returns:
        ``{name: rank}``. Stops at the first step that would exceed the budget by more than one layer's step, and
        never leaves a step unused that would fit, so the realised count is within one step of the budget.
    """
    ranks, heap, caps = {}, [], {}
    prefix = {}
    spent = 0
    for i, l in enumerate(layers):
        full = min(l.d_in, l.d_out, l.sigma.numel())
        cap = full if max_rank is None else min(full, max_rank)
        if min_rank > cap:
            raise ValueError(f"min_rank={min_rank} exceeds the max rank {cap} of layer '{l.name}'.")
        ranks[l.name], caps[l.name] = min_rank, cap
        spent += (l.d_in + l.d_out) * min_rank
        s = l.sigma.double()
        prefix[l.name] = torch.cat([torch.zeros(1, dtype=torch.float64), s.cumsum(0)])  # prefix[k] = Σ_{≤k} σ
        heapq.heappush(heap, (_score(l, min_rank, prefix[l.name]), i))
    if spent > budget:
        raise ValueError(f"budget {budget} is below the minimum {spent} (min_rank={min_rank} on every layer).")
    while heap:
        score, i = heapq.heappop(heap)
        l = layers[i]
        step = l.d_in + l.d_out
        if ranks[l.name] >= caps[l.name]:
            continue
        if spent + step > budget:
            continue  # this layer's step does not fit; a smaller one might
        ranks[l.name] += 1
        spent += step
        if ranks[l.name] < caps[l.name]:
            heapq.heappush(heap, (_score(l, ranks[l.name], prefix[l.name]), i))
    return ranks


def _score(l: LayerSpectrum, r: int, prefix: torch.Tensor) -> float:
    """``log π · σ_{−(r+1)} / Σ_{k ≤ R−r−1} σ_k``: the relative weight of the next component to adapt."""
    n = l.sigma.numel()
    if r + 1 > n:
        return math.inf
    nxt = float(l.sigma[n - r - 1])
    rest = float(prefix[n - r - 1])
    return l.log_pi * (nxt / rest if rest > 0 else math.inf)


def allocation_cost(layers: list[LayerSpectrum], ranks: dict[str, int]) -> int:
    """Adapter parameter count ``Σ (d_in + d_out)·r_l``."""
    return sum((l.d_in + l.d_out) * ranks[l.name] for l in layers)
