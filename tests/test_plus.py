"""CorDA++ building blocks: properties that must hold whatever the paper's exact formulas."""

import math

import pytest
import torch

from corda_fast.plus import LayerSpectrum, allocate_ranks, allocation_cost, compactness, normalized, selection_score


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


def test_selection_score_scale_invariant_after_normalisation_and_variants():
    x = torch.randn(80, 8, dtype=torch.float64)
    cov = x.T @ x / 80
    w = torch.randn(5, 8, dtype=torch.float64)

    def score(c, **kw):
        c = normalized(c)
        return selection_score(compactness(c, 5), torch.linalg.svdvals(w @ c), **kw)

    assert score(cov) == pytest.approx(score(100 * cov))
    assert score(cov, rank=2, sum_over="adapter") == pytest.approx(score(7 * cov, rank=2, sum_over="adapter"))
    assert score(cov, rank=2, sum_over="adapter") < score(cov)  # a partial sum of positive terms (log π > 0)
    with pytest.raises(ValueError, match="sum_over"):
        selection_score(2.0, torch.ones(3), sum_over="some")


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
