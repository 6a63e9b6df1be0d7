"""The fused low-rank training layer: the GEMM kernel, forward and every gradient vs float64 and PEFT's lora.Linear,
fuse/unfuse on PEFT models, and a short training run fused vs unfused.

The Triton kernel runs on CPU through the interpreter (TRITON_INTERPRET=1, set in conftest.py) at small shapes.
"""

import copy

import pytest
import torch
from torch import nn

import corda_fast
from corda_fast import ops
from corda_fast.fused import FusedLoraLinear, fused_lora_linear

from helpers import init, padded_batches, random_samples, rel_max, tiny_gpt2, tiny_llama

NO_TRITON = ops.why_not("lowrank_gemm", "triton") is not None
BACKENDS = ["torch", pytest.param("triton", marks=[pytest.mark.interpreter, pytest.mark.skipif(
    NO_TRITON, reason="triton cannot run here (no CUDA, no interpreter)")])]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.float64: 1e-12, torch.bfloat16: 3e-2}



def _operands(m, k, n, r, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, w, a, b = mk(m, k), mk(n, k) / k ** 0.5, mk(r, k) / k ** 0.5, mk(n, r) / r ** 0.5
    bb = mk(n) if bias else None
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return (x, w, bb, a, b), tuple(cast(t) for t in (x, w, bb, a, b))


# ---------------------------------------------------------------- the GEMM: p·q + s·r (+ bias)

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [1, 8, 64])
def test_lowrank_gemm_matches_float64(backend, dtype, r):
    (x, w, bb, a, b), (xc, wc, bc, ac, bcc) = _operands(37, 45, 29, r, dtype, seed=r)
    s64 = x @ a.t()
    ref = x @ w.t() + s64 @ b.t() + bb
    # q as the transposed view of W (the forward's layout): strides, no copy
    got = ops.lowrank_gemm(xc, wc.t(), s64.to(DEVICE, dtype), bcc.t(), bc, kernel=backend)
    assert got.dtype == dtype and got.shape == (37, 29)
    assert rel_max(got, ref) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_lowrank_gemm_strided_and_no_bias(backend):
    g = torch.Generator().manual_seed(3)
    p = torch.randn(70, 90, generator=g)[::2, 1::2]  # (35, 45), non-unit strides in both dims
    q = torch.randn(45, 130, generator=g)[:, ::5]  # (45, 26)
    s = torch.randn(16, 35, generator=g).t()  # column-major
    rr = torch.randn(16, 26, generator=g)
    ref = p.double() @ q.double() + s.double() @ rr.double()
    got = ops.lowrank_gemm(p.to(DEVICE), q.to(DEVICE), s.to(DEVICE), rr.to(DEVICE), None, kernel=backend)
    assert rel_max(got, ref) < TOL[torch.float32]


@pytest.mark.interpreter
@pytest.mark.skipif(NO_TRITON, reason="triton cannot run here")
def test_lowrank_gemm_triton_tiles():
    # more than one tile in each output dim (interpreter tiles are 64) and a rank spanning two r-steps (64 + 6)
    (x, w, bb, a, b), (xc, wc, bc, ac, bcc) = _operands(130, 70, 140, 70, torch.float32, seed=5)
    s = (x @ a.t())
    got = ops.lowrank_gemm(xc, wc.t(), s.to(DEVICE, torch.float32), bcc.t(), bc, kernel="triton")
    assert rel_max(got, x @ w.t() + s @ b.t() + bb) < TOL[torch.float32]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the op's Triton kernel is registered for CUDA")
def test_lowrank_gemm_cuda_kernel_opcheck():
    small = _operands(9, 11, 7, 3, torch.float32, seed=6)[1]
    p, q, bias = small[0], small[1].t(), small[2]
    torch.library.opcheck(torch.ops.corda_fast.lowrank_gemm.default,
                          (p, q, torch.randn(9, 3, device="cuda"), torch.randn(3, 7, device="cuda"), bias),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------- the layer: forward and gradients

def _reference_grads(x, w, bb, a, b, s, dy):
    """float64 autograd of y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ."""
    x, a, b = (t.clone().requires_grad_() for t in (x, a, b))
    bb = bb.clone().requires_grad_() if bb is not None else None
    y = x @ w.t() + s * (x @ a.t()) @ b.t() + (bb if bb is not None else 0)
    y.backward(dy)
    return y.detach(), x.grad, a.grad, b.grad, (bb.grad if bb is not None else None)


def _peft_layer(w, bb, a, b, s_alpha, r, dtype, adapter_dtype=None):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    base = nn.Linear(w.shape[1], w.shape[0], bias=bb is not None)
    with torch.no_grad():
        base.weight.copy_(w)
        if bb is not None:
            base.bias.copy_(bb)
    base = base.to(DEVICE, dtype).requires_grad_(False)
    layer = LoraLinear(base, "default", LoraConfig(r=r, lora_alpha=s_alpha), r=r, lora_alpha=s_alpha)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    layer.lora_A.to(DEVICE, adapter_dtype or dtype)
    layer.lora_B.to(DEVICE, adapter_dtype or dtype)
    if bb is not None:
        base.bias.requires_grad_(True)
    return layer


def _run(layer, x, dy):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    grads = (x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad,
             layer.get_base_layer().bias.grad if layer.get_base_layer().bias is not None else None)
    return (y.detach(),) + grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [1, 8, 64])
def test_layer_forward_and_grads_vs_float64_and_peft(backend, dtype, r):
    lead, k, n = (3, 13), 45, 29  # leading dims (batch, seq), odd sizes
    (x, w, bb, a, b), _ = _operands(39, k, n, r, torch.float64, seed=10 + r)
    x = x.view(*lead, k)
    dy = torch.randn(*lead, n, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
    alpha = 2 * r
    ref = _reference_grads(x, w, bb, a, b, alpha / r, dy)

    peft_layer = _peft_layer(w, bb, a, b, alpha, r, dtype)
    fused_layer = copy.deepcopy(peft_layer)
    report = corda_fast.fuse(nn.Sequential(fused_layer), backend=backend)
    assert report.fused == ["0"] and type(fused_layer) is FusedLoraLinear
    xd, dyd = x.to(DEVICE, dtype), dy.to(DEVICE, dtype)
    got_peft = _run(peft_layer, xd, dyd)
    got = _run(fused_layer, xd, dyd)
    names = ("y", "dx", "dA", "dB", "dbias")
    for name, g, p, rf in zip(names, got, got_peft, ref):
        assert g.dtype == dtype and g.shape == rf.shape, name
        err, peft_err = rel_max(g, rf), rel_max(p, rf)
        assert err < TOL[dtype], (name, err, peft_err)
        assert rel_max(g, p) < 2 * TOL[dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_adapters_on_bfloat16_base(backend):
    """PEFT's default for 16-bit models keeps the adapters in float32: gradients come back in float32."""
    r = 8
    (x, w, bb, a, b), _ = _operands(21, 40, 24, r, torch.float64, seed=2)
    dy = torch.randn(21, 24, dtype=torch.float64)
    ref = _reference_grads(x, w, bb, a, b, 2.0, dy)
    peft_layer = _peft_layer(w, bb, a, b, 2 * r, r, torch.bfloat16, adapter_dtype=torch.float32)
    fused_layer = copy.deepcopy(peft_layer)
    corda_fast.fuse(nn.Sequential(fused_layer), backend=backend)
    got = _run(fused_layer, x.to(DEVICE, torch.bfloat16), dy.to(DEVICE, torch.bfloat16))
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    for g, rf in zip(got, ref):
        assert rel_max(g, rf) < TOL[torch.bfloat16]


def test_functional_rejects_trainable_weight_and_mismatched_dtypes():
    x, w, a, b = torch.randn(4, 6), torch.randn(5, 6), torch.randn(2, 6), torch.randn(5, 2)
    with pytest.raises(ValueError, match="frozen"):
        fused_lora_linear(x, w.requires_grad_(), None, a, b, 1.0)
    with pytest.raises(ValueError, match="bfloat16"):
        fused_lora_linear(x, w.detach().bfloat16(), None, a, b, 1.0)


# ---------------------------------------------------------------- fuse / unfuse on PEFT models

def _peft_llama(seed=0, dropout=0.0, **kw):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(hidden=64, seed=seed)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, lora_dropout=dropout,
                     **kw)
    return get_peft_model(model, cfg)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fuse_keeps_state_dict_outputs_merge_and_disable():
    pm = _peft_llama()
    ids = torch.randint(0, 300, (2, 11))
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    ref = _logits(pm, ids)
    report = corda_fast.fuse(pm)
    assert len(report.fused) == 14 and not report.skipped
    assert all(isinstance(m, FusedLoraLinear) for n, m in pm.named_modules() if n.endswith("q_proj"))
    after = pm.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert rel_max(_logits(pm, ids), ref) < 1e-5
    with pm.disable_adapter():
        base = _logits(pm, ids)
    corda_fast.unfuse(pm)
    with pm.disable_adapter():
        assert rel_max(base, _logits(pm, ids)) < 1e-6
    corda_fast.fuse(pm)
    pm.merge_adapter()
    assert rel_max(_logits(pm, ids), ref) < 1e-5
    pm.unmerge_adapter()
    assert rel_max(_logits(pm, ids), ref) < 1e-5
    assert corda_fast.unfuse(pm) == 14
    assert not any(isinstance(m, FusedLoraLinear) for m in pm.modules())


def test_fused_model_saves_and_loads_with_plain_peft(tmp_path):
    from peft import PeftModel

    pm = _peft_llama()
    corda_fast.fuse(pm)
    ids = torch.randint(0, 300, (2, 9))
    ref = _logits(pm, ids)
    pm.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_llama(hidden=64, seed=0), tmp_path / "adapter")
    assert not any(isinstance(m, FusedLoraLinear) for m in loaded.modules())
    assert rel_max(_logits(loaded, ids), ref) < 1e-5


def test_dropout_during_training_takes_peft_path_and_eval_is_fused(monkeypatch):
    pm = _peft_llama(dropout=0.1)
    fused = copy.deepcopy(pm)
    corda_fast.fuse(fused)
    calls = []
    orig = corda_fast.ops.lowrank.FusedLoRALinearFunction.apply
    monkeypatch.setattr(corda_fast.ops.lowrank.FusedLoRALinearFunction, "apply",
                        lambda *a: calls.append(1) or orig(*a))
    ids = torch.randint(0, 300, (2, 9))
    pm.train(), fused.train()
    torch.manual_seed(7)
    a = pm(input_ids=ids).logits
    torch.manual_seed(7)
    b = fused(input_ids=ids).logits
    assert not calls and rel_max(b, a) < 1e-6  # identical dropout masks: PEFT's own path
    pm.eval(), fused.eval()
    assert rel_max(_logits(fused, ids), _logits(pm, ids)) < 1e-5 and len(calls) == 14


def test_fuse_reports_unfusable_layers_and_rejects_non_peft_models():
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        corda_fast.fuse(tiny_llama(hidden=64))
    with pytest.raises(ValueError, match="backend"):
        corda_fast.fuse(_peft_llama(), backend="cuda")
    # DoRA is a per-call fallback: fused class, PEFT's arithmetic
    pm = _peft_llama(use_dora=True)
    ids = torch.randint(0, 300, (1, 7))
    ref = _logits(pm, ids)
    corda_fast.fuse(pm)
    assert rel_max(_logits(pm, ids), ref) < 1e-6
    # a base layer that is not a plain Linear is left alone, with the reason
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 1.0

    model = nn.Sequential(Custom(8, 8), nn.Linear(8, 4))
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["0", "1"]))
    report = corda_fast.fuse(pm)
    assert len(report.fused) == 1 and any("Custom" in why for why in report.skipped.values())


def test_fused_gpt2_conv1d_matches_peft():
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                                fan_in_fan_out=True, init_lora_weights=False))
    fused = copy.deepcopy(pm)
    assert len(corda_fast.fuse(fused).fused) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj × 2
    ids = torch.randint(0, 300, (2, 10))
    pm.train(), fused.train()  # GPT-2's own dropout is on: the same masks from the same seed
    torch.manual_seed(3)
    la = pm(input_ids=ids, labels=ids).loss
    torch.manual_seed(3)
    lb = fused(input_ids=ids, labels=ids).loss
    la.backward(), lb.backward()
    assert abs(la.item() - lb.item()) < 1e-5
    ga = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    gb = {n: p.grad for n, p in fused.named_parameters() if p.grad is not None}
    assert ga.keys() == gb.keys() and len(ga) == 16
    assert max(rel_max(gb[n], ga[n]) for n in ga) < 1e-4


@pytest.mark.slow
def test_torch_compile_traces_the_fused_layer():
    pm = _peft_llama()
    corda_fast.fuse(pm)
    ids = torch.randint(0, 300, (2, 9))
    eager = pm(input_ids=ids, labels=ids).loss
    eager.backward()
    g_eager = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    pm.zero_grad()
    compiled = torch.compile(pm, backend="aot_eager", fullgraph=False)
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - eager.item()) < 1e-5
    assert max(rel_max(p.grad, g_eager[n]) for n, p in pm.named_parameters() if p.grad is not None) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiling traces the Triton op on fake tensors, which the "
                    "CPU interpreter cannot run (CUDA only; benchmarks/gpu_suite.sh runs it)")
@pytest.mark.interpreter
def test_torch_compile_traces_the_triton_op():
    (x, w, bb, a, b), (xc, wc, bc, ac, bcc) = _operands(10, 12, 9, 4, torch.float32, seed=8)
    fn = torch.compile(lambda x_, a_, b_: fused_lora_linear(x_, wc, bc, a_, b_, 0.5, backend="triton"),
                       backend="aot_eager", fullgraph=True)
    got = fn(xc, ac, bcc)
    assert rel_max(got, x @ w.t() + bb + 0.5 * (x @ a.t()) @ b.t()) < TOL[torch.float32]


# ---------------------------------------------------------------- training: fused and unfused give the same curve

def _train(model, batches, steps):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for i in range(steps):
        batch = batches[i % len(batches)]
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend,steps", [("torch", 20), pytest.param("triton", 20, marks=[
    pytest.mark.interpreter, pytest.mark.skipif(NO_TRITON, reason="triton cannot run here")])])
def test_training_curve_fused_equals_unfused(backend, steps):
    model = tiny_llama(hidden=64, seed=1)
    batches = padded_batches(random_samples(8, lo=6, hi=14, seed=4), batch_size=4)
    peft_model = init(model, batches, rank=8, mode="ipm")
    fused = copy.deepcopy(peft_model)
    assert len(corda_fast.fuse(fused, backend=backend).fused) == 14
    a = _train(peft_model, batches, steps)
    b = _train(fused, batches, steps)
    assert a[-1] < a[0]  # it learns
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 1e-4, (a, b)


def test_init_adapters_fused_flag():
    model = tiny_llama(hidden=64, seed=2)
    ids = torch.randint(0, 300, (2, 9))
    ref = _logits(model, ids)
    batches = padded_batches(random_samples(6, seed=5), batch_size=3)
    pm, report = init(model, batches, rank=4, fused=True, return_report=True)
    assert report.fused == 14
    assert sum(isinstance(m, FusedLoraLinear) for m in pm.modules()) == 14
    assert rel_max(_logits(pm, ids), ref) < 1e-5


def test_transformers_trainer_trains_and_saves_a_fused_model(tmp_path):
    from peft import PeftModel
    from transformers import Trainer, TrainingArguments

    model = tiny_llama(hidden=64, seed=3)
    batches = padded_batches(random_samples(6, lo=8, hi=8, seed=6), batch_size=3)
    pm = init(model, batches, rank=4, mode="ipm", fused=True)
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    data = [{"input_ids": s, "labels": s} for s in random_samples(8, lo=8, hi=8, seed=7)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1)
    result = Trainer(model=pm, args=args, train_dataset=data).train()
    assert result.global_step == 3
    assert sum(isinstance(m, FusedLoraLinear) for m in pm.modules()) == 14  # still fused after Trainer's setup
    assert all(not torch.equal(p, before[n]) for n, p in pm.named_parameters() if p.requires_grad)
    pm.save_pretrained(tmp_path / "adapter")
    corda_fast.save_residual_base(pm, tmp_path / "base")
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    ids = torch.randint(0, 300, (2, 8))
    assert rel_max(_logits(loaded, ids), _logits(pm, ids)) < 1e-5
