"""Models bigger than memory: a model accelerate dispatched (device_map, max_memory, offload_folder: most blocks on
disk), host-offloaded modules, sequential onloading, and the residual base written block by block."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import corda_fast
from corda_fast import offload

from helpers import rel, rel_max, tiny_llama

pytest.importorskip("accelerate")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "offload_worker.py")


def _llama_dir(d, layers=24):
    """benchmarks/offload_worker.py's random Llama (24 narrow blocks ≈ 229 MB, so one block is a small share),
    saved to ``d``; returns its size in bytes."""
    spec = importlib.util.spec_from_file_location("offload_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    return worker.make_model(str(d), layers)


def _digests(d) -> dict:
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in sorted(os.listdir(d))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    return str(d), _llama_dir(d)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A tiny random Llama (6 blocks) saved with save_pretrained, and its size in bytes."""
    d = tmp_path_factory.mktemp("tiny")
    model = tiny_llama(layers=6)
    model.save_pretrained(d)
    return str(d), sum(p.numel() * p.element_size() for p in model.parameters())


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 4096, (2, 48), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :9] = 0  # left padding in one row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _deltas(pm) -> dict:
    """``{layer: s·B·A}`` of a PEFT model's default adapter."""
    from peft.tuners.lora.layer import LoraLayer

    out = {}
    for name, m in pm.base_model.model.named_modules():
        if isinstance(m, LoraLayer):
            out[name] = m.scaling["default"] * (m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double())
    return out


@pytest.mark.slow
def test_disk_offloaded_model_matches_the_in_memory_call(checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d, size = checkpoint
    before = _digests(d)
    ids = torch.randint(0, 4096, (1, 20))
    config = corda_fast.CordaConfig(mode="kpm", precision="float64", show_progress=False)
    ref_model = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        original = ref_model(ids).logits
    ref = corda_fast.init_adapters(ref_model, _batches(), rank=4, target_modules=TARGETS, corda_config=config,
                                   streaming=True)

    model = AutoModelForCausalLM.from_pretrained(d, device_map="auto", max_memory={"cpu": size // 4},
                                                 offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(model.hf_device_map.values())  # most blocks on disk
    pm, report = corda_fast.init_adapters(model, _batches(), rank=4, target_modules=TARGETS, corda_config=config,
                                          streaming=True, return_report=True)
    assert report.weights["disk"] > report.weights["module"] > 0
    want, got = _deltas(ref), _deltas(pm)
    assert want.keys() == got.keys() and len(got) == 24 * 7
    assert max(rel(got[k], want[k]) for k in want) <= 1e-6  # same adapters, layer by layer
    with torch.no_grad():
        at_init = pm(ids).logits
    assert rel_max(at_init, original) <= 1e-5  # the PEFT model's output at init is the original's
    assert _digests(d) == before  # the checkpoint is byte-identical
    store = [f for f in os.listdir(tmp_path / "offload") if f.startswith("corda_residuals_")]
    assert len(store) == 1  # residuals of disk-offloaded layers went to a store of their own

    corda_fast.save_residual_base(pm, str(tmp_path / "base"))
    pm.save_pretrained(str(tmp_path / "adapter"))
    index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 24  # block by block
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter",
                                         is_trainable=True)
    with torch.no_grad():
        assert rel_max(reloaded(ids).logits, at_init) <= 1e-6
    lora = {n: p.detach().clone() for n, p in reloaded.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in reloaded.parameters() if p.requires_grad], lr=1e-2)
    loss = reloaded(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(p.detach(), lora[n]) for n, p in reloaded.named_parameters()
                                        if n in lora)


def _rss(what: str, d: str, tmp_path, cpu_bytes: int) -> dict:
    out = subprocess.run([sys.executable, WORKER, what, d, str(tmp_path / what),
                          str(cpu_bytes)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_host_memory_stays_below_the_model(tmp_path):
    """Peak resident memory from load through init_adapters(streaming=True) and save_residual_base, above the
    interpreter's baseline (after imports and a warm-up of torch's linear algebra; the high-water mark is reset
    there), in a subprocess, for a 48-block model of ~445 MB loaded with a host budget of a quarter of it. Measured
    (benchmarks/bench_offload.py): 273-302 MiB for the 424 MiB model, 0.64-0.71 of it; plain offloaded inference
    of the same batches (the floor, recorded in the message) 206 MiB. The issue's "half the model" bound does not
    hold at this scale: the floor alone is about half (docs/offload.md)."""
    d = tmp_path / "llama48"
    size = _llama_dir(d, layers=48)
    floor = _rss("floor", str(d), tmp_path, size // 4)
    ours = _rss("corda", str(d), tmp_path, size // 4)
    assert ours["peak"] * 2**20 < 0.9 * size, (ours, floor, size / 2**20)  # the model is never materialised


def test_host_offloaded_modules_get_their_residual_in_the_host_map(tmp_path):
    from accelerate import cpu_offload

    model = tiny_llama()
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        original = model(ids).logits
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    cpu_offload(model, execution_device="cpu")  # every weight in a host map, modules on meta
    q = model.model.layers[0].self_attn.q_proj
    assert offload.location(q) == "host"
    batches = [{"input_ids": torch.randint(0, 300, (2, 16))} for _ in range(3)]
    pm = corda_fast.init_adapters(model, batches, rank=4, target_modules=TARGETS, mode="ipm",
                                  corda_config=corda_fast.CordaConfig(show_progress=False))
    with torch.no_grad():
        assert rel_max(pm(ids).logits, original) <= 1e-5
    stored = offload.read_tensor(q.base_layer if hasattr(q, "base_layer") else q)
    assert not torch.equal(stored, weights["model.layers.0.self_attn.q_proj.weight"])  # W_res, where W lived
    assert not os.listdir(tmp_path)  # nothing written to disk


def test_failure_after_offloaded_residuals_were_stored_undoes_them(small_checkpoint, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from corda_fast import peft_bridge

    d, size = small_checkpoint
    model = AutoModelForCausalLM.from_pretrained(d, device_map="auto", max_memory={"cpu": size // 4},
                                                 offload_folder=str(tmp_path / "offload"))
    ids = torch.randint(0, 300, (1, 10))
    assert offload.location(model.model.layers[5].mlp.down_proj) == "disk"
    with torch.no_grad():
        original = model(ids).logits
    maps = {n: offload.offload_hook(m).weights_map for n, m in model.named_modules() if offload.is_offloaded(m)}
    real, calls = peft_bridge._write_layer, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 40:  # well into the disk-offloaded blocks
            raise RuntimeError("simulated failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(peft_bridge, "_write_layer", failing)
    batches = [{"input_ids": torch.randint(0, 300, (2, 16))} for _ in range(2)]
    with pytest.raises(RuntimeError, match="simulated"):
        corda_fast.init_adapters(model, batches, rank=4, target_modules=TARGETS, streaming=True,
                                 corda_config=corda_fast.CordaConfig(show_progress=False))
    now = {n: offload.offload_hook(m).weights_map for n, m in model.named_modules() if offload.is_offloaded(m)}
    assert now.keys() == maps.keys() and all(now[n] is maps[n] for n in maps)  # hooks read the original weights
    assert not [f for f in os.listdir(tmp_path / "offload") if f.startswith("corda_residuals_")]  # store removed
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original)


def test_disk_offload_without_a_folder_is_refused_before_anything_runs(small_checkpoint, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    d, size = small_checkpoint
    model = AutoModelForCausalLM.from_pretrained(d, device_map="auto", max_memory={"cpu": size // 4},
                                                 offload_folder=str(tmp_path / "offload"))
    monkeypatch.setattr(offload, "disk_folders", lambda model: [])
    ran = []
    with pytest.raises(offload.OffloadError, match="residual_folder"):
        corda_fast.init_adapters(model, lambda: ran.append(1), rank=4, target_modules=TARGETS)
    assert not ran
    with pytest.raises(offload.OffloadError, match="onload_device"):
        corda_fast.init_adapters(model, _batches(1), rank=4, target_modules=TARGETS, streaming=True,
                                 onload_device="cpu")


@pytest.mark.parametrize("streaming", [False, True])
def test_corda_plus_on_a_disk_offloaded_model(small_checkpoint, tmp_path, streaming):
    from transformers import AutoModelForCausalLM

    d, size = small_checkpoint
    model = AutoModelForCausalLM.from_pretrained(d, device_map="auto", max_memory={"cpu": size // 4},
                                                 offload_folder=str(tmp_path / "offload"))
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        original = model(ids).logits
    batches = [{"input_ids": torch.randint(0, 300, (2, 16))} for _ in range(4)]
    cfg = corda_fast.CordaConfig(plus=corda_fast.PlusConfig(candidates=2), precision="float64", show_progress=False)
    pm, rep = corda_fast.init_adapters(model, batches, rank=4, target_modules=TARGETS, return_report=True,
                                       corda_config=cfg, streaming=streaming)
    assert rep.plus is not None and rep.weights["disk"] > 0
    assert rep.source == ("plus_streaming" if streaming else "plus")
    with torch.no_grad():
        assert rel_max(pm(ids).logits, original) <= 1e-5
    # the same plan and adapters as the model held in memory, calibrated in one pass
    ref, ref_rep = corda_fast.init_adapters(AutoModelForCausalLM.from_pretrained(d), batches, rank=4,
                                            target_modules=TARGETS, corda_config=cfg, return_report=True)
    assert [(l.candidate, l.rank) for l in rep.plus.layers] == [(l.candidate, l.rank) for l in ref_rep.plus.layers]
    da, db = _deltas(ref), _deltas(pm)
    assert max(rel(db[k], da[k]) for k in da) <= 1e-6


def test_corda_plus_onloading_on_cpu_equals_one_pass():
    batches = [{"input_ids": torch.randint(0, 300, (2, 16))} for _ in range(4)]
    cfg = corda_fast.CordaConfig(mode="kpm", precision="float64", plus=corda_fast.PlusConfig(candidates=2),
                                 show_progress=False)
    a = corda_fast.init_adapters(tiny_llama(), batches, rank=4, target_modules=TARGETS, corda_config=cfg)
    b, rep = corda_fast.init_adapters(tiny_llama(), batches, rank=4, target_modules=TARGETS, corda_config=cfg,
                                      streaming=True, onload_device="cpu", return_report=True)
    assert rep.onload_device == "cpu" and rep.source == "plus_streaming"
    da, db = _deltas(a), _deltas(b)
    assert max(rel(db[k], da[k]) for k in da) <= 1e-6


def test_onloading_options_are_checked_and_blocks_come_back():
    model = tiny_llama()
    with pytest.raises(offload.OffloadError, match="streaming=True"):
        corda_fast.init_adapters(model, _batches(1), rank=4, onload_device="cpu")
    from corda_fast.streaming import onloaded

    block = model.model.layers[0]
    params = {n: (p, p.data_ptr()) for n, p in block.named_parameters()}
    with pytest.raises(ValueError, match="inside"):
        with onloaded(block, torch.device("cpu")):
            raise ValueError("inside")
    assert all(p is params[n][0] and p.data_ptr() == params[n][1] for n, p in block.named_parameters())


def test_onloading_on_cpu_equals_plain_streaming():
    batches = [{"input_ids": torch.randint(0, 300, (2, 16))} for _ in range(3)]
    cfg = corda_fast.CordaConfig(mode="kpm", precision="float64", show_progress=False)
    a = corda_fast.init_adapters(tiny_llama(), batches, rank=4, target_modules=TARGETS, corda_config=cfg,
                                 streaming=True)
    b, rep = corda_fast.init_adapters(tiny_llama(), batches, rank=4, target_modules=TARGETS, corda_config=cfg,
                                      streaming=True, onload_device="cpu", return_report=True)
    assert rep.onload_device == "cpu"
    da, db = _deltas(a), _deltas(b)
    assert max(rel(db[k], da[k]) for k in da) <= 1e-12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_onloading_peak_device_memory_is_one_block():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=8192)
    model = LlamaForCausalLM(cfg).eval()  # on the host
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    h, i = cfg.hidden_size, cfg.intermediate_size
    stats = 4 * (3 * h * h + i * i)  # float32 statistics of one block (q/k/v and gate/up share their input)
    work = 4 * 8 * i * i  # the decomposition of the widest layer: a few i x i float64 matrices
    slack = 64 * 2**20  # CUDA context allocations, the cuBLAS/cuSOLVER workspaces
    batches = [{"input_ids": torch.randint(0, 8192, (4, 128))} for _ in range(4)]
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    corda_fast.init_adapters(model, batches, rank=8, target_modules=TARGETS, streaming=True, onload_device="cuda:0",
                             corda_config=corda_fast.CordaConfig(show_progress=False))
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= block + stats + work + slack, (peak, block, stats, work)
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model stayed on the host
