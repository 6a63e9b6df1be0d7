"""PEFT's documented CorDA behaviours, checked on both entry points: ``corda_fast.preprocess_corda`` called directly
("ours") and PEFT's own name while ``corda_fast.patch_peft()`` is active ("patched"); unpatched PEFT is the reference
for every behaviour. Covered: sample counts for token ids and float inputs, hooks removed (and the user's kept),
temporary fields left or pruned, ``cache_file`` and ``covariance_file`` written by one side and read by the other,
Conv1D layers, rank / alpha patterns and rsLoRA."""

import copy

import pytest
import torch
from torch import nn

import corda_fast

from helpers import lora_delta, padded_batches, random_samples, rel, rel_max, tiny_gpt2, tiny_llama

pytest.importorskip("attr", reason="PEFT's CorDA imports attrs")
TARGETS = ["q_proj", "v_proj", "down_proj"]
FIELDS = {"eigens", "sample_count", "covariance_matrix", "corda_method", "rank"}


def entry(kind: str):
    """The ``preprocess_corda`` of an entry point: PEFT's unpatched, PEFT's name while patched, or ours."""
    import peft.tuners.lora.corda as peft_corda

    if kind == "peft":
        assert peft_corda.preprocess_corda is not corda_fast.preprocess_corda
        return peft_corda.preprocess_corda
    if kind == "ours":
        return corda_fast.preprocess_corda

    def patched(*args, **kwargs):
        with corda_fast.patched_peft():
            from peft.tuners.lora.corda import preprocess_corda  # imported after patching, as documented

            assert preprocess_corda is corda_fast.preprocess_corda
            return preprocess_corda(*args, **kwargs)

    return patched


def lora_config(mode="ipm", targets=TARGETS, r=4, **corda_kw):
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig

    extra = {k: corda_kw.pop(k) for k in ("rank_pattern", "alpha_pattern", "use_rslora", "lora_alpha")
             if k in corda_kw}
    return LoraConfig(r=r, target_modules=targets, init_lora_weights="corda",
                      corda_config=CordaConfig(corda_method=mode, **corda_kw), **{"lora_alpha": 2 * r, **extra})


def run_ids(model, samples):
    """PEFT's usage: one sample per forward (batch size 1)."""
    def run():
        for s in samples:
            model(s.unsqueeze(0))
    return run


def added_fields(model, before) -> dict:
    return {n: set(vars(m)) - before[n] for n, m in model.named_modules() if set(vars(m)) - before[n]}


SIDES = ["ours", "patched"]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("prune", [True, False])
def test_fields_left_on_each_target_are_peft_s(side, prune):
    base = tiny_llama(seed=31)
    samples = random_samples(6, lo=5, hi=20, seed=31)
    out = {}
    for kind in ("peft", side):
        model = copy.deepcopy(base)
        before = {n: set(vars(m)) for n, m in model.named_modules()}
        entry(kind)(model, lora_config(prune_temporary_fields=prune), run_model=run_ids(model, samples))
        out[kind] = (model, added_fields(model, before))
    (ref, ref_added), (got, got_added) = out["peft"], out[side]
    assert got_added == ref_added  # the same fields on the same modules
    assert set().union(*got_added.values()) == ({"eigens"} if prune else FIELDS)
    for name in got_added:
        m, p = got.get_submodule(name), ref.get_submodule(name)
        for k in ("S_WC", "U_WC", "V_WC"):
            assert getattr(m.eigens, k).shape == getattr(p.eigens, k).shape, (name, k)
        if not prune:
            assert (m.sample_count, m.corda_method, m.rank) == (p.sample_count, p.corda_method, p.rank) == (6, "ipm", 4)
            assert m.covariance_matrix.dtype == p.covariance_matrix.dtype == torch.float32
            assert rel(m.covariance_matrix, p.covariance_matrix) < 1e-5, name


class MLP(nn.Module):
    """A model on float inputs: no token ids, no sequence axis known."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 12)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("shape", [(5, 12), (1, 7, 12)])
def test_float_inputs_count_one_sample_per_call(side, shape):
    """A forward on float inputs (2-D rows, or a 3-D batch of one) is one sample normalised by the call's max, as
    PEFT counts it."""
    torch.manual_seed(0)
    base = MLP()
    xs = [torch.randn(*shape) * (i + 1) - 0.3 * i for i in range(4)]
    out = {}
    for kind in ("peft", side):
        model = copy.deepcopy(base)
        lc = lora_config(targets=["up", "down"], r=3, prune_temporary_fields=False)
        entry(kind)(model, lc, run_model=lambda m=model: [m(x) for x in xs])
        out[kind] = model
    for name in ("up", "down"):
        m, p = out[side].get_submodule(name), out["peft"].get_submodule(name)
        assert m.sample_count == p.sample_count == 4
        assert rel(m.covariance_matrix, p.covariance_matrix) < 1e-5, name


@pytest.mark.parametrize("side", SIDES)
def test_token_ids_batch_counts_each_row(side):
    """With token ids the layout is known: a padded batch of 3 counts 3 samples and gives the statistics of batch
    size 1 (PEFT itself needs batch size 1 there)."""
    base = tiny_llama(seed=32)
    samples = random_samples(6, lo=5, hi=20, seed=32)
    batches = padded_batches(samples, 3, side="left")
    ref = copy.deepcopy(base)
    entry("peft")(ref, lora_config(prune_temporary_fields=False), run_model=run_ids(ref, samples))
    model = copy.deepcopy(base)
    entry(side)(model, lora_config(prune_temporary_fields=False),
                run_model=lambda: [model(b["input_ids"], attention_mask=b["attention_mask"]) for b in batches])
    name = "model.layers.1.mlp.down_proj"
    assert model.get_submodule(name).sample_count == 6
    assert rel(model.get_submodule(name).covariance_matrix, ref.get_submodule(name).covariance_matrix) < 1e-5


@pytest.mark.parametrize("side", SIDES)
def test_hooks_are_removed_and_the_users_kept(side):
    model = tiny_llama(seed=33)
    seen = []
    user = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: seen.append(1))
    entry(side)(model, lora_config(), run_model=run_ids(model, random_samples(3, seed=33)))
    assert len(seen) == 3  # the user's hook ran during calibration ...
    hooked = {n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks}
    assert hooked == {"model.layers.0.self_attn.q_proj"}  # ... and is the only hook left
    user.remove()


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("writer", ["peft", "side"])
def test_caches_written_by_one_side_are_read_by_the_other(side, writer, tmp_path):
    """``cache_file`` (eigens) and ``covariance_file`` (covariances) in PEFT's formats, both ways: the reader
    calibrates nothing and ends with the writer's covariances and eigens."""
    base = tiny_llama(seed=34)
    samples = random_samples(5, lo=5, hi=20, seed=34)
    write, read = ("peft", side) if writer == "peft" else (side, "peft")
    eig, cov = str(tmp_path / "eigens.pt"), str(tmp_path / "cov.pt")
    first = copy.deepcopy(base)
    entry(write)(first, lora_config(cache_file=eig, covariance_file=cov, prune_temporary_fields=False),
                 run_model=run_ids(first, samples))

    def never():
        raise AssertionError("calibrated although the file exists")

    from_cov = copy.deepcopy(base)
    entry(read)(from_cov, lora_config(covariance_file=cov, prune_temporary_fields=False), run_model=never)
    from_eig = copy.deepcopy(base)
    entry(read)(from_eig, lora_config(cache_file=eig), run_model=never)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        f, c, e = (m.get_submodule(name) for m in (first, from_cov, from_eig))
        assert rel(c.covariance_matrix, f.covariance_matrix) < 1e-6, name
        assert not hasattr(c, "sample_count")  # PEFT reads none from a covariance file
        for k in ("S_WC", "U_WC", "V_WC"):
            assert torch.equal(getattr(e.eigens, k), getattr(f.eigens, k)), (name, k)
        # IPM from the same covariance: the same kept subspace, whoever decomposed it
        proj = lambda v: v @ torch.linalg.pinv(v)  # noqa: E731
        assert rel(proj(c.eigens.U_WC.double()), proj(f.eigens.U_WC.double())) < 1e-4, name


def _peft_model(kind, base, samples, **lc_kw):
    from peft import get_peft_model

    model = copy.deepcopy(base)
    lc = lora_config(**lc_kw)
    entry(kind)(model, lc, run_model=run_ids(model, samples))
    return get_peft_model(model, lc)


@pytest.mark.parametrize("side", SIDES)
def test_conv1d_layers(side):
    base = tiny_gpt2(seed=35)
    samples = random_samples(6, lo=5, hi=20, seed=35)
    ref = _peft_model("peft", base, samples, targets=["c_attn", "c_fc"])
    got = _peft_model(side, base, samples, targets=["c_attn", "c_fc"])
    ids = torch.randint(1, 300, (2, 9))
    with torch.no_grad():
        assert rel_max(got(input_ids=ids).logits, base(input_ids=ids).logits) < 1e-5  # identity at init
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"):
        assert rel(lora_delta(got, name), lora_delta(ref, name)) < 1e-3, name  # IPM: well conditioned


@pytest.mark.parametrize("side", SIDES)
def test_rank_and_alpha_patterns_and_rslora(side):
    base = tiny_llama(seed=36)
    samples = random_samples(6, lo=5, hi=20, seed=36)
    kw = dict(rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3.0}, use_rslora=True,
              prune_temporary_fields=False)
    ref = _peft_model("peft", base, samples, **kw)
    got = _peft_model(side, base, samples, **kw)
    for name, rank in (("model.layers.0.mlp.down_proj", 2), ("model.layers.0.self_attn.q_proj", 4)):
        g, p = (m.base_model.model.get_submodule(name) for m in (got, ref))
        assert g.r["default"] == p.r["default"] == rank and g.scaling["default"] == p.scaling["default"]
        assert g.get_base_layer().rank == p.get_base_layer().rank == rank  # the temporary field, pattern applied
        assert rel(lora_delta(got, name), lora_delta(ref, name)) < 1e-3, name
    ids = torch.randint(1, 300, (2, 9))
    with torch.no_grad():
        assert rel_max(got(input_ids=ids).logits, base(input_ids=ids).logits) < 1e-5
