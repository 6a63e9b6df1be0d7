"""Peak resident memory of one run, for benchmarks/bench_offload.py and tests/test_offload.py.

    python offload_worker.py MODE MODEL_DIR WORK_DIR CPU_BYTES
    (MODE: floor | corda | corda_disk_onepass | corda_inmemory | corda_streaming | plus_inmemory | plus_streaming)

floor: load with device_map="auto" (host limit CPU_BYTES, the rest on disk in WORK_DIR/offload) and run the
calibration batches through the model (plain offloaded inference); corda: the same load, then
init_adapters(streaming=True) and save_residual_base; corda_disk_onepass: the same in one pass (streaming=False: every
statistic held, calibrated through accelerate's hooks); corda_inmemory / corda_streaming: the model loaded whole
into memory, then init_adapters (one pass / streaming) and save_residual_base; plus_*: the same with CorDA++ (2
candidates). Prints one JSON line: peak and
after-load resident memory in MiB above the baseline (after imports and a warm-up of torch's linear algebra, whose
workspaces do not depend on the model; the peak is reset there), and seconds. Linux only (/proc).
"""

import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM

import corda_fast

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PLUS_CANDIDATES = 2
SAMPLES, SEQ, BATCH = 16, 64, 4  # 4 batches of 4 x 64 tokens


def make_model(d: str, layers: int) -> int:
    """Save a random Llama of ``layers`` narrow blocks (hidden 512, MLP 1024, float32; 24 blocks ≈ 229 MB) to
    ``d``; returns its size in bytes. Shared by benchmarks/bench_offload.py and tests/test_offload.py."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=layers, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=4096)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(d)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> float:
    """Reset the peak resident size (Linux: ``clear_refs`` 5) and return the current one, in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak_mib() -> float:
    return _status("VmHWM")


def main():
    what, model_dir, work, cpu_bytes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    a = torch.randn(1024, 1024, dtype=torch.float64)
    a = a @ a.T + torch.eye(1024, dtype=torch.float64)
    torch.linalg.eigh(a), torch.linalg.cholesky(a), torch.linalg.svd(a[:512].float(), full_matrices=False)
    del a
    base = reset_peak()  # the current size: the warm-up's own transient peak is not counted
    t0 = time.perf_counter()
    if what in ("floor", "corda", "corda_disk_onepass"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="auto", max_memory={"cpu": cpu_bytes},
                                                     offload_folder=os.path.join(work, "offload"))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    loaded = peak_mib() - base
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, vocab, (BATCH, SEQ), generator=g)} for _ in range(SAMPLES // BATCH)]
    if what == "floor":
        with torch.no_grad():
            for b in batches:
                model(**b)
    else:
        plus = corda_fast.PlusConfig(candidates=PLUS_CANDIDATES) if what.startswith("plus") else None
        pm = corda_fast.init_adapters(model, batches, rank=8, target_modules=TARGETS,
                                      streaming=what not in ("corda_inmemory", "plus_inmemory", "corda_disk_onepass"),
                                      corda_config=corda_fast.CordaConfig(show_progress=False, plus=plus))
        corda_fast.save_residual_base(pm, os.path.join(work, "residual_base"))
    print(json.dumps({"what": what, "peak": peak_mib() - base, "after_load": loaded,
                      "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
