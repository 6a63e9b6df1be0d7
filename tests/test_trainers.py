"""Artifacts for trainers (residual base + initial adapter + LLaMA-Factory / axolotl / TRL configs) and TRL training
of the CorDA model, on a tiny random Llama with a word-level tokenizer (no downloads)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

import corda_fast
from corda_fast import demo

from helpers import tiny_model_dir

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _texts(n=24, words=40):
    w = demo.builtin_text().split()
    return [" ".join(w[i * words:(i + 1) * words]) for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model dir, tokenizer, CorDA model, the original model's logits on ``ids``, ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_model_dir(tmp_path_factory.mktemp("model"))
    tok = AutoTokenizer.from_pretrained(d)
    tok.eos_token = "[UNK]"  # TRL appends an end-of-sequence token; the tiny word-level tokenizer has none
    model = AutoModelForCausalLM.from_pretrained(d)
    ids = torch.randint(2, 300, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    batches = corda_fast.calibration_batches(_texts(), tok, max_seq_length=32, batch_size=4, num_samples=24)
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"up_proj": 6}, task_type="CAUSAL_LM")
    pm = corda_fast.init_adapters(model, batches, lora_config=lora,
                                  corda_config=corda_fast.CordaConfig(mode="ipm", show_progress=False))
    return d, tok, pm, ref, ids


def test_artifacts_reload_with_plain_transformers_and_peft(setup, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, tok, pm, ref, ids = setup
    art = corda_fast.save_for_trainers(pm, str(tmp_path / "out"), tok)
    assert pm.peft_config["default"].base_model_name_or_path != art.residual_base  # the live config is unchanged
    cfg = json.loads(open(os.path.join(art.initial_adapter, "adapter_config.json")).read())
    assert cfg["init_lora_weights"] is True and cfg["base_model_name_or_path"] == art.residual_base
    assert os.path.isabs(art.residual_base) and os.path.isfile(os.path.join(art.residual_base, "tokenizer.json"))
    # the adapter finds its base by itself
    auto = AutoPeftModelForCausalLM.from_pretrained(art.initial_adapter)
    explicit = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(art.residual_base), art.initial_adapter)
    assert AutoTokenizer.from_pretrained(art.residual_base)("def x").input_ids == tok("def x").input_ids
    with torch.no_grad():
        ours = pm(ids).logits
        for loaded in (auto, explicit):
            got = loaded(ids).logits
            assert float((got - ours).abs().max()) <= 1e-6 * float(ours.abs().max())
            assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())  # identity at init


@pytest.mark.slow
def test_trainer_configs_name_existing_paths_and_the_adapters_settings(setup, tmp_path):
    _, tok, pm, _, _ = setup
    art = corda_fast.save_for_trainers(pm, str(tmp_path / "out"), tok)
    saved = json.loads(open(os.path.join(art.initial_adapter, "adapter_config.json")).read())
    kinds = sorted({t.split(".")[-1] for t in saved["target_modules"]})
    assert kinds == sorted(TARGETS)

    lf = yaml.safe_load(open(art.llamafactory))
    assert os.path.isdir(lf["model_name_or_path"]) and os.path.isdir(lf["adapter_name_or_path"])
    assert os.path.isfile(os.path.join(lf["adapter_name_or_path"], "adapter_model.safetensors"))
    assert (lf["finetuning_type"], lf["create_new_adapter"], lf["stage"]) == ("lora", False, "sft")
    assert (lf["lora_rank"], lf["lora_alpha"]) == (saved["r"], saved["lora_alpha"]) == (4, 8)
    assert sorted(lf["lora_target"].split(",")) == kinds

    ax = yaml.safe_load(open(art.axolotl))
    assert os.path.isdir(ax["base_model"]) and os.path.isdir(ax["lora_model_dir"])
    assert ax["adapter"] == "lora" and "peft_init_lora_weights" not in ax
    assert (ax["lora_r"], ax["lora_alpha"]) == (saved["r"], saved["lora_alpha"])
    assert sorted(ax["lora_target_modules"]) == kinds
    # only keys axolotl's schema reads; the per-layer ranks live in the adapter's own config, and the yaml says so
    assert not {"lora_rank_pattern", "lora_alpha_pattern"} & set(ax) and saved["rank_pattern"] == {"up_proj": 6}
    text = open(art.axolotl).read()
    assert "set by initial_adapter/adapter_config.json" in text
    assert "# fp16: false" in text and "# lora_mlp_kernel: false" in text  # what to turn off on CPU, commented
    # the adapter config: unset (None) fields left out, so an older PEFT (LLaMA-Factory pins <= 0.18.1) reads it
    # without unknown keys; these five are the ones PEFT 0.18.1's LoraConfig does not have
    assert not {"kasa_config", "lora_ga_config", "monteclora_config", "use_bdlora", "velora_config"} & set(saved)
    assert all(v is not None for k, v in saved.items() if k not in ("task_type", "base_model_name_or_path"))

    assert any("llamafactory-cli train" in line for line in art.usage())
    compile(open(art.trl_script).read(), art.trl_script, "exec")


def test_save_for_trainers_refuses_and_rolls_back(setup, tmp_path, monkeypatch):
    _, tok, pm, _, _ = setup
    out = tmp_path / "out"
    corda_fast.save_for_trainers(pm, str(out), tok)
    before = sorted(p.name for p in out.iterdir())
    stamp = os.path.getmtime(out / "residual_base" / "config.json")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        corda_fast.save_for_trainers(pm, str(out), tok)
    with pytest.raises(ValueError, match="no adapter 'other'"):
        corda_fast.save_for_trainers(pm, str(tmp_path / "x"), tok, adapter_name="other")
    assert not (tmp_path / "x").exists()

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(corda_fast.export, "trl_script", boom)  # fails after the base and adapter are written
    with pytest.raises(OSError, match="disk full"):
        corda_fast.save_for_trainers(pm, str(out), tok, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before  # the earlier artifacts are untouched, no leftovers
    assert os.path.getmtime(out / "residual_base" / "config.json") == stamp


def _adapter(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.slow
def test_trl_sft_trainer_trains_the_corda_model(setup, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    _, tok, pm, _, _ = setup
    import copy

    model = copy.deepcopy(pm)
    lora0 = _adapter(model)
    base0 = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=2, max_length=32,
                         learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": _texts()}),
                             processing_class=tok)  # no peft_config: the model already is the PEFT model
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(after[n].detach(), v) for n, v in lora0.items())  # every A and B moved
    assert all(torch.equal(after[n].detach(), v) for n, v in base0.items())  # the residual base stays frozen


@pytest.mark.slow
def test_generated_trl_script_runs(setup, tmp_path):
    pytest.importorskip("trl")
    from safetensors.torch import load_file

    _, tok, pm, _, _ = setup
    art = corda_fast.save_for_trainers(pm, str(tmp_path / "out"), tok)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, art.trl_script, "--data", str(data), "--max-steps", "2", "--max-length", "32",
                          "--gradient-accumulation-steps", "1", "--logging-steps", "1", "--output-dir",
                          str(tmp_path / "sft")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    logged = [json.loads(line.replace("'", '"')) for line in (run.stdout + run.stderr).splitlines()
              if line.startswith("{'loss'")]
    assert len(logged) == 2, run.stdout[-2000:]  # --logging-steps 1 over 2 steps: two loss lines
    trained = load_file(tmp_path / "sft" / "adapter_model.safetensors")
    initial = load_file(os.path.join(art.initial_adapter, "adapter_model.safetensors"))
    assert trained.keys() == initial.keys()
    # the TRL run's output folder converts as it is (its final adapter) to a plain LoRA for the original model
    from corda_fast import convert

    report = convert.convert(art.initial_adapter, str(tmp_path / "sft"), str(tmp_path / "lora"))
    assert report["trained"] == str(tmp_path / "sft") and report["r"] == 2 * art.r
    # after 2 steps ΔW is small next to s·B·A and s₀·B₀·A₀: the float32 rounding of the stored factors is larger
    # relative to it than after real training
    assert len(report["layers"]) == len(trained) // 2 and report["max_relative_error"] < 1e-3
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)
