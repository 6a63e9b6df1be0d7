"""Routed experts stored as 3-D parameters (``LoraConfig(target_parameters=[...])``) on tiny random Qwen3-MoE,
Mixtral and gpt-oss models: per-expert statistics from routed tokens against a float64 loop over experts as dense
layers, identity at init, experts implementations, never-routed experts, training, save / reload with plain PEFT,
streaming, the cache, route_all_experts, and what is refused."""

import copy

import pytest
import torch

import corda_fast
from corda_fast.stages import collect_covariance, resolve_targets

from helpers import (
    Setup,
    assert_model_unchanged,
    init,
    model_state,
    padded_batches,
    random_samples,
    reference_damping,
    reference_factors,
    rel,
    tiny_moe,
)

PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def batches(n=12, seed=1, hi=30):
    return padded_batches(random_samples(n, lo=4, hi=hi, seed=seed), 4, side="left")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def experts_of(model, layer=0):
    """The experts module (under a PEFT model's ParamWrappers: the module they wrap)."""
    m = model.get_submodule(f"model.layers.{layer}.mlp.experts")
    return m.get_base_layer() if hasattr(m, "get_base_layer") else m


def wrapper(peft_model, layer, param):
    m = peft_model.base_model.model.get_submodule(f"model.layers.{layer}.mlp.experts")
    while m.parameter_name != param:
        m = m.base_layer
    return m


def expert_delta(peft_model, layer, param, e):
    """``s·B_e·A_e`` from the ParamWrapper's stored factors, as (out, in)."""
    w = wrapper(peft_model, layer, param)
    n = w.num_experts
    a = w.lora_A["default"].weight.detach().double().reshape(n, -1, w.lora_A["default"].weight.shape[1])[e]
    b = w.lora_B["default"].weight.detach().double().reshape(w.lora_B["default"].weight.shape[0], -1, n)[:, :, e]
    return w.scaling["default"] * b @ a


def expert_matrix(experts, param, e):
    w = getattr(experts, param)[e].detach().double()
    return w.T if experts.is_transposed else w


def reference_intermediate(kind, experts, x, e):
    """The input of expert ``e``'s down_proj, written out per family (float64)."""
    w = expert_matrix(experts, "gate_up_proj", e)
    h = x @ w.T
    if kind == "gpt_oss":
        h = h + experts.gate_up_proj_bias[e].double()
        gate, up = h[:, ::2].clamp(max=experts.limit), h[:, 1::2].clamp(-experts.limit, experts.limit)
        return (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def routed_inputs(model, data):
    """Per layer, per expert: the list of per-sample float64 rows the router sent to it (real tokens only)."""
    seen = {}

    def grab(layer):
        def hook(module, args, kwargs):
            seen.setdefault(layer, []).append((args[0].detach().double(), args[1].detach().clone()))
        return hook

    handles = [experts_of(model, i).register_forward_pre_hook(grab(i), with_kwargs=True) for i in range(2)]
    try:
        with torch.no_grad():
            for b in data:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for layer, calls in seen.items():
        per_expert = {}
        for (hidden, index), b in zip(calls, data):
            mask = b["attention_mask"].reshape(-1).bool()
            seq = b["attention_mask"].shape[1]
            for e in range(experts_of(model, layer).num_experts):
                chosen = (index == e).any(-1) & mask
                for s in range(b["attention_mask"].shape[0]):
                    rows = chosen[s * seq:(s + 1) * seq].nonzero().squeeze(1) + s * seq
                    if rows.numel():
                        per_expert.setdefault(e, []).append(hidden[rows])
        out[layer] = per_expert
    return out


def sample_cov(xs):
    """Mean over samples of (X/m)ᵀ(X/m), m = |signed max| (PEFT's normalisation)."""
    c = sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in xs)
    return c / len(xs)


# ---------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_every_expert_matches_a_float64_loop_over_experts(kind):
    model = tiny_moe(kind, torch.float64)
    data = batches()
    routed = routed_inputs(model, data)
    original = {i: copy.deepcopy(experts_of(model, i)) for i in range(2)}
    pm = init(model, data, target_modules=[], target_parameters=PARAMS, rank=3, precision="float64", mode="kpm")
    checked = 0
    for layer in range(2):
        ex = original[layer]
        for e, xs in routed[layer].items():
            if sum(x.shape[0] for x in xs) < 4:
                continue
            for param, inputs in (("gate_up_proj", xs),
                                  ("down_proj", [reference_intermediate(kind, ex, x, e) for x in xs])):
                c = sample_cov(inputs)
                lam = reference_damping(c)
                w = expert_matrix(ex, param, e)
                delta, res = reference_factors(w, c, 3, "kpm", 1.0, lam)
                got_res = getattr(experts_of(pm.base_model.model, layer), param)[e].detach().double()
                got_res = got_res.T if ex.is_transposed else got_res
                assert rel(expert_delta(pm, layer, param, e), delta) < 1e-6, (layer, param, e)
                assert rel(got_res, res) < 1e-6, (layer, param, e)
                checked += 1
    assert checked >= 8


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_identity_at_init(kind, dtype, tol):
    model = tiny_moe(kind, dtype)
    ids = torch.randint(0, 300, (3, 19))
    before = logits(model, ids)
    pm = init(model, batches(), target_modules=["q_proj"], target_parameters=PARAMS, rank=4)
    assert float((logits(pm, ids) - before).abs().max()) <= tol * float(before.abs().max())
    layer = wrapper(pm, 0, "gate_up_proj")
    assert layer.lora_A["default"].weight.shape == (4 * layer.num_experts, 48)
    assert getattr(experts_of(pm.base_model.model), "gate_up_proj").dtype == dtype
    with pm.disable_adapter():  # the adapters are not a no-op: the base now holds the residual
        assert float((logits(pm, ids) - before).abs().max()) > 1e-3 * float(before.abs().max())


def test_experts_implementations_give_the_same_statistics():
    model = tiny_moe("qwen3_moe")
    setup = Setup(target_modules=[], target_parameters=PARAMS)
    stats = {}
    for impl in ("eager", "grouped_mm", "batched_mm"):
        model.config._experts_implementation = impl
        stats[impl] = collect_covariance(model, batches(), setup.corda, setup.lora)
    for impl in ("grouped_mm", "batched_mm"):
        assert stats[impl].sums.keys() == stats["eager"].sums.keys()
        for k, v in stats["eager"].sums.items():
            assert rel(stats[impl].sums[k], v) < 1e-5, (impl, k)
            assert stats[impl].n_tokens[k] == stats["eager"].n_tokens[k]


def never_route(model, layer, expert):
    """A pre-hook on layer ``layer``'s experts that hands expert ``expert``'s tokens to another expert (top-2)."""
    def hook(module, args, kwargs):
        hidden, index, weights = args
        other = (index.flip(-1) + 1) % expert  # below `expert` and never the token's other choice
        return (hidden, torch.where(index == expert, other, index), weights), kwargs
    return experts_of(model, layer).register_forward_pre_hook(hook, with_kwargs=True)


def test_never_routed_expert_is_reported_and_finite():
    model = tiny_moe("mixtral", experts=6)
    reference = copy.deepcopy(experts_of(model, 0))
    never_route(model, 0, 5)
    pm, report = init(model, batches(), target_modules=[], target_parameters=PARAMS, rank=3, return_report=True)
    tokens = {n: row["tokens"] for row in report.low_data for n in row["layers"]}
    assert tokens["model.layers.0.mlp.experts.gate_up_proj[e=5]"] == 0
    assert tokens["model.layers.0.mlp.experts.down_proj[e=5]"] == 0
    assert "model.layers.0.mlp.experts.down_proj[e=4]" not in tokens or tokens[
        "model.layers.0.mlp.experts.down_proj[e=4]"] > 0
    for param in ("gate_up_proj", "down_proj"):
        d = expert_delta(pm, 0, param, 5)
        assert torch.isfinite(d).all()
        # C = I: the adapter is the top-r part of the expert's own SVD (IPM)
        u, s, vh = torch.linalg.svd(expert_matrix(reference, param, 5))
        assert rel(d, (u[:, :3] * s[:3]) @ vh[:3]) < 1e-4


def test_one_training_step_moves_expert_adapters():
    model = tiny_moe("qwen3_moe")
    pm = init(model, batches(), target_modules=[], target_parameters=PARAMS, rank=4)
    pm.train()
    params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(params.values(), lr=1e-2)
    ids = torch.randint(0, 300, (2, 16))
    pm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    moved = [n for n, p in params.items() if not torch.equal(p, before[n])]
    assert any("gate_up_proj" in n or "experts" in n for n in moved)
    assert len(moved) == len(params)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_save_and_reload_with_plain_peft(tmp_path, kind):
    from peft import PeftModel

    model = tiny_moe(kind)
    ids = torch.randint(0, 300, (2, 15))
    pm = init(model, batches(), target_modules=["q_proj"], target_parameters=PARAMS, rank=4)
    expected = logits(pm, ids)
    corda_fast.save_residual_base(pm, str(tmp_path / "base"))
    pm.save_pretrained(str(tmp_path / "adapter"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "base" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert not [n for n in names if "base_layer" in n or "lora_" in n]
    # the checkpoint's own names: transformers writes Qwen3-MoE's experts one by one, gpt-oss's as 3-D parameters
    assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.0.gate_proj.weight"} & set(names)
    cls = type(model)
    reloaded = PeftModel.from_pretrained(cls.from_pretrained(str(tmp_path / "base")).eval(), str(tmp_path / "adapter"))
    assert rel(logits(reloaded, ids), expected) < 1e-6


# ---------------------------------------------------------------------------------------------------- sources
def test_streaming_and_cache_equal_one_pass(tmp_path):
    model = tiny_moe("gpt_oss")
    kw = dict(target_modules=["q_proj", "o_proj"], target_parameters=PARAMS, rank=3, precision="float64")
    one = init(copy.deepcopy(model), batches(), **kw)
    streamed = init(copy.deepcopy(model), batches(), streaming=True, **kw)
    cache = str(tmp_path / "stats.safetensors")
    init(copy.deepcopy(model), batches(), covariance_cache=cache, **kw)
    cached = init(copy.deepcopy(model), None, covariance_cache=cache, **kw)
    for other in (streamed, cached):
        for layer in range(2):
            for param in ("gate_up_proj", "down_proj"):
                for e in range(4):
                    assert rel(expert_delta(other, layer, param, e), expert_delta(one, layer, param, e)) < 1e-6


def test_route_all_experts_uses_every_token_and_keeps_the_output():
    model = tiny_moe("qwen3_moe")
    data = batches()
    ids = torch.randint(0, 300, (2, 11))
    before = logits(model, ids)
    setup = Setup(target_modules=[], target_parameters=PARAMS, route_all_experts=True)
    stats = collect_covariance(model, data, setup.corda, setup.lora)
    assert rel(logits(model, ids), before) == 0  # calibration left the model's routing alone
    real = sum(int(b["attention_mask"].sum()) for b in data)
    key = stats.key_of("model.layers.0.mlp.experts.gate_up_proj[e=2]")
    assert stats.members[key] == [f"model.layers.0.mlp.experts.gate_up_proj[e={e}]" for e in range(4)]
    assert stats.n_tokens[key] == real
    assert stats.n_tokens[stats.key_of("model.layers.1.mlp.experts.down_proj[e=3]")] == real
    routed = collect_covariance(model, data, *Setup(target_modules=[], target_parameters=PARAMS).stage)
    assert routed.n_tokens[routed.key_of("model.layers.0.mlp.experts.down_proj[e=3]")] < real
    pm = init(model, data, target_modules=[], target_parameters=PARAMS, rank=3, route_all_experts=True)
    assert rel(logits(pm, ids), before) < 1e-5


def test_cache_records_route_all_experts(tmp_path):
    model = tiny_moe("qwen3_moe")
    cache = str(tmp_path / "stats.safetensors")
    init(copy.deepcopy(model), batches(), target_modules=[], target_parameters=PARAMS, rank=3, covariance_cache=cache)
    with pytest.raises(corda_fast.CacheError, match="route_all_experts=False"):
        init(copy.deepcopy(model), None, target_modules=[], target_parameters=PARAMS, rank=3, covariance_cache=cache,
             route_all_experts=True)


def test_command_line_adapts_experts(tmp_path):
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from corda_fast import cli, demo

    from helpers import tiny_model_dir

    model = tiny_moe("qwen3_moe")
    model_dir = tiny_model_dir(tmp_path / "model", model)
    data = tmp_path / "calib.txt"
    data.write_text(" ".join(demo.builtin_text().split()[:3000]))
    out = tmp_path / "out"
    assert cli.main(["init", "--model", str(model_dir), "--data", str(data), "--rank", "4", "--samples", "6",
                     "--seq-len", "32", "--batch-size", "3", "--concatenate", "--target-parameters",
                     "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "corda_report.json").read_text())
    assert report["n_layers"] == 16 and report["drift_at_init"]["relative"] < 1e-5
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "residual_base"),
                                       out / "initial_adapter")
    ids = torch.randint(2, 300, (1, 12))
    assert rel(logits(loaded, ids), logits(model, ids)) < 1e-5


# ---------------------------------------------------------------------------------------------------- refusals
def test_target_parameters_resolve_with_peft_rules_and_refuse_by_name():
    model = tiny_moe("qwen3_moe")
    targets = resolve_targets(model, corda_fast.LoraSpec(target_modules=[], target_parameters=["experts.down_proj"]))
    assert [t.name for t in targets[:2]] == ["model.layers.0.mlp.experts.down_proj[e=0]",
                                              "model.layers.0.mlp.experts.down_proj[e=1]"]
    assert len(targets) == 8 and all(t.d_in == 40 and t.d_out == 48 for t in targets)
    with pytest.raises(corda_fast.TargetError, match="mlp.gate.weight"):
        resolve_targets(model, corda_fast.LoraSpec(target_modules=[], target_parameters=["mlp.gate.weight"]))
    with pytest.raises(corda_fast.TargetError, match="no_such_proj"):
        resolve_targets(model, corda_fast.LoraSpec(target_modules=[], target_parameters=["experts.no_such_proj"]))


@pytest.mark.parametrize("flat,match", [
    ({"plus": True}, "ParamWrapper holds one rank"),
    ({"lora_dropout": 0.1}, "lora_dropout"),
])
def test_refusals_leave_the_model_untouched(flat, match):
    model = tiny_moe("qwen3_moe")
    before = model_state(model)
    with pytest.raises(ValueError, match=match):
        init(model, batches(), target_modules=[], target_parameters=PARAMS, rank=3, **flat)
    assert_model_unchanged(model, before)


def test_failure_after_the_build_restores_expert_parameters(tmp_path, monkeypatch):
    model = tiny_moe("gpt_oss")
    before = model_state(model)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("corda_fast.api.save_initial_adapter", broken)
    with pytest.raises(OSError, match="disk full"):
        init(model, batches(), target_modules=["q_proj"], target_parameters=PARAMS, rank=3,
             initial_adapter_dir=str(tmp_path / "a"))
    assert_model_unchanged(model, before)
