"""Memory: the build writes residuals in place with each original spilled (never two copies of the targeted
weights), and a failure anywhere still puts the model back bit for bit."""

import os

import pytest
import torch

import corda_fast
from corda_fast.spill import Spill

from helpers import Setup, assert_model_unchanged, model_state, padded_batches, random_samples, rel_max, tiny_llama


def _factors(model, cfg):
    targets = corda_fast.stages.resolve_targets(model, cfg.lora)
    stats = corda_fast.stages.collect_covariance(model, padded_batches(random_samples(4), 2), cfg.corda, targets)
    return targets, corda_fast.stages.decompose(stats, targets, cfg.corda)


@pytest.mark.parametrize("spill", ["auto", "disk", "host", "memory"])
def test_failure_in_the_last_layer_restores_every_spilled_weight(spill, tmp_path):
    model = tiny_llama(layers=3)
    model.model.layers[1].train()  # a mixed mode, and a frozen weight, must come back as they were
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    cfg = Setup(rank=4, spill=spill, spill_folder=str(tmp_path / "spill"))
    targets, factors = _factors(model, cfg)
    last = targets[-1].name
    factors[last].A = factors[last].A[:2]  # every other layer is written (in place) before this one fails
    before = model_state(model)
    with pytest.raises(RuntimeError, match=last.replace(".", r"\.")):
        corda_fast.stages.build_peft_model(model, factors, targets, cfg.corda, cfg.lora)
    assert_model_unchanged(model, before)
    if spill in ("auto", "disk"):
        assert (tmp_path / "spill").exists(), "weights on the host spill to the folder"
        assert os.listdir(tmp_path / "spill") == [], "the spill file outlived the build"
    else:
        assert not (tmp_path / "spill").exists(), f"spill={spill!r} wrote to disk"


def test_the_build_overwrites_weights_in_place_and_removes_the_spill(tmp_path):
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    cfg = Setup(rank=4, spill_folder=str(tmp_path / "spill"))
    targets, factors = _factors(model, cfg)
    storage = {t.name: t.module.weight.untyped_storage().data_ptr() for t in targets}
    originals = {t.name: t.module.weight.detach().clone() for t in targets}
    pm = corda_fast.stages.build_peft_model(model, factors, targets, cfg.corda, cfg.lora)
    inner = pm.base_model.model
    for t in targets:
        base = inner.get_submodule(t.name).get_base_layer()
        assert base.weight.untyped_storage().data_ptr() == storage[t.name], f"{t.name}: a new tensor, not in place"
        assert not torch.equal(base.weight, originals[t.name])  # the residual is there
    assert os.listdir(tmp_path / "spill") == []
    with torch.no_grad():
        assert rel_max(pm(ids).logits, ref) < 1e-4


def test_failure_after_the_build_restores_from_the_spill(tmp_path, monkeypatch):
    model = tiny_llama(layers=2)
    before = model_state(model)

    def broken(*a, **k):
        raise OSError("disk full (test)")

    monkeypatch.setattr(corda_fast.api, "save_initial_adapter", broken)
    with pytest.raises(OSError, match="disk full"):
        corda_fast.init_adapters(model, padded_batches(random_samples(4), 2), initial_adapter_dir=str(tmp_path / "a"),
                                 **Setup(rank=4, spill_folder=str(tmp_path / "spill")).kw)
    assert_model_unchanged(model, before)
    assert os.listdir(tmp_path / "spill") == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_spill_round_trips_bits(dtype, tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(shape, generator=g).to(dtype) for i, shape in enumerate([(7, 13), (1,), (0, 3),
                                                                                              (5, 3, 2)])}
    tensors["strided"] = torch.randn(6, 4, generator=g).to(dtype).t()  # not contiguous
    kept = {k: v.clone() for k, v in tensors.items()}
    spill = Spill("disk", str(tmp_path))
    for k, v in tensors.items():
        spill.keep(k, v)
        v.fill_(3.0)
    spill.keep("t0", tensors["t0"])  # a second keep of a key keeps the first copy
    assert spill.bytes_on_disk == sum(v.numel() * v.element_size() for v in kept.values())
    spill.restore()
    for k, v in tensors.items():
        assert torch.equal(v.contiguous().view(torch.uint8), kept[k].contiguous().view(torch.uint8)), k
    path = spill.path
    spill.close()
    assert not os.path.exists(path)


def test_bad_spill_settings_are_refused_by_name():
    with pytest.raises(corda_fast.CordaConfigError, match=r"CordaConfig.spill='ssd'"):
        corda_fast.CordaConfig(spill="ssd")
    with pytest.raises(corda_fast.CordaConfigError, match=r"CordaConfig.spill_folder=3"):
        corda_fast.CordaConfig(spill_folder=3)
