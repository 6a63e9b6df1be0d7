"""The scripts in examples/ run (on a tiny random Llama with a word-level tokenizer; the demo model is their
default) and do what they say."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from helpers import tiny_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SMALL = ["--samples", "6", "--seq-len", "32", "--rank", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tiny_model_dir(tmp_path_factory.mktemp("model"))
    tok = AutoTokenizer.from_pretrained(d)
    tok.eos_token = "[UNK]"  # TRL appends an end-of-sequence token
    tok.save_pretrained(d)
    return str(d)


def _run(args, cwd, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("how", ["patch", "direct"])
@pytest.mark.slow
def test_peft_dropin(model_dir, tmp_path, how):
    pytest.importorskip("attr", reason="PEFT's CorDA imports attrs")
    out = _run([sys.executable, os.path.join(EXAMPLES, "peft_dropin.py"), "--how", how, "--model", model_dir, *SMALL],
               tmp_path)
    drift = float(re.search(r"drift at init ([0-9.e+-]+)", out).group(1))
    assert drift < 1e-5, out  # identity at init


@pytest.mark.slow
def test_trl_sft(model_dir, tmp_path):
    pytest.importorskip("trl")
    out = _run([sys.executable, os.path.join(EXAMPLES, "trl_sft.py"), "--model", model_dir, "--max-steps", "2",
                "--out", str(tmp_path / "o"), *SMALL], tmp_path)
    losses = json.loads(re.search(r"SFT losses: (\[.*\])", out).group(1))
    assert len(losses) == 2
    cfg = json.loads((tmp_path / "o" / "plain_lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and "plain LoRA (rank 8)" in out
    assert (tmp_path / "o" / "trained_adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_trainer_configs(model_dir, tmp_path):
    data = tmp_path / "d.txt"
    from corda_fast import demo

    data.write_text(demo.builtin_text()[:20000])
    out = _run(["bash", os.path.join(EXAMPLES, "trainer_configs.sh"), model_dir, str(data), str(tmp_path / "o")],
               tmp_path)
    assert "llamafactory-cli train" in out and "axolotl train" in out
    lf = yaml.safe_load((tmp_path / "o" / "llamafactory.yaml").read_text())
    ax = yaml.safe_load((tmp_path / "o" / "axolotl.yaml").read_text())
    assert lf["model_name_or_path"] == ax["base_model"] == str(tmp_path / "o" / "residual_base")
    assert lf["lora_rank"] == ax["lora_r"] == 8


@pytest.mark.parametrize("args", [["moe_experts.py"], ["moe_experts.py", "--family", "gpt_oss", "--route-all-experts"],
                                  ["vlm_llava.py"]])
def test_architecture_examples_are_exact_at_init(tmp_path, args):
    out = _run([sys.executable, os.path.join(EXAMPLES, args[0]), *args[1:]], tmp_path)
    drifts = [float(x) for x in re.findall(r"drift(?: at init)? ([0-9.e+-]+)", out)]
    assert drifts and max(drifts) < 1e-5, out
