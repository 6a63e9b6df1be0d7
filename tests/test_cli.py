"""The command line, on a tiny random Llama with a tiny word-level tokenizer (no downloads)."""

import json
import subprocess
import sys

import pytest
import torch

from corda_fast import cli, demo

from helpers import tiny_llama, tiny_model_dir


@pytest.fixture
def model_dir(tmp_path):
    return tiny_model_dir(tmp_path / "model")


def test_init_on_text_file(model_dir, tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text(" ".join(demo.builtin_text().split()[:3000]))
    out = tmp_path / "out"
    assert cli.main(["init", "--model", str(model_dir), "--data", str(data), "--mode", "kpm", "--rank", "4",
                     "--samples", "6", "--seq-len", "32", "--batch-size", "4", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "corda_report.json").read_text())
    assert report["n_layers"] == 14 and report["calibration"]["samples"] == 6
    assert report["drift_at_init"]["relative"] < 1e-5
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(out / "residual_base")
    loaded = PeftModel.from_pretrained(base, out / "adapter")
    ids = torch.randint(2, 300, (1, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, tiny_llama()(ids).logits, atol=1e-5, rtol=0)


def test_init_on_jsonl_with_cache(model_dir, tmp_path):
    words = demo.builtin_text().split()
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"body": " ".join(words[i * 40:(i + 1) * 40 - i])}) for i in range(10)))
    cache = tmp_path / "cov.safetensors"
    args = ["init", "--model", str(model_dir), "--data", str(data), "--text-field", "body", "--rank", "2",
            "--samples", "8", "--seq-len", "24", "--covariance-cache", str(cache), "--quiet"]
    assert cli.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert cache.is_file()
    assert cli.main(args + ["--out", str(tmp_path / "b"), "--mode", "kpm"]) == 0
    stream = [a for a in args if a not in ("--covariance-cache", str(cache))]
    assert cli.main(stream + ["--out", str(tmp_path / "s"), "--streaming", "on"]) == 0
    a = json.loads((tmp_path / "a" / "corda_report.json").read_text())
    s = json.loads((tmp_path / "s" / "corda_report.json").read_text())
    assert s["statistics_mib"] == pytest.approx(a["statistics_mib"] / 2, rel=0.02)  # 2 blocks: one block's worth at a time
    assert cli.main(stream + ["--out", str(tmp_path / "f"), "--precision", "float64"]) == 0
    with pytest.raises(ValueError, match="no field 'text'"):
        cli.main(["init", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "c"), "--quiet"])


def test_env_command_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "corda_fast", "env"], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["kernels_cpu"] == {"xtx_accumulate": "torch", "lowrank_gemm": "torch", "damped_cholesky": "torch",
                                   "batched_decompose": "torch"}
    assert info["torch"] == torch.__version__ and info["corda_fast"] == __import__("corda_fast").__version__


def test_init_corda_plus_writes_table_and_plot(model_dir, tmp_path, capsys):
    data = tmp_path / "calib.txt"
    data.write_text(" ".join(demo.builtin_text().split()[:3000]))
    out = tmp_path / "plus"
    assert cli.main(["init", "--model", str(model_dir), "--data", str(data), "--mode", "kpm", "--rank", "4",
                     "--samples", "8", "--seq-len", "32", "--batch-size", "2", "--method", "corda++",
                     "--candidates", "2", "--min-rank", "2", "--max-rank", "20", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "CorDA++-KPM" in printed and "realised" in printed
    report = json.loads((out / "corda_report.json").read_text())
    ranks = [l["rank"] for l in report["plus"]["layers"]]
    assert all(2 <= r <= 20 for r in ranks) and len(set(ranks)) > 1
    assert report["plus"]["realised"] <= report["plus"]["budget"]
    assert (out / "corda_plus.md").read_text().count("| model.layers.") == 14
    assert (out / "corda_plus.png").stat().st_size > 1000
    assert report["drift_at_init"]["relative"] < 1e-5
