"""Quantized base models: bitsandbytes 4-bit (NF4/FP4) and torchao layers are dequantized for W·C; the residual is
re-quantized (QLoRA + CorDA) or kept in float; the error is reported; unsupported formats fail clearly."""

import copy

import pytest
import torch
from torch import nn

import corda_fast
from corda_fast import quant
from corda_fast.targets import TargetError

from helpers import Setup, init, padded_batches, random_samples, rel_max, tiny_llama


def _bnb():
    try:
        import bitsandbytes as bnb

        lin = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", compute_dtype=torch.float32)
        lin.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
        lin = lin.to("cpu")
        lin(torch.randn(2, 64))
        return bnb
    except Exception as exc:  # not installed, or no CPU backend in this build
        pytest.skip(f"bitsandbytes 4-bit does not run on this machine's CPU: {type(exc).__name__}: {exc}")


def _torchao():
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        m = nn.Sequential(nn.Linear(16, 8))
        quantize_(m, Int8WeightOnlyConfig())
        m(torch.randn(2, 16))
        return Int8WeightOnlyConfig
    except Exception as exc:
        pytest.skip(f"torchao weight-only int8 does not run here: {type(exc).__name__}: {exc}")


TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def llama_32(seed=0):
    """A tiny Llama whose layer widths are multiples of 32 (bitsandbytes' CPU 4-bit kernel packs 32 rows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).float().eval()


def bnb4_llama(quant_type="nf4", double=False, seed=0):
    """A tiny Llama whose targeted linears are bitsandbytes Linear4bit (compute in float32)."""
    bnb = _bnb()
    model = llama_32(seed)
    for name, mod in list(model.named_modules()):
        if name.split(".")[-1] in TARGETS:
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=double)
            q.weight = bnb.nn.Params4bit(mod.weight.detach().clone(), requires_grad=False, quant_type=quant_type,
                                         compress_statistics=double)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to("cpu"))
    return model.eval()


def dequantized_copy(model):
    """The same model with every quantized linear replaced by a float nn.Linear holding deq(Q(W))."""
    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if name and name.split(".")[-1] in TARGETS and quant.kind(mod):
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, quant.float_linear(mod, quant.dequantize(mod).float()))
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits



@pytest.mark.parametrize("quant_type,double", [("nf4", False), ("fp4", True)])
def test_bnb4_factors_equal_those_of_the_dequantized_float_model(quant_type, double):
    """Same statistics, same factors: the 4-bit layers are dequantized exactly as they compute (bitsandbytes' CPU
    eval path repacks the weights in place on the first forward; the dequantization reads them either way)."""
    from corda_fast.stages import collect_covariance, decompose, resolve_targets

    model = bnb4_llama(quant_type, double)
    cfg = Setup(rank=4, mode="kpm", target_modules=TARGETS)
    stats = collect_covariance(model, padded_batches(random_samples(6, seed=3), 3), *cfg.stage)
    ref_model = dequantized_copy(model)  # after the calibration forward: what the 4-bit layers compute now
    got = decompose(stats, resolve_targets(model, cfg.lora), cfg.corda)
    ref = decompose(stats, resolve_targets(ref_model, cfg.lora), cfg.corda)
    assert got.keys() == ref.keys() and len(got) == 10
    for name, f in got.items():
        assert rel_max(f.B @ f.A, ref[name].B @ ref[name].A) < 1e-6, name


@pytest.mark.parametrize("quant_type,double", [("nf4", False), ("fp4", True)])
def test_bnb4_requantize_keeps_the_format_and_reports_its_error(quant_type, double):
    import bitsandbytes as bnb

    model = bnb4_llama(quant_type, double)
    ids = torch.randint(0, 300, (2, 10))
    before = logits(model, ids)
    pm, report = init(model, padded_batches(random_samples(6, seed=3), 3), rank=4, mode="kpm",
                                          target_modules=TARGETS, return_report=True, fused=True)
    assert report.fused == 0  # 4-bit LoRA layers keep PEFT's path (fuse() reports them as skipped)
    inner = pm.base_model.model
    layers = [l for l in report.layers if "quantized" in l]
    assert len(layers) == 10
    for l in layers:
        got = inner.get_submodule(l["name"])
        base = got.get_base_layer()
        assert isinstance(base, bnb.nn.Linear4bit)
        assert quant._bnb_settings(base.weight)["quant_type"] == quant_type
        assert quant._bnb_settings(base.weight)["nested"] == double
        assert l["quantized"]["quantization"].startswith(f"bitsandbytes {quant_type}")
        q = l["quantized"]  # (recomputed independently in the next test)
        assert 0 < q["model_vs_quantized"] < 0.2 and 0 < q["residual_quantization"] < 0.2
        assert q["residual"] == "requantized"
    assert "quantized base layers: 10" in report.summary()
    # the model changed by the residual's quantization noise only: the order of the 4-bit model's own error
    assert rel_max(logits(pm, ids), before) < 0.2
    pm.train()  # and it trains: gradients reach the adapters through the 4-bit base
    loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in pm.named_parameters() if "lora_" in n]
    assert len(grads) == 20 and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bnb4_reported_error_matches_an_independent_computation():
    from corda_fast import quant as q

    model = bnb4_llama()
    batches = padded_batches(random_samples(6, seed=3), 3)
    logits(model, torch.randint(0, 300, (1, 5)))  # the eval forward that repacks on CPU happens first
    w_q = {n: q.dequantize(m).double() for n, m in model.named_modules() if n and q.kind(m)}
    pm, report = init(model, batches, rank=4, mode="kpm", target_modules=TARGETS,
                                          return_report=True)
    for l in report.layers:
        layer = pm.base_model.model.get_submodule(l["name"])
        ba = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).double() * layer.scaling["default"]
        w_now = q.dequantize(layer.get_base_layer()).double()
        ref = w_q[l["name"]]
        expected = torch.linalg.norm(w_now + ba - ref) / torch.linalg.norm(ref)
        noise = torch.linalg.norm(w_now - (ref - ba)) / torch.linalg.norm(ref - ba)
        assert abs(l["quantized"]["model_vs_quantized"] - float(expected)) < 1e-6 * float(expected) + 1e-9
        assert abs(l["quantized"]["residual_quantization"] - float(noise)) < 1e-6 * float(noise) + 1e-9


def test_bnb4_keep_residual_is_exact_at_init():
    model = bnb4_llama()
    ids = torch.randint(0, 300, (2, 10))
    logits(model, ids)  # calibration-like eval forward first (bitsandbytes may repack on CPU)
    ref = logits(dequantized_copy(model), ids)  # the 4-bit weights exactly, in float32 arithmetic
    pm, report = init(model, padded_batches(random_samples(6, seed=3), 3), rank=4, mode="ipm",
                                          target_modules=TARGETS, quantized_residual="keep", return_report=True)
    base = pm.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer()
    assert type(base) is nn.Linear and base.weight.dtype == torch.float32
    assert rel_max(logits(pm, ids), ref) < 1e-5
    q = [l["quantized"] for l in report.layers]
    assert len(q) == 10 and max(x["model_vs_quantized"] for x in q) < 1e-6
    assert q[0]["residual"] == "kept in torch.float32"


def test_bnb4_error_mid_build_restores_the_quantized_model(monkeypatch):
    import bitsandbytes as bnb

    model = bnb4_llama()
    ids = torch.randint(0, 300, (2, 10))
    before = logits(model, ids)
    calls = []

    def failing(module, w_res, cfg=None):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return orig(module, w_res, cfg)

    orig = quant.store_residual
    monkeypatch.setattr(quant, "store_residual", failing)
    for residual in ("requantize", "keep"):
        calls.clear()
        with pytest.raises(RuntimeError, match="disk full" if residual == "requantize" else "."):
            if residual == "keep":
                monkeypatch.setattr(corda_fast.peft_bridge.quant, "float_linear",
                                    lambda *a: (_ for _ in ()).throw(RuntimeError("no memory")))
            init(model, padded_batches(random_samples(4, seed=3), 2), rank=4,
                                     target_modules=TARGETS, quantized_residual=residual)
        assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
        assert not any("lora" in n for n, _ in model.named_modules())
        assert torch.equal(logits(model, ids), before)


def test_torchao_int8_requantize_and_keep():
    cfg = _torchao()
    from torchao.quantization import quantize_

    def make():
        model = llama_32()
        quantize_(model, cfg(), filter_fn=lambda m, n: isinstance(m, nn.Linear) and n.split(".")[-1] in TARGETS)
        return model

    batches = padded_batches(random_samples(6, seed=3), 3)
    ids = torch.randint(0, 300, (2, 10))
    model = make()
    before = logits(model, ids)
    with pytest.raises(TargetError, match="requantize_config"):
        init(model, batches, rank=4, target_modules=TARGETS)
    after = logits(model, ids)
    assert torch.equal(after, before)  # refused → untouched
    pm, report = init(model, batches, rank=4, target_modules=TARGETS, requantize_config=cfg(),
                                          return_report=True)
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer().weight).__module__.startswith(
        "torchao")
    q = [l["quantized"] for l in report.layers]
    assert len(q) == 10 and 0 < max(x["model_vs_quantized"] for x in q) < 0.05
    assert rel_max(logits(pm, ids), before) < 0.05
    kept = init(make(), batches, rank=4, target_modules=TARGETS, quantized_residual="keep")
    assert rel_max(logits(kept, ids), before) < 1e-5


def test_unsupported_quantizer_is_a_clear_error_and_model_untouched():
    model = tiny_llama(hidden=64)
    lin = model.model.layers[1].mlp.down_proj

    class FakeQuantTensor(torch.Tensor):  # some other library's tensor subclass
        pass

    lin.weight = nn.Parameter(lin.weight.detach().as_subclass(FakeQuantTensor), requires_grad=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TargetError, match=r"'model\.layers\.1\.mlp\.down_proj' has quantized weights.*tensor "
                                          r"subclass FakeQuantTensor.*supported: bitsandbytes 4-bit"):
        init(model, padded_batches(random_samples(2), 2), rank=4)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_transformers_4bit_model_residual_base_saves_and_reloads(tmp_path):
    """The QLoRA flow: a model loaded with BitsAndBytesConfig, CorDA with a re-quantized residual, the residual base
    saved with transformers' own 4-bit serialisation, reloaded with plain from_pretrained + PeftModel."""
    _bnb()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    llama_32().save_pretrained(tmp_path / "fp")
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
    try:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=qcfg, device_map="cpu",
                                                     dtype=torch.float32)
    except Exception as exc:
        pytest.skip(f"transformers cannot load a 4-bit model on this CPU: {type(exc).__name__}: {exc}")
    pm = init(model, padded_batches(random_samples(6, seed=3), 3), rank=4, mode="kpm",
                                  target_modules=TARGETS)
    pm.save_pretrained(tmp_path / "adapter")
    corda_fast.save_residual_base(pm, tmp_path / "base")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu"),
                                       tmp_path / "adapter")
    import bitsandbytes as bnb

    n = 0
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            other = loaded.base_model.model.get_submodule(name)
            assert torch.equal(quant.dequantize(mod), quant.dequantize(other)), name  # the residual, exactly
            n += 1
    assert n == 14  # all 7 projections of both blocks are 4-bit, 5 of them adapted
    sd, sd2 = pm.state_dict(), loaded.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd if "lora_" in k)
    ids = torch.randint(0, 300, (2, 10))
    pm.eval(), loaded.eval()
    # same weights; bitsandbytes' CPU kernels (bf16 after their eval-mode repacking) set the output tolerance
    assert rel_max(logits(loaded, ids), logits(pm, ids)) < 2e-2
