"""Model level: identity at init, architectures, PEFT output, save / load, plain-LoRA conversion, training."""

import copy
import json
import os

import pytest
import torch

import corda_fast

from helpers import base_weight, init, lora_delta, padded_batches, random_samples, rel, tiny_bert, tiny_gpt2, tiny_llama


def logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
@pytest.mark.parametrize("make", ["llama", "gpt2", "bert"])
def test_identity_at_init_fp32(mode, make):
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}[make]()
    ids = torch.randint(0, 300, (3, 17))
    before = logits(model, ids)
    pm = init(model, padded_batches(random_samples(6), 3), mode=mode, rank=6)
    after = logits(pm, ids)
    assert float((after - before).abs().max()) <= 1e-5 * float(before.abs().max())
    # ...and the adapter is not a no-op: disabling it changes the output
    with pm.disable_adapter():
        assert float((logits(pm, ids) - before).abs().max()) > 1e-3 * float(before.abs().max())


def test_gpt2_conv1d_targets_are_transposed_right():
    model = tiny_gpt2()
    w = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # (in, out)
    pm = init(model, padded_batches(random_samples(5), 5), rank=4, lora_alpha=8)
    name = "transformer.h.0.attn.c_attn"
    assert pm.peft_config["default"].fan_in_fan_out
    recon = base_weight(pm, name, conv1d=True) + lora_delta(pm, name)  # (out, in)
    assert rel(recon, w.T.double()) < 1e-6


def test_bf16_identity_within_rounding_and_adapter_dtype():
    model = tiny_llama(dtype=torch.bfloat16)
    ids = torch.randint(0, 300, (2, 15))
    ref64 = logits(copy.deepcopy(model).double(), ids)
    before = logits(model, ids)
    pm = init(model, padded_batches(random_samples(6), 3), mode="kpm", rank=8)
    after = logits(pm, ids)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    scale = float(ref64.abs().max())
    # drift at init is of the order of the model's own bf16 error
    own = float((before - ref64).abs().max())
    assert float((after - before).abs().max()) <= max(2 * own, 2 ** -7 * scale)
    # residual computed from the factors as stored: W_res + s·B·A equals W up to one bf16 rounding of W_res
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w = copy.deepcopy(tiny_llama(dtype=torch.bfloat16)).get_submodule(name).weight.double()
        recon = base_weight(pm, name) + lora_delta(pm, name)
        assert float((recon - w).abs().max()) <= 2 ** -8 * float(w.abs().max())


def test_rank_pattern_alpha_pattern_rslora():
    model = tiny_llama()
    pm, report = init(
        model, padded_batches(random_samples(6), 3), rank=4, lora_alpha=8, use_rslora=True,
        rank_pattern={"model.layers.1.mlp.down_proj": 12}, alpha_pattern={"o_proj": 3}, return_report=True)
    down = pm.base_model.model.model.layers[1].mlp.down_proj
    assert down.lora_A["default"].weight.shape[0] == 12
    assert pm.base_model.model.model.layers[0].mlp.down_proj.lora_A["default"].weight.shape[0] == 4
    o = pm.base_model.model.model.layers[0].self_attn.o_proj
    assert o.scaling["default"] == pytest.approx(3 / 4 ** 0.5)
    by = {l["name"]: l for l in report.layers}
    assert by["model.layers.1.mlp.down_proj"]["rank"] == 12
    assert by["model.layers.0.self_attn.o_proj"]["scaling"] == pytest.approx(3 / 2)
    ids = torch.randint(0, 300, (2, 11))
    assert float((logits(pm, ids) - logits(tiny_llama(), ids)).abs().max()) < 1e-5 * float(logits(tiny_llama(), ids).abs().max())


def test_save_load_with_plain_peft_and_no_corda_in_config(tmp_path):
    from peft import PeftModel

    model = tiny_llama()
    pm = init(model, padded_batches(random_samples(6), 3), mode="kpm", rank=4)
    # train a little so the adapter differs from its init
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 300, (4, 12))
    for _ in range(3):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(tmp_path / "adapter")
    corda_fast.save_residual_base(pm, str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "corda" not in json.dumps(cfg["init_lora_weights"]).lower() and cfg.get("corda_config") is None
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    pm.eval()
    assert torch.equal(logits(loaded, ids), logits(pm, ids))


def test_conversion_to_plain_lora_on_original_weights(tmp_path, caplog):
    from peft import PeftModel

    model = tiny_llama()
    original = copy.deepcopy(model)
    pm = init(model, padded_batches(random_samples(6), 3), mode="ipm", rank=4,
                                  initial_adapter_dir=str(tmp_path / "init"))
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 300, (4, 12))
    for _ in range(3):
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    trained = logits(pm, ids)
    with caplog.at_level("WARNING", logger="corda_fast"):
        info = corda_fast.save_as_lora(pm, str(tmp_path / "lora"), str(tmp_path / "init"))
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 2 * pm.peft_config["default"].lora_alpha  # rank and alpha double
    assert info == {"path": str(tmp_path / "lora"), "r": 8, "lora_alpha": cfg["lora_alpha"], "trained_r": 4}
    assert "rank 8" in caplog.text and "twice the trained rank 4" in caplog.text
    assert pm.peft_config["default"].r == 4  # the live model's config is left as it was
    loaded = PeftModel.from_pretrained(original, tmp_path / "lora")
    got = logits(loaded, ids)
    assert float((got - trained).abs().max()) <= 1e-4 * float(trained.abs().max())
    base_w = loaded.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer().weight
    assert torch.equal(base_w, tiny_llama().model.layers[0].self_attn.q_proj.weight)


def test_trains_with_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    pm = init(model, padded_batches(random_samples(6), 3), mode="ipm", rank=4)
    data = [{"input_ids": s[:10], "labels": s[:10]} for s in random_samples(8, lo=10, hi=12)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, logging_steps=1, save_strategy="no", learning_rate=1e-3)
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    Trainer(model=pm, args=args, train_dataset=data).train()
    changed = [n for n, p in pm.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)
    frozen = [n for n, p in pm.named_parameters() if not p.requires_grad]
    assert any("base_layer" in n for n in frozen)


def test_cache_roundtrip_bit_identical_and_serves_other_rank(tmp_path):
    batches = padded_batches(random_samples(6), 3)
    path = str(tmp_path / "cov.safetensors")
    a = init(tiny_llama(), batches, rank=4, covariance_cache=path)
    assert os.path.isfile(path)
    b, rep = init(tiny_llama(), None, rank=4, covariance_cache=path, return_report=True)
    assert rep.cache_hit
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    c = init(tiny_llama(), None, rank=6, mode="kpm", covariance_cache=path)
    assert c.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == 6


def test_compiled_model_is_unwrapped():
    model = tiny_llama()
    compiled = torch.compile(model)  # not run: wrapping only
    ids = torch.randint(0, 300, (2, 9))
    before = logits(model, ids)
    pm = init(compiled, padded_batches(random_samples(4), 2), rank=4)
    assert pm.base_model.model is model
    assert float((logits(pm, ids) - before).abs().max()) <= 1e-5 * float(before.abs().max())
