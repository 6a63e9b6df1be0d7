"""PEFT's own CorDA entry point made fast: corda_fast.preprocess_corda (PEFT's contract), patch_peft (PEFT's documented
flow, unchanged, runs corda_fast), every peft.CordaConfig field honoured or refused by name, and init_adapters taking
the mode from PEFT's CordaConfig."""

import copy
import logging
import math

import pytest
import torch

import corda_fast

from helpers import (
    capture_inputs,
    lora_delta,
    padded_batches,
    random_samples,
    reference_covariance,
    reference_damping,
    reference_factors,
    rel,
    rel_max,
    tiny_llama,
)

pytest.importorskip("attr", reason="PEFT's CorDA imports attrs")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_flow(model, samples, mode, batch=1, **corda_kw):
    """PEFT's documented CorDA example, verbatim apart from the batching of run_model."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    lora_config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights="corda",
                             corda_config=CordaConfig(corda_method=mode, **corda_kw))
    batches = padded_batches(samples, batch, side="left")

    def run_model():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    preprocess_corda(model, lora_config, run_model=run_model)
    return get_peft_model(model, lora_config)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_patched_peft_flow_matches_peft_against_float64(mode):
    base = tiny_llama(seed=3)
    samples = random_samples(12, lo=6, hi=40, seed=21)
    names = [n for n, _ in base.named_modules() if n.split(".")[-1] in TARGETS]
    inputs = capture_inputs(base, names, samples)
    unpatched = peft_flow(copy.deepcopy(base), samples, mode)
    with corda_fast.patched_peft():
        patched = peft_flow(copy.deepcopy(base), samples, mode)
    import peft.tuners.lora.corda as peft_corda

    assert peft_corda.preprocess_corda is not corda_fast.preprocess_corda  # the patch is undone
    factor = 2 if mode == "ipm" else 10
    errs = {"peft": [], "ours": []}
    for n in names:
        c = reference_covariance(inputs[n])
        d_ref, _ = reference_factors(base.get_submodule(n).weight.detach(), c, 8, mode, 2.0, reference_damping(c))
        e_peft, e_ours = rel(lora_delta(unpatched, n), d_ref), rel(lora_delta(patched, n), d_ref)
        assert e_ours <= max(1e-4, factor * e_peft), f"{n}: ours {e_ours:.2e} vs PEFT {e_peft:.2e}"
        errs["peft"].append(e_peft)
        errs["ours"].append(e_ours)
    geo = {k: math.exp(sum(math.log(max(v, 1e-30)) for v in vs) / len(vs)) for k, vs in errs.items()}
    assert geo["ours"] <= 2 * geo["peft"], geo
    ids = torch.randint(1, 300, (2, 9))
    with torch.no_grad():
        assert rel_max(patched(input_ids=ids).logits, base(input_ids=ids).logits) < 1e-5  # identity at init


def test_run_model_may_batch_padded_samples():
    """4 samples per forward, left-padded: the same adapters as one sample per forward (padding left out, each
    sample normalised alone)."""
    base = tiny_llama(seed=4)
    samples = random_samples(12, lo=5, hi=30, seed=22)
    one = peft_flow_ours(copy.deepcopy(base), samples, "ipm", batch=1)
    four = peft_flow_ours(copy.deepcopy(base), samples, "ipm", batch=4)
    for n, _ in base.named_modules():
        if n.split(".")[-1] in TARGETS:
            assert rel(lora_delta(four, n), lora_delta(one, n)) < 1e-4, n


def peft_flow_ours(model, samples, mode, batch=1, **corda_kw):
    with corda_fast.patched_peft():
        return peft_flow(model, samples, mode, batch=batch, **corda_kw)


def test_every_peft_corda_field(tmp_path, caplog):
    base = tiny_llama(seed=5)
    samples = random_samples(8, lo=5, hi=30, seed=23)
    cache = tmp_path / "eigens.pt"
    cov = tmp_path / "cov.pt"
    with caplog.at_level(logging.INFO, logger="corda_fast"):
        first = peft_flow_ours(copy.deepcopy(base), samples, "kpm", cache_file=str(cache), covariance_file=str(cov),
                               verbose=True, use_float16_for_covariance=True, prune_temporary_fields=False)
    assert cache.is_file() and cov.is_file()
    assert "use_float16_for_covariance is not honoured" in caplog.text  # said, with the reason
    assert "model.layers.0.self_attn.q_proj: rank 8" in caplog.text  # verbose
    # cache_file: reused without calibrating (run_model never called)
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig

    model = copy.deepcopy(base)
    lc = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights="corda",
                    corda_config=CordaConfig(corda_method="kpm", cache_file=str(cache)))
    corda_fast.preprocess_corda(model, lc, run_model=lambda: pytest.fail("calibrated although cache_file exists"))
    again = get_peft_model(model, lc)
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(lora_delta(again, name), lora_delta(first, name))
    # covariance_file (PEFT's format): the covariances are reused, the same adapters come out
    model = copy.deepcopy(base)
    lc = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights="corda",
                    corda_config=CordaConfig(corda_method="kpm", covariance_file=str(cov)))
    corda_fast.preprocess_corda(model, lc, run_model=lambda: pytest.fail("calibrated although covariance_file exists"))
    assert rel(lora_delta(get_peft_model(model, lc), name), lora_delta(first, name)) < 1e-6
    # corda_fast's own safetensors statistics cache at that path is read too
    stats = corda_fast.stages.collect_covariance(copy.deepcopy(base), padded_batches(samples, 1),
                                                 corda_fast.CordaConfig(show_progress=False),
                                                 corda_fast.LoraSpec.from_peft(lc))
    ours = tmp_path / "cov.safetensors"
    stats.save(str(ours))
    lc.corda_config.covariance_file = str(ours)
    model = copy.deepcopy(base)
    corda_fast.preprocess_corda(model, lc, run_model=lambda: pytest.fail("calibrated although covariance_file exists"))
    assert rel(lora_delta(get_peft_model(model, lc), name), lora_delta(first, name)) < 1e-6
    # a file that is neither, or is made for other layers, is refused by name
    foreign = tmp_path / "other_cov.pt"
    torch.save({"x": torch.eye(2)}, foreign)
    lc.corda_config.covariance_file = str(foreign)
    with pytest.raises(corda_fast.CacheError, match="has no entry for layer 'model.layers.0.self_attn.q_proj'"):
        corda_fast.preprocess_corda(copy.deepcopy(base), lc, run_model=lambda: None)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a tensor file")
    lc.corda_config.covariance_file = str(junk)
    with pytest.raises(corda_fast.CacheError, match="neither PEFT's covariance file nor"):
        corda_fast.preprocess_corda(copy.deepcopy(base), lc, run_model=lambda: None)


def test_init_adapters_takes_the_mode_from_peft_corda_config():
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig

    batches = padded_batches(random_samples(6), 3)
    lc = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="corda",
                    corda_config=CordaConfig(corda_method="kpm"))
    _, report = corda_fast.init_adapters(tiny_llama(), batches, lora_config=lc, return_report=True,
                                         corda_config=corda_fast.CordaConfig(mode="kpm", show_progress=False))
    assert report.mode == "kpm"
    _, report = corda_fast.init_adapters(tiny_llama(), batches, lora_config=lc, return_report=True)
    assert report.mode == "kpm"
    _, report = corda_fast.init_adapters(tiny_llama(), batches, lora_config=lc, mode="ipm", return_report=True)
    assert report.mode == "ipm"  # mode= wins
    with pytest.raises(corda_fast.CordaConfigError, match="corda_method='kpm' and CordaConfig.mode='ipm' disagree"):
        corda_fast.init_adapters(tiny_llama(), batches, lora_config=lc, corda_config=corda_fast.CordaConfig())
    with pytest.raises(TypeError, match="PEFT's own CordaConfig belongs in LoraConfig.corda_config"):
        corda_fast.init_adapters(tiny_llama(), batches, lora_config=lc, corda_config=CordaConfig(corda_method="kpm"))
