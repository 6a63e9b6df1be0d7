"""After training: convert (exact / rank / energy) the trained CorDA adapter to a plain LoRA for the original model,
and merge it into one plain model — each checked against a direct float64 computation or the PEFT model itself."""

import json
import os
import shutil

import pytest
import torch

import corda_fast
from corda_fast import cli, convert

from helpers import padded_batches, random_samples, rel, rel_max, tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _train(pm, seed):
    """Stand-in for training: every A and B moved by a random step."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * p.abs().mean())


def _run(tmp_path, make=tiny_llama, targets=TARGETS, rank=4, seed=0):
    """``(original folder, init's output folder, trained PEFT model, trained adapter folder)``."""
    from transformers import AutoModelForCausalLM

    original = tmp_path / "original"
    make(seed=seed).save_pretrained(original)
    model = AutoModelForCausalLM.from_pretrained(original)
    batches = padded_batches(random_samples(6, lo=5, hi=20, seed=seed), 3)
    pm = corda_fast.init_adapters(model, batches, mode="kpm", rank=rank, lora_alpha=2 * rank, target_modules=targets,
                                  corda_config=corda_fast.CordaConfig(show_progress=False))
    corda_fast.save_for_trainers(pm, str(tmp_path / "corda_out"))
    _train(pm, seed + 1)
    trained = tmp_path / "trained"
    pm.save_pretrained(trained)
    return original, tmp_path / "corda_out", pm, trained


def _dense_update(pm, initial_dir, name):
    """``s·B·A − s₀·B₀·A₀`` in float64, densely, from the live trained model and the initial adapter's file."""
    from safetensors.torch import load_file

    layer = pm.base_model.model.get_submodule(name)
    s = layer.scaling["default"]
    now = s * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
    t0 = load_file(os.path.join(initial_dir, "adapter_model.safetensors"))
    a0 = t0[f"base_model.model.{name}.lora_A.weight"].double()
    b0 = t0[f"base_model.model.{name}.lora_B.weight"].double()
    return now - s * b0 @ a0


def _names(pm):
    return [n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


def test_exact_on_the_original_reproduces_the_trained_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    original, out, pm, trained = _run(tmp_path)
    report = convert.convert(str(out), str(trained), str(tmp_path / "lora"))  # corda_out/ as the initial adapter
    assert report["mode"] == "exact" and report["r"] == 8 and report["max_relative_error"] < 1e-6
    assert report["base_model_name_or_path"] == str(original)  # the original model, from the residual's config
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(original), str(tmp_path / "lora"))
    ids = torch.randint(1, 300, (2, 11))
    with torch.no_grad():
        assert rel_max(plain(input_ids=ids).logits, pm(input_ids=ids).logits) < 1e-5


@pytest.mark.parametrize("k", [1, 3, 8])
def test_rank_k_error_is_the_optimal_rank_k_error(tmp_path, k):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    original, out, pm, trained = _run(tmp_path)
    report = convert.convert(str(out / "initial_adapter"), str(trained), str(tmp_path / "lora"), rank=k)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(original), str(tmp_path / "lora"))
    for name in _names(pm):
        delta = _dense_update(pm, out / "initial_adapter", name)
        sv = torch.linalg.svdvals(delta)
        optimal = float(sv[k:].square().sum().sqrt() / sv.square().sum().sqrt())
        row = report["layers"][name]
        assert row["rank"] == min(k, 8)
        # 1e-6 relative; plus the float32 rounding of the stored factors (~1e-7 of ‖ΔW‖), all there is at k = 2r
        assert abs(row["relative_error"] - optimal) <= 1e-6 * optimal + 1e-7, (name, row, optimal)
        got = plain.base_model.model.get_submodule(name)
        update = got.scaling["default"] * got.lora_B["default"].weight.double() @ got.lora_A["default"].weight.double()
        assert abs(rel(update, delta) - optimal) <= 1e-5 * optimal + 1e-6, name  # what PEFT loads is that


def test_energy_picks_the_smallest_rank_per_layer(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    original, out, pm, trained = _run(tmp_path)
    report = convert.convert(str(out), str(trained), str(tmp_path / "lora"), energy=0.9)
    ranks = {}
    for name in _names(pm):
        sv = torch.linalg.svdvals(_dense_update(pm, out / "initial_adapter", name))
        share = sv.square().cumsum(0) / sv.square().sum()
        ranks[name] = int((share < 0.9).sum()) + 1  # the smallest k with share[k-1] >= 0.9
        assert report["layers"][name]["rank"] == ranks[name], name
        assert report["layers"][name]["relative_error"] <= (0.1 ** 0.5) * (1 + 1e-6)
    assert len(set(ranks.values())) > 1  # ranks differ: written as patterns, and PEFT honours them
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["rank_pattern"] == cfg["alpha_pattern"]
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(original), str(tmp_path / "lora"))
    for name, k in ranks.items():
        layer = plain.base_model.model.get_submodule(name)
        assert layer.r["default"] == k and layer.scaling["default"] == 1.0, name


def test_trainer_output_folders(tmp_path):
    """A trainer's output folder: its final adapter, else its latest checkpoint-N, or the one named."""
    _, out, pm, trained = _run(tmp_path)
    run = tmp_path / "trainer_out"
    shutil.copytree(trained, run / "checkpoint-20")
    _train(pm, 99)
    pm.save_pretrained(run / "checkpoint-100")  # the latest, with other weights
    os.makedirs(run / "checkpoint-300")  # no adapter in it: not a checkpoint to use
    assert convert.find_adapter(str(run), "trained") == str(run / "checkpoint-100")
    assert convert.find_adapter(str(run), "trained", checkpoint=20) == str(run / "checkpoint-20")
    latest = convert.convert(str(out), str(run), str(tmp_path / "a"), rank=2)
    named = convert.convert(str(out), str(run), str(tmp_path / "b"), rank=2, checkpoint=20)
    direct = convert.convert(str(out), str(trained), str(tmp_path / "c"), rank=2)
    assert named["layers"] == direct["layers"] != latest["layers"]
    shutil.copytree(trained, run, dirs_exist_ok=True)  # a final adapter at the top wins
    assert convert.find_adapter(str(run), "trained") == str(run)
    with pytest.raises(convert.ConvertError, match="holds no adapter"):
        convert.find_adapter(str(tmp_path / "original"), "trained")
    with pytest.raises(convert.ConvertError, match="checkpoint-7' holds no adapter"):
        convert.find_adapter(str(run), "trained", checkpoint=7)
    with pytest.raises(convert.ConvertError, match="rank or energy, not both"):
        convert.convert(str(out), str(trained), str(tmp_path / "d"), rank=2, energy=0.5)


def test_merge_is_the_peft_model_sharded_and_loads_with_from_pretrained(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    _, out, pm, trained = _run(tmp_path)
    resharded = tmp_path / "residual_sharded"  # the residual base in several shards
    AutoModelForCausalLM.from_pretrained(out / "residual_base").save_pretrained(resharded, max_shard_size="300KB")
    shards = sorted(p.name for p in resharded.glob("*.safetensors"))
    assert len(shards) > 2
    assert cli.main(["merge", "--residual-base", str(resharded), "--adapter", str(trained), "--out",
                     str(tmp_path / "merged"), "--quiet"]) == 0
    assert f"into {len(shards)} shard(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == shards
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.randint(1, 300, (2, 11))
    with torch.no_grad():
        assert rel_max(merged(input_ids=ids).logits, pm(input_ids=ids).logits) < 1e-5
        gen = merged.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
        assert torch.equal(gen, pm.generate(input_ids=ids[:1, :4], max_new_tokens=5, do_sample=False))
    # new shards of a bounded size from the single-shard residual base, with their own index
    assert cli.main(["merge", "--residual-base", str(out / "residual_base"), "--adapter", str(trained), "--out",
                     str(tmp_path / "resharded"), "--max-shard-size", "0.2MB", "--quiet"]) == 0
    index = json.loads((tmp_path / "resharded" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "resharded").glob("*.safetensors"))
    assert len(files) > 3 and sorted(set(index["weight_map"].values())) == files
    assert all((tmp_path / "resharded" / f).stat().st_size <= 200_000 + 300 * 128 * 4 + 10_000 for f in files)
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "resharded")(input_ids=ids).logits
        assert rel_max(again, pm(input_ids=ids).logits) < 1e-5
    # --from: init's output folder (its initial adapter by default: the model at init, i.e. the original one)
    assert cli.main(["merge", "--from", str(out), "--out", str(tmp_path / "merged0"), "--quiet"]) == 0
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "original")
    with torch.no_grad():
        at_init = AutoModelForCausalLM.from_pretrained(tmp_path / "merged0")(input_ids=ids).logits
        assert rel_max(at_init, original(input_ids=ids).logits) < 1e-5


def test_conv1d_model_exact_and_merge(tmp_path):
    """GPT-2's Conv1D layers (weights stored transposed): both paths transpose the update."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    original, out, pm, trained = _run(tmp_path, make=tiny_gpt2, targets=["c_attn", "c_fc"])
    convert.convert(str(out), str(trained), str(tmp_path / "lora"))
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(original), str(tmp_path / "lora"))
    convert.merge(str(out / "residual_base"), str(trained), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.randint(1, 300, (2, 9))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        assert rel_max(plain(input_ids=ids).logits, ref) < 1e-5
        assert rel_max(merged(input_ids=ids).logits, ref) < 1e-5


def test_convert_command_prints_the_table_and_writes_the_report(tmp_path, capsys):
    _, out, _, trained = _run(tmp_path)
    assert cli.main(["convert", "--initial-adapter", str(out), "--trained", str(trained), "--out",
                     str(tmp_path / "lora"), "--rank", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "lora" / "convert_report.json").read_text())
    assert report["mode"] == "rank 2" and "max relative error" in printed
    assert all(f"{n}" in printed for n in report["layers"])
    assert cli.main(["convert", "--initial-adapter", str(tmp_path / "nowhere"), "--trained", str(trained), "--out",
                     str(tmp_path / "x"), "--quiet"]) == 1
    assert "nowhere' does not exist" in capsys.readouterr().err
