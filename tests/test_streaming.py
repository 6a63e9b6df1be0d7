"""Streaming (block-by-block) calibration: same statistics and adapters as all-at-once, bounded memory."""


import pytest
import torch

import corda_fast
from corda_fast import CalibrationError
from corda_fast.streaming import iter_block_statistics

from helpers import (
    Setup,
    assert_model_unchanged,
    init,
    model_state,
    padded_batches,
    random_samples,
    rel,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)


def collect_covariance_streaming(model, loader, config, targets, cache_device=None):
    """Every block's statistics from iter_block_statistics, merged into one (the comparison needs them all)."""
    merged = None
    for stats in iter_block_statistics(model, loader, config, targets, cache_device):
        merged = stats if merged is None else merged.merge(stats)
    return merged


@pytest.mark.parametrize("make", ["llama", "gpt2", "bert"])
def test_streaming_statistics_equal_all_at_once(make):
    model = {"llama": lambda: tiny_llama(layers=4), "gpt2": tiny_gpt2, "bert": tiny_bert}[make]()
    batches = padded_batches(random_samples(7, lo=3, hi=30), 3, side="left")
    cfg = Setup()
    targets = corda_fast.stages.resolve_targets(model, cfg.lora, check_rank=False)
    full = corda_fast.stages.collect_covariance(model, batches, cfg.corda, targets)
    streamed = collect_covariance_streaming(model, batches, cfg.corda, targets)
    assert streamed.members == full.members
    for k in full.sums:
        assert streamed.n_samples[k] == full.n_samples[k] and streamed.n_tokens[k] == full.n_tokens[k]
        assert rel(streamed.covariance(k), full.covariance(k)) <= 1e-6, k


def test_streaming_adapters_equal_and_peak_memory_is_one_block():
    batches = padded_batches(random_samples(8), 4)
    cfg = Setup()
    model = tiny_llama(layers=4)
    targets = corda_fast.stages.resolve_targets(model, cfg.lora, check_rank=False)
    full = corda_fast.stages.collect_covariance(model, batches, cfg.corda, targets)
    peak = max(s.nbytes() for s in iter_block_statistics(model, batches, cfg.corda, targets))
    assert peak * 4 == full.nbytes()  # 4 identical blocks: one block's worth at a time

    a, ra = init(tiny_llama(layers=4), batches, mode="kpm", rank=6, return_report=True)
    b, rb = init(tiny_llama(layers=4), batches, mode="kpm", rank=6, streaming=True,
                                     return_report=True)
    assert rb.streaming and not ra.streaming
    assert rb.statistics_mib * 4 == pytest.approx(ra.statistics_mib)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        assert rel(sb[k], sa[k]) <= 1e-6, k


def test_streaming_cpu_cache_device():
    batches = padded_batches(random_samples(4), 2)
    cfg = Setup()
    model = tiny_llama()
    targets = corda_fast.stages.resolve_targets(model, cfg.lora, check_rank=False)
    a = collect_covariance_streaming(model, batches, cfg.corda, targets, cache_device="cpu")
    b = corda_fast.stages.collect_covariance(model, batches, cfg.corda, targets)
    for k in b.sums:
        assert rel(a.covariance(k), b.covariance(k)) <= 1e-6


def test_streaming_errors_leave_model_unchanged():
    model = tiny_llama()
    model.train()
    before = model_state(model)
    batches = padded_batches(random_samples(4), 2)
    with pytest.raises(CalibrationError, match=r"outside it: \['lm_head'\]"):
        init(model, batches, target_modules=["q_proj", "lm_head"], streaming=True, rank=2)
    assert_model_unchanged(model, before)

    def boom(module, args, kwargs):
        raise RuntimeError("block 1 exploded")

    h = model.model.layers[1].register_forward_pre_hook(boom, with_kwargs=True)
    before = model_state(model)
    with pytest.raises(RuntimeError, match="block 1 exploded"):
        init(model, batches, streaming=True, rank=2)
    assert_model_unchanged(model, before)
    h.remove()
    with pytest.raises(CalibrationError, match="no batches"):
        init(model, [], streaming=True, rank=2)
    with pytest.raises(ValueError, match="covariance_cache"):
        init(model, batches, streaming=True, covariance_cache="x.safetensors")


def test_streaming_names_poisoned_batch():
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("nan")
    batches = padded_batches(random_samples(6), 2)
    batches[1]["input_ids"][0, 0] = 7
    with pytest.raises(CalibrationError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*batch 1"):
        init(model, batches, streaming=True, rank=2)


def test_streaming_runs_without_autograd():
    """Block by block, no graph is recorded (the model's weights require grad, as a user's usually do)."""
    model = tiny_llama()
    model.requires_grad_(True)
    seen = []
    for block in model.model.layers:
        block.register_forward_hook(lambda m, a, out: seen.append((torch.is_grad_enabled(), out[0].requires_grad
                                                                   if isinstance(out, tuple) else out.requires_grad)))
    init(model, padded_batches(random_samples(4), 2), rank=4, streaming=True)
    assert seen and not any(g or r for g, r in seen)
