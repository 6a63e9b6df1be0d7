"""The fair comparison harness (benchmarks/compare_methods.py) as a smoke case: two methods, two learning rates,
one seed, two steps on SmolLM2; the summary picks each method's best learning rate from its own runs."""

import json
import os
import subprocess
import sys

import pytest

from helpers import smollm2_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.real_model, pytest.mark.slow,
              pytest.mark.skipif(smollm2_dir() is None, reason="SmolLM2-135M not installed")]


def test_quick_comparison_runs_and_picks_each_methods_best_lr(tmp_path):
    out = tmp_path / "compare.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compare_methods.py"), "--quick", "--out",
                           str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r["summary"]) == {"lora", "corda-kpm"}
    for method, v in r["summary"].items():
        medians = {lr: x["task_nll"]["median"] for lr, x in v["by_lr"].items()}
        assert set(medians) == {"0.0001", "0.001"}
        assert v["task_nll"]["median"] == min(medians.values()) and str(v["best_lr"]) in medians
        assert 0 < v["knowledge_ratio"]["median"] < 10
    assert (tmp_path / "compare.png").stat().st_size > 1000
    assert "| lora |" in proc.stdout and "best lr" in proc.stdout
