"""Nothing a user feeds init_adapters leaves their model broken: one test per case of the reliability issue (shared
weights, failures after wrapping, caches and their data, inputs without a sequence axis, module modes, existing
adapters, malformed batches, unreadable caches, the command line, late failures made early). Every error case
checks the whole model state afterwards, and that the same model object then accepts a valid call that reproduces
its original outputs at init."""

import copy

import pytest
import torch
from torch import nn

import corda_fast
from corda_fast import CacheError, CalibrationError, CordaConfigError, TargetError
from corda_fast.preflight import AdapterError

from helpers import (
    Setup,
    assert_model_unchanged,
    init,
    model_state,
    padded_batches,
    random_samples,
    rel,
    rel_max,
    tiny_bert,
    tiny_llama,
)


class NoCalibration:
    """A loader that fails the test if anything starts iterating it: proves a check ran before calibration."""

    def __iter__(self):
        raise AssertionError("calibration started before the up-front checks")


def outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def fails_cleanly_then_recovers(model, exc, match, loader, retry=None, **kwargs):
    """``init`` raises ``exc`` matching ``match`` and leaves ``model`` exactly as it was; then a valid call on the
    same object succeeds and its outputs at init equal the original ones."""
    ids = torch.randint(1, 300, (2, 11), generator=torch.Generator().manual_seed(5))
    before, ref = model_state(model), outputs(model, ids)
    with pytest.raises(exc, match=match):
        init(model, loader, **kwargs)
    assert_model_unchanged(model, before)
    pm = init(model, padded_batches(random_samples(4), 2), **(retry or {"rank": 2}))
    assert rel_max(outputs(pm, ids), ref) < 1e-5
    return pm


# 1 ------------------------------------------------------------------------------------------- shared weights
def test_two_targeted_layers_sharing_a_weight_are_refused_naming_both():
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    attn.k_proj.weight = attn.q_proj.weight.__class__(attn.k_proj.weight.detach().clone())
    model.model.layers[1].self_attn.q_proj.weight = attn.q_proj.weight  # tied across blocks, both targeted
    fails_cleanly_then_recovers(model, TargetError, r"'model\.layers\.0\.self_attn\.q_proj' shares its weight with "
                                r"\['model\.layers\.1\.self_attn\.q_proj\.weight'\] \(also targeted\)",
                                NoCalibration(), target_modules=["q_proj"],
                                retry={"rank": 2, "target_modules": ["v_proj"]})


def test_lm_head_tied_to_embeddings_is_refused_when_targeted():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=136, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fails_cleanly_then_recovers(model, TargetError, r"'lm_head' shares its weight with \['model\.embed_tokens\.weight'\]",
                                NoCalibration(), target_modules=["lm_head", "q_proj"])


def test_untied_control_is_exact_at_init():
    model = tiny_llama()
    ids = torch.randint(1, 300, (2, 9))
    ref = outputs(model, ids)
    pm = init(copy.deepcopy(model), padded_batches(random_samples(4), 2), rank=2, target_modules=["q_proj"])
    assert rel_max(outputs(pm, ids), ref) < 1e-5


# 2 ------------------------------------------------------------------------------------------- failure after wrapping
@pytest.mark.parametrize("stage", ["save_initial_adapter", "fuse"])
def test_failure_after_wrapping_restores_the_model(stage, monkeypatch, tmp_path):
    from corda_fast import api

    def boom(*args, **kwargs):
        raise OSError(f"{stage} failed (simulated)")

    model = tiny_llama()
    model.train()
    model.model.layers[0].eval()  # mixed modes must come back as they were
    model.model.embed_tokens.weight.requires_grad_(False)  # and so must requires_grad
    with monkeypatch.context() as m:
        m.setattr(api, stage, boom)
        before = model_state(model)
        with pytest.raises(OSError, match="simulated"):
            init(model, padded_batches(random_samples(4), 2), rank=2, initial_adapter_dir=str(tmp_path / "init"),
                 fused=stage == "fuse")
        assert_model_unchanged(model, before)
    fails_cleanly_then_recovers(model, ValueError, "needs a calibration", None)


def test_unwritable_initial_adapter_dir_is_found_before_calibration(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    fails_cleanly_then_recovers(tiny_llama(), ValueError, "initial_adapter_dir folder .* not a folder",
                                NoCalibration(), rank=2, initial_adapter_dir=str(blocker))


# 3 ------------------------------------------------------------------------------------------- caches and their data
def test_cache_refuses_a_loader_with_other_data_and_names_the_way_out(tmp_path):
    path = str(tmp_path / "cov.safetensors")
    data_a = padded_batches(random_samples(6, seed=1), 3)
    data_b = padded_batches(random_samples(6, seed=2), 3)
    a = init(tiny_llama(), data_a, rank=4, covariance_cache=path)
    fails_cleanly_then_recovers(tiny_llama(), CacheError, r"other calibration data.*loader=None.*overwrite_cache=True",
                                data_b, rank=4, covariance_cache=path)
    same, report = init(tiny_llama(), data_a, rank=4, covariance_cache=path, return_report=True)  # same data: hit
    assert report.cache_hit
    reordered = padded_batches(list(reversed(random_samples(6, seed=1))), 4, side="left")  # order, batching, side
    assert init(tiny_llama(), reordered, rank=4, covariance_cache=path, return_report=True)[1].cache_hit
    none, report = init(tiny_llama(), None, rank=4, covariance_cache=path, return_report=True)
    assert report.cache_hit
    name = "base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight"
    assert torch.equal(a.state_dict()[name], same.state_dict()[name])
    assert torch.equal(a.state_dict()[name], none.state_dict()[name])
    b, report = init(tiny_llama(), data_b, rank=4, covariance_cache=path, overwrite_cache=True, return_report=True)
    assert not report.cache_hit
    fresh = init(tiny_llama(), data_b, rank=4)
    assert torch.equal(b.state_dict()[name], fresh.state_dict()[name])  # recalibrated on data_b ...
    init(tiny_llama(), data_b, rank=4, covariance_cache=path)  # ... and the cache now belongs to data_b


def test_cache_of_another_model_config_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = str(tmp_path / "cov.safetensors")
    model = tiny_llama()
    init(copy.deepcopy(model), padded_batches(random_samples(4), 2), rank=2, covariance_cache=path)
    cfg = LlamaConfig(**{**model.config.to_dict(), "hidden_act": "gelu"})
    other = LlamaForCausalLM(cfg).eval()
    other.load_state_dict(model.state_dict())  # same weights, another activation
    fails_cleanly_then_recovers(other, CacheError, "another model", None, rank=2, covariance_cache=path)


@pytest.mark.parametrize("content", [b"", b"garbage, not safetensors", "truncated"])
def test_unreadable_cache_names_the_file(tmp_path, content):
    path = tmp_path / "cov.safetensors"
    if content == "truncated":
        init(tiny_llama(), padded_batches(random_samples(4), 2), rank=2, covariance_cache=str(path))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    fails_cleanly_then_recovers(tiny_llama(), CacheError, f"covariance cache '{path}'", None, rank=2,
                                covariance_cache=str(path))


def test_unwritable_cache_path_is_found_before_calibration(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fails_cleanly_then_recovers(tiny_llama(), PermissionError, "covariance_cache file .* cannot be written",
                                NoCalibration(), rank=2, covariance_cache=str(blocker / "cov.safetensors"))


# 4 ------------------------------------------------------------------------------------------- no sequence axis
def test_inputs_without_a_sequence_axis_are_one_sample_per_row():
    """BERT's pooler reads (batch, hidden): a batch of 3 equals 3 batches of 1, and an all-padding row is dropped."""
    model = tiny_bert()
    samples = random_samples(3, seed=4)
    cfg = Setup(target_modules=["pooler.dense"], normalization="absmax")
    batched = corda_fast.stages.collect_covariance(model, padded_batches(samples, 3), *cfg.stage)
    single = corda_fast.stages.collect_covariance(model, [padded_batches([s], 1)[0] for s in samples], *cfg.stage)
    key = next(iter(batched.sums))
    assert batched.n_samples[key] == single.n_samples[key] == 3
    assert rel(batched.covariance(key), single.covariance(key)) < 1e-6
    with_pad = padded_batches(samples, 3)[0]
    with_pad = {k: torch.cat([v, v[:1]]) for k, v in with_pad.items() if k != "labels"}
    with_pad["attention_mask"][-1] = 0  # a fourth, all-padding row
    padded = corda_fast.stages.collect_covariance(model, [with_pad], *cfg.stage)
    assert padded.n_samples[key] == 3 and rel(padded.covariance(key), single.covariance(key)) < 1e-6


# 5 ------------------------------------------------------------------------------------------- module modes
def test_each_modules_own_mode_survives_success_and_failure():
    model = tiny_llama()
    model.train()
    model.model.layers[1].eval()
    model.model.norm.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    init(copy.deepcopy(model), padded_batches(random_samples(4), 2), rank=2)  # a copy keeps modes too
    pm = init(model, padded_batches(random_samples(4), 2), rank=2)
    assert {n: m.training for n, m in pm.base_model.model.named_modules() if n in modes} == modes
    other = tiny_llama()
    other.train()
    other.model.layers[0].self_attn.eval()
    fails_cleanly_then_recovers(other, CalibrationError, "no batches", [])


# 6 ------------------------------------------------------------------------------------------- existing adapters
def test_a_model_with_adapters_is_refused_before_calibration():
    pm = init(tiny_llama(), padded_batches(random_samples(4), 2), rank=2)
    for model in (pm, pm.base_model.model):
        before = model_state(model)
        with pytest.raises(AdapterError, match=r"already has LoRA adapters.*unload\(\)"):
            init(model, NoCalibration(), rank=2)
        assert_model_unchanged(model, before)
    base = pm.unload()  # the documented way back: a plain model (carrying W_res) that accepts a new call
    init(base, padded_batches(random_samples(4), 2), rank=2)


# 7 ------------------------------------------------------------------------------------------- malformed batches
@pytest.mark.parametrize("batch,match", [
    (torch.randint(0, 300, (16,)), r"batch 0: input_ids has shape \(16,\), expected \(batch, sequence\).*unsqueeze"),
    (torch.zeros(0, 5, dtype=torch.long), r"calibration batch 0 is empty"),
    ({"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 4)},
     r"attention_mask of shape \(2, 4\) does not fit"),
])
def test_malformed_batches_get_clear_errors(batch, match):
    fails_cleanly_then_recovers(tiny_llama(), CalibrationError, match, [batch], rank=2)


# 10 ------------------------------------------------------------------------------------------ late failures, early
def test_task_type_typo_is_found_before_calibration():
    fails_cleanly_then_recovers(tiny_llama(), CordaConfigError, r"LoraConfig.task_type='CAUSAL_L' is invalid",
                                NoCalibration(), rank=2, task_type="CAUSAL_L")


def test_peft_lora_config_options_corda_cannot_honour_are_refused_by_name():
    from peft import LoraConfig

    for bad, name in ((dict(use_dora=True), "use_dora=True"), (dict(bias="all"), "bias='all'"),
                      (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'")):
        model = tiny_llama()
        before = model_state(model)
        with pytest.raises(CordaConfigError, match=name):
            corda_fast.init_adapters(model, NoCalibration(), lora_config=LoraConfig(r=2, **bad))
        assert_model_unchanged(model, before)


def test_peft_lora_config_is_honoured():
    from peft import LoraConfig

    lc = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], exclude_modules=["model.layers.1.mlp.down_proj"],
                    rank_pattern={"q_proj": 6}, alpha_pattern={"down_proj": 2}, use_rslora=True, lora_dropout=0.1,
                    task_type="CAUSAL_LM")
    pm = corda_fast.init_adapters(tiny_llama(), padded_batches(random_samples(4), 2), lora_config=lc,
                                  corda_config=corda_fast.CordaConfig(show_progress=False))
    got = pm.peft_config["default"]
    assert sorted(got.target_modules) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                                          "model.layers.1.self_attn.q_proj"]
    assert got.task_type == "CAUSAL_LM" and got.use_rslora and got.lora_dropout == 0.1
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    down = pm.base_model.model.model.layers[0].mlp.down_proj
    assert q.lora_A["default"].weight.shape[0] == 6 and q.scaling["default"] == pytest.approx(8 / 6 ** 0.5)
    assert down.lora_A["default"].weight.shape[0] == 4 and down.scaling["default"] == pytest.approx(2 / 2)


def test_pattern_rule_matches_peft():
    from peft.utils.other import get_pattern_key

    from corda_fast.targets import pattern_key

    keys = ["q_proj", r"layers\.1\.mlp\.down_proj", "mlp.*", "self_attn.q_proj", "0.mlp.up_proj"]
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.up_proj",
             "model.layers.1.mlp.gate_proj", "model.layers.1.self_attn.v_proj", "q_proj"]
    for name in names:
        peft = get_pattern_key(keys, name)
        ours = pattern_key(keys, name)
        assert (ours if ours is not None else name) == peft, name


# 1-10: a model with nothing wrong still works, twice ------------------------------------------------------------
def test_model_object_accepts_a_second_call_after_success_via_unload():
    model = tiny_llama()
    ids = torch.randint(1, 300, (2, 9))
    ref = outputs(model, ids)
    pm = init(model, padded_batches(random_samples(4), 2), rank=2)
    assert rel_max(outputs(pm, ids), ref) < 1e-5
    base = pm.unload()  # the residual base alone (W_res): another model, that accepts a call of its own
    ref_base = outputs(base, ids)
    again = init(base, padded_batches(random_samples(4), 2), rank=2)
    assert rel_max(outputs(again, ids), ref_base) < 1e-5


def test_nothing_in_a_valid_call_is_left_behind_on_other_modules():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.lm_head.register_forward_hook(lambda *a: None)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    pm = init(model, padded_batches(random_samples(4), 2), rank=2)
    assert sum(len(m._forward_hooks) for m in pm.modules()) == hooks
    assert isinstance(pm.base_model.model.lm_head, nn.Linear)
