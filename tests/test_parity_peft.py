"""Parity with PEFT's preprocess_corda: both judged against an independent float64 reference."""

import copy

import pytest
import torch

import corda_fast

from helpers import (
    Setup,
    base_weight,
    capture_inputs,
    init,
    lora_delta,
    padded_batches,
    random_samples,
    reference_covariance,
    reference_damping,
    reference_factors,
    rel,
    tiny_llama,
)

pytest.importorskip("attr", reason="PEFT's CorDA imports attrs")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_corda(model, samples, mode, rank, alpha):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="corda",
                     corda_config=PeftCordaConfig(corda_method=mode))

    def run():
        for s in samples:
            model(s.unsqueeze(0))

    preprocess_corda(model, cfg, run_model=run)
    return get_peft_model(model, cfg)


def _geomean(xs):
    return float(torch.tensor(xs, dtype=torch.float64).log().mean().exp())


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("svd_method", ["gram", "svd"])
@pytest.mark.slow
def test_parity_with_peft_against_float64(mode, seed, svd_method):
    """Each implementation against a float64 run of the same algorithm on its own calibration forward:
    PEFT's fp32 adapters vs float64 CorDA on PEFT's batch-size-1 activations; ours (batched, left-padded) vs our
    float64 options on the same batches.

    IPM: per layer, ours <= max(1e-4, 2x PEFT's error). KPM adapts the smallest components of an ill-conditioned
    W·C_f: fp32 rounding of the statistic (~1e-7) is amplified up to ~1e4 on the o_proj layers of a random model,
    so every fp32 implementation lands 1e-4..5e-3 off, and which one is closer on one layer depends on the
    summation order (we measured 7e-4..4.6e-3 for the same layer across batch layouts). For KPM the per-layer
    bound is therefore 10x, the geometric mean over layers keeps the 2x, and test_same_statistic_* below shows
    the decomposition itself is as accurate as PEFT's layer by layer."""
    rank, alpha = 8, 16
    base = tiny_llama(hidden=128, layers=2, seed=seed)
    samples = random_samples(12, lo=6, hi=48, seed=10 + seed)
    names = [n for n, m in base.named_modules() if n.split(".")[-1] in TARGETS]
    batches = padded_batches(samples, 5, side="left")

    inputs = capture_inputs(base, names, samples)  # PEFT's own activations (fp32 forward, batch size 1)
    peft_model = peft_corda(copy.deepcopy(base), samples, mode, rank, alpha)
    kw = dict(mode=mode, rank=rank, lora_alpha=alpha, target_modules=TARGETS)
    ours = init(copy.deepcopy(base), batches, svd_method=svd_method, **kw)
    ours64 = init(copy.deepcopy(base), batches, precision="float64", **kw)
    factor = 2 if mode == "ipm" else 10
    errs = {"peft": [], "ours": [], "wpeft": [], "wours": []}
    for n in names:
        c = reference_covariance(inputs[n])
        w = base.get_submodule(n).weight.detach()
        d_ref, w_ref = reference_factors(w, c, rank, mode, alpha / rank, reference_damping(c))
        e_peft, e_ours = rel(lora_delta(peft_model, n), d_ref), rel(lora_delta(ours, n), lora_delta(ours64, n))
        assert e_ours <= max(1e-4, factor * e_peft), f"{n}: ours {e_ours:.2e} vs PEFT {e_peft:.2e}"
        ew_peft, ew_ours = rel(base_weight(peft_model, n), w_ref), rel(base_weight(ours, n), base_weight(ours64, n))
        assert ew_ours <= max(1e-4, factor * ew_peft), f"{n}: W_res ours {ew_ours:.2e} vs PEFT {ew_peft:.2e}"
        # both float64 runs compute the same adapter: they differ only by the fp32 forward's batching noise
        assert rel(lora_delta(ours64, n), d_ref) < (1e-2 if mode == "kpm" else 1e-4), n
        for k, v in (("peft", e_peft), ("ours", e_ours), ("wpeft", ew_peft), ("wours", ew_ours)):
            errs[k].append(v)
    assert _geomean(errs["ours"]) <= 2 * _geomean(errs["peft"]), errs
    assert _geomean(errs["wours"]) <= 2 * _geomean(errs["wpeft"]), errs
    # the checks must be able to fail: the adapter is far from the other mode's
    n0 = names[0]
    c = reference_covariance(inputs[n0])
    d_other, _ = reference_factors(base.get_submodule(n0).weight.detach(), c, rank, "ipm" if mode == "kpm" else "kpm",
                                   alpha / rank, reference_damping(c))
    assert rel(lora_delta(ours, n0), d_other) > 0.5


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_same_statistic_decomposition_as_accurate_as_peft(mode):
    """Given the very same fp32 statistic, our decomposition (Cholesky solve of the kept columns) is as accurate
    as PEFT's (explicit inverse, full V̂), layer by layer, against float64."""
    from corda_fast.ops import decompose_layer, find_damping

    rank, s = 8, 2.0
    base = tiny_llama(hidden=128, layers=2, seed=3)
    samples = random_samples(12, lo=6, hi=48, seed=13)
    names = [n for n, m in base.named_modules() if n.split(".")[-1] in TARGETS]
    inputs = capture_inputs(base, names, samples)
    for n in names:
        c = reference_covariance(inputs[n]).float()
        lam = find_damping(c)
        assert lam == reference_damping(c)
        w = base.get_submodule(n).weight.detach()
        d_ref, _ = reference_factors(w, c.double(), rank, mode, s, lam)
        cf = c + torch.eye(c.shape[0]) * torch.diagonal(c).mean() * lam
        u, sv, vh = torch.linalg.svd(w @ cf, full_matrices=False)  # PEFT's arithmetic
        v = (vh @ torch.linalg.inv(cf)).T
        idx = slice(0, rank) if mode == "ipm" else slice(-rank, None)
        sr = sv[idx] / s
        e_peft = rel(s * (u[:, idx] * sr.sqrt()) @ (v[:, idx].T * sr.sqrt().unsqueeze(1)), d_ref)
        a, b, _ = decompose_layer(w, torch.linalg.cholesky(cf), cf, rank, mode, s)
        e_ours = rel(s * b @ a, d_ref)
        assert e_ours <= max(1e-5, 1.5 * e_peft), f"{n}: ours {e_ours:.2e} vs PEFT {e_peft:.2e}"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.slow
def test_ipm_end_to_end_against_float64_forward(seed):
    """IPM (well conditioned): both implementations against float64 CorDA on a float64 forward pass."""
    rank, alpha = 8, 16
    base = tiny_llama(hidden=128, layers=2, seed=seed)
    samples = random_samples(12, lo=6, hi=48, seed=10 + seed)
    names = [n for n, m in base.named_modules() if n.split(".")[-1] in TARGETS]
    inputs = capture_inputs(copy.deepcopy(base).double(), names, samples)
    peft_model = peft_corda(copy.deepcopy(base), samples, "ipm", rank, alpha)
    ours = init(copy.deepcopy(base), padded_batches(samples, 5, side="right"), mode="ipm",
                                    rank=rank, lora_alpha=alpha, target_modules=TARGETS)
    for n in names:
        c = reference_covariance(inputs[n])
        d_ref, _ = reference_factors(base.get_submodule(n).weight.detach(), c, rank, "ipm", alpha / rank,
                                     reference_damping(c))
        e_peft, e_ours = rel(lora_delta(peft_model, n), d_ref), rel(lora_delta(ours, n), d_ref)
        assert e_ours <= max(1e-4, 2 * e_peft), f"{n}: ours {e_ours:.2e} vs PEFT {e_peft:.2e}"


def test_statistics_equal_peft_covariance():
    """Our batched, padded statistics equal PEFT's batch-size-1 covariance_matrix (fp32 both)."""
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
    from peft.tuners.lora.corda import calib_cov_distribution

    base = tiny_llama(hidden=64, layers=1)
    samples = random_samples(7)
    cfg = LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="corda",
                     corda_config=PeftCordaConfig(corda_method="ipm"))
    model = copy.deepcopy(base)
    calib_cov_distribution(model, cfg, lambda: [model(s.unsqueeze(0)) for s in samples], None, None)
    stats = corda_fast.stages.collect_covariance(base, padded_batches(samples, 3, side="right"),
                                          *Setup(target_modules=TARGETS).stage)
    for n, m in model.named_modules():
        if hasattr(m, "covariance_matrix"):
            ours = stats.covariance(stats.key_of(n))
            assert rel(ours, m.covariance_matrix) < 1e-6, n
