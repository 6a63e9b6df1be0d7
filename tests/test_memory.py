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


# ---------------------------------------------------------------------------------------------------- block cache
def _deltas(pm) -> dict:
    out = {}
    for name, m in pm.base_model.model.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            out[name] = m.scaling["default"] * (m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double())
    return out


def _same_adapters(a, b, tol=1e-12):
    da, db = _deltas(a), _deltas(b)
    assert da.keys() == db.keys() and da
    for k in da:
        assert rel_max(db[k], da[k]) <= tol, k


def _stamps(folder):
    return {f: (os.stat(os.path.join(folder, f)).st_ino, os.stat(os.path.join(folder, f)).st_mtime_ns)
            for f in sorted(os.listdir(folder))}


BATCHES = padded_batches(random_samples(6, seed=2), 2)


def test_streaming_writes_one_file_per_block_and_resumes_after_an_interruption(tmp_path, monkeypatch):
    folder = str(tmp_path / "stats")
    kw = dict(rank=4, mode="kpm", precision="float64")
    reference = corda_fast.init_adapters(tiny_llama(layers=4), BATCHES, **Setup(streaming=True, **kw).kw)
    real = corda_fast.api._decompose
    seen = []

    def dies_at_block_2(stats, targets, config):
        seen.append(stats.meta.get("block"))
        if stats.meta.get("block") == "model.layers.2":
            raise KeyboardInterrupt("killed (test)")
        return real(stats, targets, config)

    monkeypatch.setattr(corda_fast.api, "_decompose", dies_at_block_2)
    model = tiny_llama(layers=4)
    before = model_state(model)
    with pytest.raises(KeyboardInterrupt):
        corda_fast.init_adapters(model, BATCHES, **Setup(streaming=True, covariance_cache=folder, **kw).kw)
    assert_model_unchanged(model, before)
    done = _stamps(folder)
    assert sorted(done) == ["block-00000.safetensors", "block-00001.safetensors", "block-00002.safetensors"]
    monkeypatch.setattr(corda_fast.api, "_decompose", real)
    computed = []
    finish = corda_fast.streaming.finish_statistics
    monkeypatch.setattr(corda_fast.streaming, "finish_statistics",
                        lambda c, ts, *a, **k: computed.append(ts[0].name.split(".")[2]) or finish(c, ts, *a, **k))
    pm, report = corda_fast.init_adapters(tiny_llama(layers=4), BATCHES, return_report=True,
                                          **Setup(streaming=True, covariance_cache=folder, **kw).kw)
    assert computed == ["3"], "only the block without a file is calibrated"
    after = _stamps(folder)
    assert {f: after[f] for f in done} == done, "files of completed blocks were rewritten"
    assert len(after) == 4
    _same_adapters(reference, pm)
    assert report.n_samples == 6


def test_a_folder_cache_serves_one_pass_and_a_one_pass_folder_serves_streaming(tmp_path, monkeypatch):
    kw = dict(rank=4, mode="ipm", precision="float64")
    streamed = str(tmp_path / "streamed")
    a = corda_fast.init_adapters(tiny_llama(layers=3), BATCHES, **Setup(streaming=True, covariance_cache=streamed,
                                                                         **kw).kw)
    b, rep = corda_fast.init_adapters(tiny_llama(layers=3), BATCHES, return_report=True,
                                      **Setup(covariance_cache=streamed, **kw).kw)
    assert rep.source == "cache"
    _same_adapters(a, b)
    one_pass = str(tmp_path / "one_pass")
    c = corda_fast.init_adapters(tiny_llama(layers=3), BATCHES, **Setup(covariance_cache=one_pass, **kw).kw)
    assert sorted(os.listdir(one_pass)) == [f"block-0000{i}.safetensors" for i in range(3)]
    monkeypatch.setattr(corda_fast.streaming, "finish_statistics", None)  # nothing may be calibrated
    d = corda_fast.init_adapters(tiny_llama(layers=3), BATCHES, **Setup(streaming=True, covariance_cache=one_pass,
                                                                         **kw).kw)
    _same_adapters(c, d)
    _same_adapters(a, d, 1e-10)
    file = str(tmp_path / "cov.safetensors")  # a one-pass file serves a streaming run as it is
    corda_fast.init_adapters(tiny_llama(layers=3), BATCHES, **Setup(covariance_cache=file, **kw).kw)
    e, rep = corda_fast.init_adapters(tiny_llama(layers=3), BATCHES, return_report=True,
                                      **Setup(streaming=True, covariance_cache=file, **kw).kw)
    assert rep.source == "cache"
    _same_adapters(c, e)


def _run(folder, model=None, batches=BATCHES, **extra):
    return corda_fast.init_adapters(model or tiny_llama(layers=3), batches,
                                    **Setup(rank=4, streaming=True, covariance_cache=folder, **extra).kw)


@pytest.mark.parametrize("damage", ["truncated", "foreign_block", "other_data", "not_safetensors", "other_model",
                                    "other_targets"])
def test_a_bad_block_file_is_refused_by_name(damage, tmp_path):
    folder = tmp_path / "stats"
    _run(str(folder))
    target = folder / "block-00001.safetensors"
    if damage == "truncated":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) - 100])
    elif damage == "foreign_block":
        target.write_bytes((folder / "block-00000.safetensors").read_bytes())
    elif damage == "other_data":
        _run(str(tmp_path / "other"), batches=padded_batches(random_samples(6, seed=9), 2))
        target.write_bytes((tmp_path / "other" / "block-00001.safetensors").read_bytes())
    elif damage == "not_safetensors":
        target.write_text("hello")
    elif damage == "other_targets":
        _run(str(tmp_path / "other"), target_modules=["q_proj", "v_proj"])
        target.write_bytes((tmp_path / "other" / "block-00001.safetensors").read_bytes())
    else:
        _run(str(tmp_path / "other"), model=tiny_llama(layers=3, seed=5))
        target.write_bytes((tmp_path / "other" / "block-00001.safetensors").read_bytes())
    model = tiny_llama(layers=3)
    before = model_state(model)
    with pytest.raises(corda_fast.CacheError, match=str(target).replace(".", r"\.")):
        _run(str(folder), model=model)
    assert_model_unchanged(model, before)
    _run(str(folder), overwrite_cache=True)  # recalibrating over it works


def test_a_partial_write_is_never_read_and_folder_misuse_is_explained(tmp_path):
    folder = tmp_path / "stats"
    _run(str(folder))
    os.remove(folder / "block-00002.safetensors")
    (folder / "block-00002.safetensors.partial").write_bytes(b"half a file")  # a run killed while writing
    _run(str(folder))  # block 2 recomputed, the partial file ignored
    assert (folder / "block-00002.safetensors").exists()
    os.remove(folder / "block-00002.safetensors")
    with pytest.raises(corda_fast.CacheError, match="holds 2 of 3 blocks.*streaming=True"):
        corda_fast.init_adapters(tiny_llama(layers=3), BATCHES, **Setup(rank=4, covariance_cache=str(folder)).kw)
    with pytest.raises(ValueError, match="writes its covariance_cache as a folder"):
        _run(str(tmp_path / "new.safetensors"))


def test_a_spill_that_will_not_fit_is_refused_before_anything_runs(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    model = tiny_llama(layers=2)
    before = model_state(model)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    ran = []
    with pytest.raises(OSError, match=r"spills the originals .* to '.*spill'.*spill_folder"):
        corda_fast.init_adapters(model, lambda: ran.append(1), **Setup(rank=4, spill_folder=str(tmp_path / "spill")).kw)
    assert not ran
    assert_model_unchanged(model, before)
    # in host memory instead: no disk needed
    corda_fast.init_adapters(model, padded_batches(random_samples(4), 2), **Setup(rank=4, spill="host").kw)


def test_the_spill_check_counts_every_expert_parameter(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from corda_fast.preflight import check_spill

    from helpers import tiny_moe

    model = tiny_moe("qwen3_moe")
    cfg = Setup(target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                spill_folder=str(tmp_path))
    targets = corda_fast.stages.resolve_targets(model, cfg.lora)
    params = {t.param_key: getattr(t.module, t.param_name) for t in targets}
    assert len(params) == 2 * len(model.model.layers)
    need = sum(p.numel() * p.element_size() for p in params.values())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, int(need * 1.06)))
    check_spill(targets, cfg.corda)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, int(need * 0.9)))
    with pytest.raises(OSError, match="spills the originals"):
        check_spill(targets, cfg.corda)
