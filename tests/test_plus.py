"""CorDA++ building blocks: properties that must hold whatever the paper's exact formulas."""

import math

import pytest
import torch

from corda_fast.plus import (
    CandidateScore,
    LayerSpectrum,
    allocate_ranks,
    allocation_cost,
    candidate_score,
    compactness,
    normalized,
)


def spectrum(name, n, seed, d_in=None, d_out=None, log_pi=2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.sort(torch.rand(n, generator=g, dtype=torch.float64) * torch.logspace(0, -3, n, dtype=torch.float64),
                   descending=True).values
    return LayerSpectrum(name, s, log_pi, d_in or n, d_out or n)


def test_compactness_of_scaled_identity_and_scale_law():
    for c, d_out in ((3.0, 7), (0.5, 16)):
        assert compactness(torch.eye(5, dtype=torch.float64) * c, d_out) == pytest.approx(math.sqrt(d_out * c) / c)
    x = torch.randn(50, 6, dtype=torch.float64)
    cov = x.T @ x / 50
    assert compactness(4 * cov, 9) == pytest.approx(compactness(cov, 9) / 2)  # π(cC) = π(C)/√c
    with pytest.raises(ValueError, match="positive definite"):
        compactness(torch.zeros(3, 3), 2)


def _score(c, w, lam=0.01, **kw):
    c = normalized(c)
    c_f = c + lam * torch.eye(c.shape[0], dtype=c.dtype)
    sigma = torch.linalg.svdvals(w @ c_f)
    s = CandidateScore(math.log(compactness(c_f, w.shape[0])), float((sigma**2).sum() / sigma[0] ** 2), sigma, 1.0)
    return candidate_score(s, **{"selection_sum": "all", "rank": 2, "mode": "kpm", **kw})


def test_selection_score_scale_invariant_after_normalisation_and_variants():
    x = torch.randn(80, 8, dtype=torch.float64)
    cov = x.T @ x / 80
    w = torch.randn(5, 8, dtype=torch.float64)
    for kw in ({}, {"selection_sum": "adapter"}, {"selection_sum": "adapter", "mode": "ipm"},
               {"selection_sum": "frobenius"}):
        assert _score(cov, w, **kw) == pytest.approx(_score(100 * cov, w, **kw))
    assert _score(cov, w, selection_sum="adapter") < _score(cov, w)  # a partial sum of positive terms (log π > 0)
    assert _score(cov, w, selection_sum="adapter") < _score(cov, w, selection_sum="adapter", mode="ipm")
    with pytest.raises(ValueError, match="selection_sum"):
        _score(cov, w, selection_sum="some")
    flat = CandidateScore(2.0, 3.0, torch.ones(3, dtype=torch.float64), 4.0)
    assert candidate_score(flat, "frobenius", 2, "kpm") == 6.0
    assert candidate_score(flat, "all", 2, "kpm", normalize=False) == pytest.approx((2.0 - 0.5 * math.log(4.0)) * 3)


@pytest.mark.parametrize("min_rank,max_rank", [(1, None), (2, 6)])
def test_allocation_respects_budget_and_bounds(min_rank, max_rank):
    layers = [spectrum(f"l{i}", 12 + i, seed=i, d_in=12 + i, d_out=20, log_pi=1.0 + i / 3) for i in range(7)]
    budget = sum((l.d_in + l.d_out) * 4 for l in layers)  # uniform rank 4
    ranks = allocate_ranks(layers, budget, min_rank, max_rank)
    cost = allocation_cost(layers, ranks)
    assert cost <= budget
    open_steps = [l.d_in + l.d_out for l in layers if ranks[l.name] < min(l.d_in, l.d_out, max_rank or 10**9)]
    assert not open_steps or budget - cost < max(open_steps)  # used within one step
    for l in layers:
        assert min_rank <= ranks[l.name] <= min(l.d_in, l.d_out, max_rank or 10**9)
    assert len(set(ranks.values())) > 1  # non-uniform: the scores matter


def test_identical_layers_get_identical_ranks():
    layers = [spectrum(f"l{i}", 16, seed=0) for i in range(5)]
    budget = sum((l.d_in + l.d_out) * 3 for l in layers)
    assert set(allocate_ranks(layers, budget).values()) == {3}


def test_budget_too_small_and_min_rank_too_big():
    layers = [spectrum("a", 4, seed=0)]
    with pytest.raises(ValueError, match="below the minimum"):
        allocate_ranks(layers, 1)
    with pytest.raises(ValueError, match="min_rank=5 exceeds"):
        allocate_ranks(layers, 10**6, min_rank=5)


def test_large_allocation_stays_within_budget():
    layers = [spectrum(f"l{i}", 256, seed=i, log_pi=1.0 + (i % 7)) for i in range(300)]
    budget = sum((l.d_in + l.d_out) * 64 for l in layers)
    ranks = allocate_ranks(layers, budget)  # ~19k steps over 300 layers (heap + prefix sums)
    assert allocation_cost(layers, ranks) <= budget
