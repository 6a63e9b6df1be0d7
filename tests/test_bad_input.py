"""Bad input: a clear error naming what and where, and the user's model left exactly as it was."""

import pytest
import torch
from torch import nn

import corda_fast
from corda_fast import CacheError, CalibrationError, CordaConfigError, TargetError

from helpers import Setup, assert_model_unchanged, model_state, padded_batches, quiet, random_samples, rel_max, tiny_llama


def run_and_check(model, exc, match, *args, recover=True, **kwargs):
    """The call fails with a clear error, the model is exactly as it was, and (for a causal LM) the same object then
    accepts a valid call whose outputs at init equal the original ones."""
    lm = recover and hasattr(model, "lm_head")
    ids = torch.randint(1, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    before = model_state(model)
    if lm:
        with torch.no_grad():
            ref = model(input_ids=ids).logits
    with pytest.raises(exc, match=match):
        corda_fast.init_adapters(model, *args, **quiet(**kwargs))
    assert_model_unchanged(model, before)
    if lm and all(torch.isfinite(p).all() for p in model.parameters()):
        pm = corda_fast.init_adapters(model, padded_batches(random_samples(4), 2), **quiet(rank=2))
        with torch.no_grad():
            assert rel_max(pm(input_ids=ids).logits, ref) < 1e-5


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_activations_name_layer_and_batch(bad):
    model = tiny_llama()
    model.train()  # mode must come back as train
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = bad
    batches = padded_batches(random_samples(6), 2)
    batches[2]["input_ids"][1, 0] = 7  # only the third batch carries the poisoned token
    run_and_check(model, CalibrationError, r"layer 'model\.layers\.0\.self_attn\.q_proj'.*batch 2", batches)


def test_poison_on_padding_is_ignored():
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[0] = float("nan")  # token 0 is only used as padding here
    samples = [s.clamp(min=1) for s in random_samples(6)]
    batches = padded_batches(samples, 3, side="right", pad_id=0)
    # the first layer's q_proj sees NaN rows only at padded positions, which never enter a statistic
    # (later layers get NaN everywhere: attention multiplies the padded NaN values by zero weights)
    cfg = Setup(target_modules=["model.layers.0.self_attn.q_proj"])
    stats = corda_fast.stages.collect_covariance(model, batches, cfg.corda, cfg.lora)
    assert all(bool(torch.isfinite(s).all()) for s in stats.sums.values())


def test_empty_loader():
    run_and_check(tiny_llama(), CalibrationError, "no batches", [])


def test_rank_too_large_names_layer_and_max():
    run_and_check(tiny_llama(), TargetError, r"rank 200 .*'model\.layers\.0\.self_attn\.q_proj' \(128x128\).*max rank is 128",
                  padded_batches(random_samples(2), 2), rank=200)


def test_target_matches_nothing():
    run_and_check(tiny_llama(), TargetError, "matches no nn.Linear", padded_batches(random_samples(2), 2),
                  target_modules=["qkv_proj"])


def test_target_matches_unsupported_module():
    run_and_check(tiny_llama(), TargetError, r"not nn.Linear.*model\.layers\.0\.mlp \(LlamaMLP\)",
                  padded_batches(random_samples(2), 2), target_modules=["mlp"])


def test_quantized_weight_refused():
    model = tiny_llama()
    lin = model.model.layers[0].self_attn.q_proj
    lin.weight = nn.Parameter(lin.weight.detach().to(torch.int8), requires_grad=False)
    run_and_check(model, TargetError, r"'model\.layers\.0\.self_attn\.q_proj' has quantized weights",
                  padded_batches(random_samples(2), 2), recover=False)  # the model itself stays unsupported


def test_cache_from_another_model(tmp_path):
    path = str(tmp_path / "cov.safetensors")
    corda_fast.init_adapters(tiny_llama(seed=0), padded_batches(random_samples(3), 3), **quiet(covariance_cache=path))
    run_and_check(tiny_llama(seed=1), CacheError, "another model", None, covariance_cache=path)
    run_and_check(tiny_llama(hidden=64), CacheError, "another model", None, covariance_cache=path)
    run_and_check(tiny_llama(seed=0), CacheError, "normalization", None, covariance_cache=path, normalization="absmax")


def test_cache_missing_layers(tmp_path):
    path = str(tmp_path / "cov.safetensors")
    corda_fast.init_adapters(tiny_llama(), padded_batches(random_samples(3), 3),
                             **quiet(covariance_cache=path, target_modules=["q_proj"]))
    run_and_check(tiny_llama(), CacheError, r"no statistic for layer.*o_proj", None, covariance_cache=path)


def test_exception_inside_loader_mid_calibration():
    batches = padded_batches(random_samples(6), 2)

    def loader():
        yield batches[0]
        yield batches[1]
        raise RuntimeError("disk on fire")

    model = tiny_llama()
    model.train()
    run_and_check(model, RuntimeError, "disk on fire", loader())


def test_exception_inside_model_forward():
    model = tiny_llama()

    def boom(module, args):
        raise ValueError("forward exploded")

    model.model.layers[1].mlp.register_forward_pre_hook(boom)
    run_and_check(model, ValueError, "forward exploded", padded_batches(random_samples(2), 2),
                  recover=False)  # the hook stays


def test_bad_batch_type():
    run_and_check(tiny_llama(), CalibrationError, "cannot use a calibration batch of type str", ["hello"])


def test_no_loader_no_cache():
    run_and_check(tiny_llama(), ValueError, "needs a calibration `loader`", None)


def test_unused_target():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(8, 8)
            self.unused = nn.Linear(8, 8)

        def forward(self, input_ids=None, attention_mask=None):
            return self.used(input_ids)

    model = Skip()
    run_and_check(model, CalibrationError, r"saw no calibration token: \['unused'\]", [torch.randn(2, 5, 8)], rank=2)
    pm = corda_fast.init_adapters(model, [torch.randn(2, 5, 8)], **quiet(rank=2, unused_targets="skip"))
    assert list(pm.peft_config["default"].target_modules) == ["used"]


@pytest.mark.parametrize("field,value,match", [
    ("mode", "fast", r"CordaConfig.mode='fast' is invalid: expected one of \('ipm', 'kpm'\)"),
    ("rank", 0, r"LoraConfig.r=0 is invalid"),
    ("normalization", "max", r"CordaConfig.normalization='max'"),
    ("precision", "float16", r"CordaConfig.precision='float16'"),
    ("target_modules", 3, r"LoraConfig.target_modules=3"),
    ("lora_dropout", 1.5, r"LoraConfig.lora_dropout=1.5"),
    ("damping_max_iter", 0, r"DampingConfig.max_iter=0"),
    ("rank_pattern", {"q": 0}, r"LoraConfig.rank_pattern"),
    ("budget", 0, r"PlusConfig.budget=0"),
    ("streaming", "sometimes", r"CalibrationConfig.streaming='sometimes'"),
    ("max_batches", 0, r"CalibrationConfig.max_batches=0"),
])
def test_config_validation_names_field(field, value, match):
    with pytest.raises(CordaConfigError, match=match):
        Setup(**{field: value})
    run_and_check(tiny_llama(), CordaConfigError, match, padded_batches(random_samples(2), 2), **{field: value})


def test_shortcut_validation_names_field():
    for bad in (-1, 0):  # the argument the user typed is named, and what it sets
        with pytest.raises(CordaConfigError, match=rf"^rank={bad} \(LoraConfig.r\) is invalid"):
            corda_fast.init_adapters(tiny_llama(), padded_batches(random_samples(2), 2), rank=bad)
    with pytest.raises(CordaConfigError, match=r"^LoraConfig.r=0"):  # given in the LoRA config: named there
        corda_fast.LoraSpec(r=0)
    with pytest.raises(CordaConfigError, match=r"CalibrationConfig.streaming='yes'"):
        corda_fast.init_adapters(tiny_llama(), padded_batches(random_samples(2), 2), streaming="yes")


def test_failure_while_building_restores_model():
    model = tiny_llama()
    cfg = Setup(rank=4)
    targets = corda_fast.stages.resolve_targets(model, cfg.lora)
    stats = corda_fast.stages.collect_covariance(model, padded_batches(random_samples(4), 2), cfg.corda, targets)
    factors = corda_fast.stages.decompose(stats, targets, cfg.corda)
    last = targets[-1].name
    factors[last].A = factors[last].A[:2]  # corrupt one layer's factors: PEFT's shapes will not match
    before = model_state(model)
    with pytest.raises(RuntimeError, match=last.replace(".", r"\.")):
        corda_fast.stages.build_peft_model(model, factors, targets, cfg.corda, cfg.lora)
    assert_model_unchanged(model, before)


def test_user_rng_stream_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    model = tiny_llama()
    batches = padded_batches(random_samples(4), 2)
    torch.manual_seed(123)
    corda_fast.init_adapters(model, batches, **quiet(rank=4))
    assert torch.equal(torch.rand(3), expected)
