"""Device memory of streaming and onloading against the planner's prediction (the GPU suite's memory step).

A random Llama (bf16) is built on the host; one run streams it on the device (the model moved there), one onloads
it (the model stays in host memory, one block at a time on the device). Each reports the peak device memory
``init_adapters`` allocated above what was allocated before it (``torch.cuda.max_memory_allocated``) next to
``plan_memory``'s ``device_peak_bytes`` for that mode. Without a GPU (``--device cpu``, the suite's dry run) the runs
happen on the host and only the plan and the timings are recorded.

    python benchmarks/bench_memory_gpu.py --device cuda --hidden 2048 --layers 8      # ~1 min on one H200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import environment  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(d: str, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 512),
                      vocab_size=32000, torch_dtype="bfloat16")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)


def run(mode: str, d: str, device: str, samples: int, seq: int, batch: int) -> dict:
    from transformers import AutoModelForCausalLM

    import corda_fast

    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    onload = device if mode == "onloading" else None
    if mode == "streaming":
        model.to(device)
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 32000, (batch, seq), generator=g).to(device if onload is None else
                                                                                  "cpu")}
               for _ in range(samples // batch)]
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    corda_fast.init_adapters(model, batches, rank=16, target_modules=TARGETS, streaming=True, onload_device=onload,
                             corda_config=corda_fast.CordaConfig(show_progress=False))
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - before) if cuda else None
    return {"mode": mode, "seconds": seconds, "device_peak_bytes": peak,
            "measured_over": "allocated before init_adapters (the model itself when streaming on the device)"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default=os.path.join(HERE, "results", "memory_gpu.json"))
    args = p.parse_args()
    import corda_fast

    rows = []
    with tempfile.TemporaryDirectory() as d:
        _model(d, args.hidden, args.layers)
        free = torch.cuda.mem_get_info()[0] if torch.device(args.device).type == "cuda" else 2**40
        plan = corda_fast.plan_memory(d, samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                                      rank=16, target_modules=TARGETS, dtype="bfloat16", device_memory=free)
        for mode in ("onloading", "streaming"):
            r = run(mode, d, args.device, args.samples, args.seq_len, args.batch_size)
            planned = plan.modes[mode].device_peak_bytes
            if mode == "streaming":
                planned -= plan.params_bytes  # measured above what was allocated before: the model was there
            r["planned_device_peak_bytes"] = planned
            r["planned_over_measured"] = planned / r["device_peak_bytes"] if r["device_peak_bytes"] else None
            rows.append(r)
            print(json.dumps(r), flush=True)
    result = {"benchmark": "memory_gpu", "config": vars(args), "environment": environment(), "rows": rows,
              "plan": plan.to_dict()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
