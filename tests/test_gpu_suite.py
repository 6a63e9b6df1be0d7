"""benchmarks/gpu_suite.sh: its dry run (the GPU steps on CPU with tiny shapes) passes, writes every result with its
environment, and the GPU run's step limits fit one 8-minute device call."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")
STEPS = ["env", "kernels", "native", "calibration", "fused", "decompose", "experts", "memory"]


def _branches() -> tuple[str, str]:
    text = open(SUITE, encoding="utf-8").read()
    steps = text[text.index('if [ "$DRY" = 1 ]; then\n    step env'):]
    dry, _, gpu = steps.partition("\nelse\n")
    return dry, gpu.partition("\nfi\n")[0]


def _limits(branch: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"\bstep (\w+) (\d+) ", branch)}


def test_gpu_run_fits_one_short_device_call():
    dry, gpu = _branches()
    limits = _limits(gpu)
    assert list(limits) == STEPS == list(_limits(dry))  # the dry run runs the same steps
    # with each step's 5 s kill grace the worst case stays within 480 s (8 minutes)
    assert sum(limits.values()) + 5 * len(limits) <= 480, limits
    assert "--device cuda" in gpu and "--device cuda" not in dry


@pytest.mark.slow
def test_dry_run_passes_and_writes_every_result(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", SUITE, "--dry-run", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    with open(tmp_path / "steps.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["step"] for r in rows] == STEPS and all(r["rc"] == "0" for r in rows), rows
    assert json.loads((tmp_path / "env.json").read_text())["torch"]
    for name in ("calibration", "fused", "decompose", "memory"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["environment"]["torch"] and result["environment"]["corda_fast_commit"], name
    # the packages the GPU machine lacks were absent during the run
    site = tmp_path / "dry_run_site"
    probe = subprocess.run([sys.executable, "-c", "import datasets"], env={**env, "PYTHONPATH": str(site)},
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr
