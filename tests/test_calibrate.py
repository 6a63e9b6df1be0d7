"""Statistics: hook maths, padding and batch invariance, shared inputs, loader forms."""

import copy

import pytest
import torch
from torch import nn

import corda_fast

from helpers import (
    Setup,
    capture_inputs,
    init,
    padded_batches,
    random_samples,
    reference_covariance,
    rel,
    tiny_bert,
    tiny_gpt2,
)


class TwoLinear(nn.Module):
    """x -> (a(x), b(x)) then c(a*b): a and b share their input."""

    def __init__(self, d=7, h=5):
        super().__init__()
        self.a = nn.Linear(d, h)
        self.b = nn.Linear(d, h)
        self.c = nn.Linear(h, 3)

    def forward(self, input_ids=None, attention_mask=None):
        x = input_ids
        return self.c(self.a(x) * self.b(x))


@pytest.mark.parametrize("normalization", ["peft", "absmax", "none"])
def test_hook_maths_matches_float64_formula(normalization):
    model = TwoLinear().double().float()
    xs = [torch.randn(n, 7) - 0.3 for n in (1, 4, 9)]  # mostly negative: |signed max| != max|x|
    stats = corda_fast.stages.collect_covariance(model, [x.unsqueeze(0) for x in xs],
                                          *Setup(target_modules=["a", "b"], normalization=normalization).stage)
    ref = reference_covariance([x.double() for x in xs], normalization)
    got = stats.covariance(stats.key_of("a"))
    assert got.dtype == torch.float32
    assert rel(got, ref) < 1e-6
    assert stats.n_samples[stats.key_of("a")] == 3 and stats.n_tokens[stats.key_of("a")] == 14
    if normalization == "peft":  # the signed-max quirk is really applied
        alt = reference_covariance([x.double() for x in xs], "absmax")
        assert rel(got, alt) > 1e-2


def test_shared_input_detected_at_run_time():
    model = TwoLinear()
    stats = corda_fast.stages.collect_covariance(model, [torch.randn(2, 6, 7)], *Setup(target_modules=["a", "b", "c"]).stage)
    assert stats.key_of("a") == stats.key_of("b") != stats.key_of("c")
    assert len(stats.sums) == 2
    off = corda_fast.stages.collect_covariance(model, [torch.randn(2, 6, 7)],
                                        *Setup(target_modules=["a", "b", "c"], share_inputs=False).stage)
    assert len(off.sums) == 3


def test_llama_sharing_groups(llama):
    stats = corda_fast.stages.collect_covariance(llama, [torch.randint(0, 300, (2, 9))], *Setup().stage)
    groups = sorted(sorted(n.split(".")[-1] for n in v) for v in stats.members.values())
    assert groups.count(["k_proj", "q_proj", "v_proj"]) == 2
    assert groups.count(["gate_proj", "up_proj"]) == 2
    assert groups.count(["o_proj"]) == 2 and groups.count(["down_proj"]) == 2


def test_dedup_gives_identical_adapters(llama):
    batches = padded_batches(random_samples(6), 3)
    a = init(copy.deepcopy(llama), batches, rank=4)
    b = init(copy.deepcopy(llama), batches, rank=4, share_inputs=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("make", ["llama", "gpt2", "bert"])
def test_padding_invariance(side, make, llama):
    model = {"llama": lambda: llama, "gpt2": tiny_gpt2, "bert": tiny_bert}[make]()
    samples = random_samples(7, lo=3, hi=30)
    cfg = Setup()
    ref = corda_fast.stages.collect_covariance(model, [s.unsqueeze(0) for s in samples], *cfg.stage)
    got = corda_fast.stages.collect_covariance(model, padded_batches(samples, 4, side=side), *cfg.stage)
    assert got.members == ref.members
    for k in ref.sums:
        assert got.n_samples[k] == ref.n_samples[k] == 7
        assert got.n_tokens[k] == ref.n_tokens[k] == sum(len(s) for s in samples)
        assert rel(got.covariance(k), ref.covariance(k)) < 1e-6, k


def test_statistics_equal_float64_capture(llama):
    samples = random_samples(5)
    stats = corda_fast.stages.collect_covariance(llama, padded_batches(samples, 2), *Setup().stage)
    names = stats.layer_names()
    inputs = capture_inputs(llama, names, samples)
    for name in names:
        assert rel(stats.covariance(stats.key_of(name)), reference_covariance(inputs[name])) < 1e-5, name


def test_all_padding_row_and_loader_forms(llama):
    samples = random_samples(4)
    batches = padded_batches(samples, 4)
    # an extra all-padding row must not count as a sample
    ids = torch.cat([batches[0]["input_ids"], torch.zeros(1, batches[0]["input_ids"].shape[1], dtype=torch.long)])
    mask = torch.cat([batches[0]["attention_mask"], torch.zeros(1, ids.shape[1], dtype=torch.long)])
    cfg = Setup()
    ref = corda_fast.stages.collect_covariance(llama, batches, *cfg.stage)
    for loader in ([{"input_ids": ids, "attention_mask": mask}], [(ids, mask)]):
        got = corda_fast.stages.collect_covariance(llama, loader, *cfg.stage)
        for k in ref.sums:
            assert got.n_samples[k] == 4
            assert rel(got.covariance(k), ref.covariance(k)) < 1e-6


def test_callable_loader_like_peft(llama):
    samples = random_samples(3)
    cfg = Setup()
    ref = corda_fast.stages.collect_covariance(llama, [s.unsqueeze(0) for s in samples], *cfg.stage)
    got = corda_fast.stages.collect_covariance(llama, lambda: [llama(s.unsqueeze(0)) for s in samples], *cfg.stage)
    for k in ref.sums:
        assert rel(got.covariance(k), ref.covariance(k)) < 1e-6


def test_max_batches(llama):
    batches = padded_batches(random_samples(6), 2)
    got = corda_fast.stages.collect_covariance(llama, batches, *Setup(max_batches=2).stage)
    assert max(got.n_samples.values()) == 4


def test_float64_accumulation_option(llama):
    stats = corda_fast.stages.collect_covariance(llama, padded_batches(random_samples(3), 3),
                                          *Setup(precision="float64").stage)
    assert all(s.dtype == torch.float64 for s in stats.sums.values())


def test_pad_batches_layout():
    seqs = [[5, 6, 7], [8]]
    (right,) = corda_fast.pad_batches(seqs, 2, pad_id=9)
    (left,) = corda_fast.pad_batches(seqs, 2, pad_id=9, side="left")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="side='middle'"):
        corda_fast.pad_batches(seqs, 2, side="middle")


def test_progress_rate_counts_batches_that_have_run(monkeypatch):
    """The bar's tok_s is tokens of batches whose forward has run over the bar's own elapsed time (a batch is not
    credited when it is handed out, before its forward)."""
    import time

    from corda_fast import calibrate

    seen = []

    class Bar(calibrate.tqdm):
        def set_postfix(self, **kw):
            seen.append((kw["tokens"], float(kw["tok_s"]), self.format_dict["elapsed"]))
            return super().set_postfix(**kw)

    monkeypatch.setattr(calibrate, "tqdm", Bar)
    batches = padded_batches(random_samples(6, lo=8, hi=8), 2)  # 3 batches of 16 real tokens
    config = corda_fast.CordaConfig(show_progress=True)
    for _ in calibrate.iter_batches(batches, config, torch.device("cpu"), "testing"):
        time.sleep(0.2)  # the "forward"
    assert [t for t, _, _ in seen] == [16, 32, 48]  # counted after each batch ran, the last one too
    for tokens, rate, elapsed in seen:
        assert rate == pytest.approx(tokens / elapsed, rel=0.05) and rate <= tokens / 0.19
