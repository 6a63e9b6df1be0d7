"""CorDA++ end to end: candidate statistics in one pass, selection, allocation, the PEFT model it builds."""

import json
import math

import pytest
import torch

import corda_fast
from corda_fast.calibrate import CalibrationError, collect_candidates, collect_covariance
from corda_fast.plus import LayerSpectrum, allocate_ranks, plan, score_candidates
from corda_fast.targets import resolve_targets

from helpers import (
    Setup,
    assert_model_unchanged,
    init,
    model_state,
    padded_batches,
    random_samples,
    rel,
    rel_max,
    tiny_gpt2,
    tiny_llama,
)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_candidates_come_from_one_pass_and_add_up_to_the_whole():
    model = tiny_llama()
    batches = padded_batches(random_samples(10), 2)  # 5 batches -> groups of 2, 2, 1 batches
    calls = []
    h = model.model.register_forward_pre_hook(lambda *a: calls.append(1))
    cfg = Setup()
    cands = collect_candidates(model, batches, 3, *cfg.stage)
    n_pass = len(calls)
    whole = collect_covariance(model, batches, *cfg.stage)
    h.remove()
    assert n_pass == len(batches)  # one forward per batch, not one per candidate
    assert len(cands) == 3 and all(c.layer_keys() == whole.layer_keys() for c in cands)
    assert [c.n_samples[next(iter(c.sums))] for c in cands] == [4, 4, 2]
    for key, total in whole.sums.items():
        assert rel(sum(c.sums[key].double() for c in cands), total) < 1e-6
        assert sum(c.n_tokens[key] for c in cands) == whole.n_tokens[key]


def _reference_scores(cand_stats, target):
    """Float64 π and selection score of one layer per candidate, written independently of corda_fast.plus: every
    candidate damped with the largest λ any of them needs."""
    covs = []
    for stats in cand_stats:
        key = stats.layer_keys()[target.name]
        c = stats.sums[key].double() / stats.n_samples[key]
        covs.append(c / c.diagonal().mean())
    lam = max(corda_fast.stages.find_damping(c) for c in covs)
    out = []
    for c in covs:
        c_f = c + torch.eye(c.shape[0], dtype=torch.float64) * lam
        ev = torch.linalg.eigvalsh(c_f)
        pi = math.sqrt(target.d_out * float(ev[-1])) / float(ev[0])
        s = torch.linalg.svdvals(target.weight_matrix().detach().double() @ c_f)
        out.append((pi, math.log(pi) * float(s.sum() / s[0]), lam))
    return out


def test_plan_scores_match_float64_reference_and_pick_the_argmin():
    model = tiny_llama(hidden=64)
    cfg = Setup(rank=4, mode="kpm")
    targets = resolve_targets(model, cfg.lora)
    cands = collect_candidates(model, padded_batches(random_samples(8, seed=5), 2), 4, cfg.corda, targets)
    p = plan(cands, targets, cfg.corda)
    chosen = {l.candidate for l in p.layers}
    assert len(chosen) > 1  # the data differ enough that different layers pick different candidates
    for l in p.layers:
        t = next(t for t in targets if t.name == l.name)
        ref = _reference_scores(cands, t)
        for (pi_ref, s_ref, lam), s in zip(ref, l.scores):
            assert s == pytest.approx(s_ref, rel=1e-8)
        assert l.damping == ref[0][2]
        assert l.candidate == min(range(len(ref)), key=lambda i: ref[i][1])
        assert l.compactness == pytest.approx(ref[l.candidate][0], rel=1e-8)


def _spiked_sum(d, bulk, seed):
    """A statistic with one outlier direction and a decaying bulk of level ``bulk``: the smaller the bulk, the
    larger the outlier's share of the (normalised) trace and the larger the damping the CorDA rule needs."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    ev = bulk * torch.logspace(-1, -9, d, dtype=torch.float64)
    ev[0] = 1.0
    return ((q * ev) @ q.T).float()


def test_a_candidates_score_does_not_jump_when_only_its_damping_would_change():
    """Candidate 0 is nudged across a doubling of the damping it would need on its own (its own λ changes 2x);
    candidate 1 needs more. Scored at the shared λ, candidate 0's score moves continuously (by the nudge), where a
    per-candidate damping would move its log π by about log 2."""
    model = tiny_llama(hidden=96)
    cfg = Setup(rank=4, mode="kpm", damping_start=1e-5)  # small start: a 96-wide statistic can need doublings
    targets = resolve_targets(model, cfg.lora)
    cands = collect_candidates(model, padded_batches(random_samples(4, seed=2), 2), 2, cfg.corda, targets)
    key = cands[0].layer_keys()[targets[0].name]
    d = cands[0].sums[key].shape[0]

    def own(bulk, seed=0):
        c = _spiked_sum(d, bulk, seed).double()
        return corda_fast.stages.find_damping(c / c.diagonal().mean(), start=1e-5)

    bulks = torch.logspace(1, -4, 200, dtype=torch.float64).tolist()
    lams = [own(b) for b in bulks]
    jump = next(i for i in range(1, len(bulks)) if lams[i] > lams[i - 1])  # crossing a doubling
    lo, hi = bulks[jump - 1], bulks[jump]
    assert lams[jump] == 2 * lams[jump - 1]
    other = bulks[-1] / 10
    assert own(other, 1) > lams[jump]  # candidate 1 needs a larger λ
    cands[1].sums[key] = _spiked_sum(d, other, 1) * cands[1].n_samples[key]
    got = {}
    for bulk in (lo, hi):
        cands[0].sums[key] = _spiked_sum(d, bulk, 0) * cands[0].n_samples[key]
        sc = score_candidates(cands, targets, cfg.corda)
        got[bulk] = (sc.layers[targets[0].name][0].log_pi, sc.damping[key])
    assert got[lo][1] == got[hi][1] == own(other, 1)  # one λ for both candidates, unchanged by the nudge
    nudge = abs(math.log(lo / hi))  # the nudge of the bulk, in log units
    assert abs(got[hi][0] - got[lo][0]) <= nudge
    assert math.log(2) > 5 * nudge  # the test is sharp: a per-candidate damping would have jumped by ~log 2


def test_identical_candidates_change_nothing():
    """N copies of one batch give N identical candidates: the result equals one candidate on that batch."""
    batch = padded_batches(random_samples(3, seed=9), 3)
    ids = torch.randint(0, 300, (2, 9))
    models = {}
    for n in (1, 3):
        model = tiny_llama()
        pm = init(model, batch * n, mode="kpm", rank=4, plus=True, candidates=n)
        models[n] = pm
    sd1 = {k: v for k, v in models[1].state_dict().items() if "lora_" in k}
    sd3 = {k: v for k, v in models[3].state_dict().items() if "lora_" in k}
    assert sd1.keys() == sd3.keys()
    for k in sd1:
        assert sd1[k].shape == sd3[k].shape
        assert rel(sd3[k], sd1[k]) < 1e-6, k
    assert torch.allclose(logits(models[1], ids), logits(models[3], ids), rtol=0, atol=1e-5)


def test_plan_is_invariant_to_the_global_scale_of_candidates():
    model = tiny_llama(hidden=64)
    cfg = Setup(rank=4, mode="ipm")
    targets = resolve_targets(model, cfg.lora)
    cands = collect_candidates(model, padded_batches(random_samples(8, seed=3), 2), 2, cfg.corda, targets)
    p1 = plan(cands, targets, cfg.corda)
    for c, k in zip(cands, (7.0, 0.01)):  # each candidate by its own factor: normalisation removes it
        c.sums = {key: s * k for key, s in c.sums.items()}
    p2 = plan(cands, targets, cfg.corda)
    assert [(l.candidate, l.rank) for l in p1.layers] == [(l.candidate, l.rank) for l in p2.layers]
    for a, b in zip(p1.layers, p2.layers):
        assert b.scores == pytest.approx(a.scores, rel=1e-6)


def test_allocation_ignores_the_scale_of_a_spectrum():
    g = torch.Generator().manual_seed(0)
    layers = [LayerSpectrum(f"l{i}", torch.sort(torch.rand(20, generator=g, dtype=torch.float64) ** 3,
                                                  descending=True).values, 1.0 + i / 5, 20, 30) for i in range(6)]
    budget = 50 * 4 * 6
    for mode in ("kpm", "ipm"):
        ranks = allocate_ranks(layers, budget, mode=mode)
        scaled = [LayerSpectrum(l.name, l.sigma * (10.0 ** i), l.log_pi, l.d_in, l.d_out) for i, l in enumerate(layers)]
        assert allocate_ranks(scaled, budget, mode=mode) == ranks


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
@pytest.mark.parametrize("score_at", ["next", "current"])
def test_allocation_modes_budget_and_bounds(mode, score_at):
    g = torch.Generator().manual_seed(1)
    layers = [LayerSpectrum(f"l{i}", torch.sort(torch.rand(16 + i, generator=g, dtype=torch.float64)
                                                  * torch.logspace(0, -2 - i % 3, 16 + i, dtype=torch.float64),
                                                  descending=True).values, 1.0 + (i % 4) / 2, 16 + i, 24)
              for i in range(8)]
    budget = sum((l.d_in + l.d_out) * 5 for l in layers)
    ranks = allocate_ranks(layers, budget, min_rank=2, max_rank=12, mode=mode, score_at=score_at)
    cost = sum((l.d_in + l.d_out) * ranks[l.name] for l in layers)
    assert budget - max(l.d_in + l.d_out for l in layers) < cost <= budget
    assert all(2 <= ranks[l.name] <= 12 for l in layers)
    assert len(set(ranks.values())) > 1
    twins = [LayerSpectrum(f"t{i}", layers[0].sigma, layers[0].log_pi, layers[0].d_in, layers[0].d_out)
             for i in range(4)]
    assert len(set(allocate_ranks(twins, 4 * 40 * 3, mode=mode, score_at=score_at).values())) == 1


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_model_unchanged_at_init_and_non_uniform_ranks_saved_with_plain_peft(mode, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    ids = torch.randint(0, 300, (3, 13))
    before = logits(model, ids)
    pm, report = init(model, padded_batches(random_samples(12), 2), mode=mode, rank=6,
                                          plus=True, candidates=3, return_report=True)
    after = logits(pm, ids)
    assert float((after - before).abs().max()) <= 1e-5 * float(before.abs().max())
    ranks = {l["name"]: l["rank"] for l in report.layers}
    assert len(set(ranks.values())) > 1
    n_params = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    assert n_params == report.plus.realised <= report.plus.budget
    assert report.plus.budget == sum((t.d_in + t.d_out) * 6 for t in resolve_targets(tiny_llama(), Setup().lora))
    for name, r in ranks.items():
        layer = pm.base_model.model.get_submodule(name)
        assert layer.r["default"] == r and layer.lora_A["default"].weight.shape[0] == r
        assert layer.scaling["default"] == pytest.approx(1.0)  # plus_alpha="scaling": the uniform scaling kept
    pm.save_pretrained(tmp_path / "adapter")
    corda_fast.save_residual_base(pm, str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert len(cfg["rank_pattern"]) == len(ranks)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert torch.equal(logits(loaded, ids), after)
    report.plus.plot(str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert report.plus.table().count("\n| model.layers.") == len(ranks)


def test_plus_alpha_keeps_peft_alpha_when_asked():
    model = tiny_gpt2()
    pm, report = init(model, padded_batches(random_samples(8), 2), rank=4, lora_alpha=8,
                                          plus=True, candidates=2, alpha="alpha", return_report=True)
    for l in report.layers:
        assert l["scaling"] == pytest.approx(8 / l["rank"])


def test_explicit_budget_and_min_max_rank():
    model = tiny_llama()
    targets = resolve_targets(model, Setup().lora)
    step = {t.name: t.d_in + t.d_out for t in targets}
    budget = sum(step.values()) * 3
    pm, report = init(model, padded_batches(random_samples(8), 2), mode="kpm", rank=8,
                                          plus=True, candidates=2, budget=budget, min_rank=2, max_rank=5,
                                          return_report=True)
    ranks = {l["name"]: l["rank"] for l in report.layers}
    assert all(2 <= r <= 5 for r in ranks.values())
    assert budget - max(step.values()) < sum(step[n] * r for n, r in ranks.items()) <= budget
    q = [r for n, r in ranks.items() if n.endswith("q_proj")]
    assert f"q_proj {sum(q) / len(q):.1f} ({min(q)}–{max(q)})" in report.summary()


def test_max_rank_factor_caps_each_layer_at_a_multiple_of_its_uniform_rank():
    model = tiny_llama()
    batches = padded_batches(random_samples(8), 2)
    free = init(tiny_llama(), batches, mode="kpm", rank=4, plus=True, candidates=2, return_report=True)[1]
    assert max(l["rank"] for l in free.layers) > 8  # uncapped, the allocation concentrates
    pm, report = init(model, batches, mode="kpm", rank=4, plus=True, candidates=2, max_rank_factor=2.0,
                      return_report=True)
    ranks = [l["rank"] for l in report.layers]
    assert max(ranks) <= 8 and len(set(ranks)) > 1
    step = {l.name: l.d_in + l.d_out for l in report.plus.layers}
    assert report.plus.realised <= report.plus.budget
    assert report.plus.budget - report.plus.realised < max(step.values())  # the cap leaves room: budget still used


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(candidates=7), CalibrationError, "7 candidate groups"),
    (dict(streaming=True, candidates=7), CalibrationError, "7 candidate groups"),
    (dict(budget=10), ValueError, "below the minimum"),
    (dict(covariance_cache="x.safetensors"), ValueError, "covariance_cache"),
    (dict(min_rank=100), ValueError, "min_rank=100 exceeds the max rank 64 of layer .model.layers.0.self_attn.k_proj"),
])
def test_bad_plus_input_leaves_model_unchanged(kwargs, err, match):
    model = tiny_llama()
    before = model_state(model)
    kw = dict(mode="kpm", rank=4, plus=True, candidates=2)
    kw.update(kwargs)
    with pytest.raises(err, match=match):
        init(model, padded_batches(random_samples(6), 2), **kw)
    assert_model_unchanged(model, before)


def _adapters(pm):
    out = {}
    for name, m in pm.base_model.model.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            out[name] = (m.lora_A["default"].weight.detach().double(), m.lora_B["default"].weight.detach().double(),
                         m.get_base_layer().weight.detach().double())
    return out


@pytest.mark.parametrize("mode,candidates", [("kpm", 2), ("ipm", 1), ("ipm", 3)])
def test_streaming_plus_equals_one_pass_plus(mode, candidates):
    """Two passes block by block (scores kept, statistics dropped; then the chosen ones recomputed) give the one-pass
    plan and adapters: float64, same ranks, same candidates, factors within 1e-6."""
    batches = padded_batches(random_samples(9, seed=4), 2)
    kw = dict(mode=mode, rank=4, plus=True, candidates=candidates, precision="float64", return_report=True)
    pm1, r1 = init(tiny_llama(layers=3), batches, **kw)
    pm2, r2 = init(tiny_llama(layers=3), batches, streaming=True, **kw)
    assert r2.source == "plus_streaming" and r1.source == "plus"
    assert [(l.name, l.candidate, l.rank) for l in r1.plus.layers] == [(l.name, l.candidate, l.rank)
                                                                        for l in r2.plus.layers]
    assert len({l.rank for l in r1.plus.layers}) > 1 or candidates == 1
    assert (r2.n_samples, r2.n_tokens) == (r1.n_samples, r1.n_tokens)
    a1, a2 = _adapters(pm1), _adapters(pm2)
    assert a1.keys() == a2.keys() and len(a1) == 21
    for name in a1:
        for x, y in zip(a1[name], a2[name]):
            assert rel_max(y, x) <= 1e-6, name
    assert 0 < r2.statistics_mib < r1.statistics_mib  # one block's candidates at a time


def test_streaming_plus_refuses_too_few_batches_before_any_change():
    model = tiny_llama()
    before = model_state(model)
    with pytest.raises(CalibrationError, match="3 candidate groups"):
        init(model, padded_batches(random_samples(4), 2), mode="kpm", rank=4, plus=True, candidates=3,
             streaming=True)
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_reusing_the_scored_eigenbases_gives_the_same_factors(mode, monkeypatch):
    """One candidate: the decomposition reuses the eigen-decomposition scoring computed (W·C_f on the unit-mean
    covariance, eigenvalues rescaled) instead of computing it again; the factors equal the recomputed ones."""
    from corda_fast.decompose import decompose

    model = tiny_llama(layers=2)
    cfg = Setup(mode=mode, rank=4, plus=True)
    targets = resolve_targets(model, cfg.lora)
    cands = collect_candidates(model, padded_batches(random_samples(6, seed=3), 2), 1, cfg.corda, targets)
    reused, fresh = plan(cands, targets, cfg.corda, keep_bases=True), plan(cands, targets, cfg.corda)
    assert len(reused.bases) == len(targets) and not fresh.bases
    assert reused.rank_pattern == fresh.rank_pattern and len(set(reused.rank_pattern.values())) > 1
    lora = cfg.lora.replace(rank_pattern=reused.rank_pattern, alpha_pattern=reused.alpha_pattern)
    ranked = resolve_targets(model, lora)
    recomputed = []
    real_gram = corda_fast.ops.linalg.gram_basis

    def counted(*a, **k):
        recomputed.append(a[0].shape)
        return real_gram(*a, **k)

    monkeypatch.setattr(corda_fast.ops.linalg, "gram_basis", counted)
    searched, real_search = [], corda_fast.decompose.find_damping
    monkeypatch.setattr(corda_fast.decompose, "find_damping", lambda *a, **k: searched.append(a) or real_search(*a, **k))
    a = decompose(reused.stats, ranked, cfg.corda, bases=dict(reused.bases))
    assert not searched  # the selected statistics are damped with the λ they were scored with, not searched again
    assert all(a[l.name].damping == l.damping for l in reused.layers)
    within = [t for t in ranked if t.rank <= 4 * 4]  # KEEP_FACTOR x the uniform rank 4: those reuse their basis
    assert within and len(recomputed) == len(ranked) - len(within)  # the others computed afresh
    b = decompose(fresh.stats, ranked, cfg.corda)
    assert len(recomputed) == 2 * len(ranked) - len(within)  # without bases every layer computes its own
    real = corda_fast.ops.triplets_from_basis
    # a rank beyond the kept eigenvectors is refused (the caller recomputes), never read from the wrong columns
    w, c = torch.randn(6, 9, dtype=torch.float64), torch.eye(9, dtype=torch.float64) * 2
    basis = corda_fast.ops.trim_basis(corda_fast.ops.gram_basis(w, c)[0], 2, mode)
    assert real(basis, w, c, 3, mode) is None and real(basis, w, c, 2, mode) is not None
    for name in b:
        da = a[name].scaling * (a[name].B.double() @ a[name].A.double())
        db = b[name].scaling * (b[name].B.double() @ b[name].A.double())
        assert rel(da, db) <= 1e-5, name
        assert torch.allclose(a[name].singular_values.double(), b[name].singular_values.double(), rtol=1e-5)
