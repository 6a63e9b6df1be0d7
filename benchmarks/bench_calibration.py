"""Calibration cost: our statistic collection vs a plain forward and vs PEFT's hook, with statistic memory.

Variants, interleaved over ``--repeats`` in one process on the same samples:
  - ``forward``        plain forward of the backbone, batched (what calibration rides on)
  - ``ours``           ``collect_covariance`` (batched, padded), all blocks at once
  - ``ours_streaming`` block-by-block statistics (each block's statistics freed after it)
  - ``ours_f64``       (not in the default set) ``precision="float64"``
  - ``forward_bs1``    plain forward of the full model at batch size 1 (what PEFT rides on)
  - ``peft``           PEFT's ``calib_cov_distribution`` hook at batch size 1 (its requirement)
Reports median (min-max) seconds, overhead vs the plain forward, speed-up vs PEFT, and statistic memory: the
bytes of the statistics held at once (exact, from the tensors), plus CUDA peak allocated memory on GPU.

    python benchmarks/bench_calibration.py                                   # SmolLM2-135M, 32 x 256, CPU
    python benchmarks/bench_calibration.py --model random --hidden 4096 --layers 2 --device cuda   # GPU shapes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402

import corda_fast  # noqa: E402

from common import environment  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.model == "smollm2":
        from corda_fast.demo import builtin_text, load_model, make_batches, materialize_smollm2

        model, tok = load_model(materialize_smollm2(), dtype=args.dtype)
        batches, _ = make_batches(tok, [builtin_text()], False, args.samples, args.seq_len, args.batch_size)
        name = "SmolLM2-135M-Instruct"
    else:
        torch.manual_seed(0)
        h = args.hidden
        cfg = LlamaConfig(hidden_size=h, intermediate_size=int(h * 2.6875), num_hidden_layers=args.layers,
                          num_attention_heads=max(1, h // 128), num_key_value_heads=max(1, h // 128),
                          vocab_size=32000, max_position_embeddings=max(4096, args.seq_len))
        model = LlamaForCausalLM(cfg).to(dtype)
        g = torch.Generator().manual_seed(233)
        seqs = [torch.randint(0, 32000, (args.seq_len,), generator=g) for _ in range(args.samples)]
        batches = corda_fast.pad_batches(seqs, args.batch_size)
        name = f"random Llama h={h} L={args.layers} ({args.dtype})"
    model = model.to(args.device).eval()
    return model, batches, name


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["smollm2", "random"], default="smollm2")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=["forward", "ours", "ours_streaming", "forward_bs1", "peft"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model, batches, name = build(args)
    dev = args.device
    cfg = corda_fast.CordaConfig(show_progress=False)
    targets = corda_fast.stages.resolve_targets(model, corda_fast.LoraSpec(target_modules=TARGETS), check_rank=False)
    samples = [b["input_ids"][j][b["attention_mask"][j].bool()] for b in batches for j in range(len(b["input_ids"]))]
    body = getattr(model, model.base_model_prefix)

    def v_forward():
        for b in batches:
            body(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev), use_cache=False)
        return 0

    def v_forward_bs1():
        for s in samples:
            model(s.unsqueeze(0).to(dev))
        return 0

    def v_ours():
        return corda_fast.stages.collect_covariance(model, batches, cfg, targets).nbytes()

    def v_ours_f64():
        return corda_fast.stages.collect_covariance(model, batches, cfg.replace(precision="float64"),
                                             targets).nbytes()

    def v_ours_streaming():
        from corda_fast.streaming import iter_block_statistics

        peak = 0
        for st in iter_block_statistics(model, batches, cfg, targets):
            peak = max(peak, st.nbytes())
            st.sums.clear()
        return peak

    def v_peft():
        from peft import LoraConfig
        from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
        from peft.tuners.lora.corda import calib_cov_distribution, target_modules

        lc = LoraConfig(r=8, target_modules=TARGETS, init_lora_weights="corda",
                        corda_config=PeftCordaConfig(corda_method="kpm"))
        calib_cov_distribution(model, lc, v_forward_bs1, None, None)
        nbytes = 0
        for _, m in target_modules(model, lc):
            nbytes += m.covariance_matrix.numel() * m.covariance_matrix.element_size()
            del m.covariance_matrix, m.sample_count
        return nbytes

    fns = {"forward": v_forward, "ours": v_ours, "ours_f64": v_ours_f64, "ours_streaming": v_ours_streaming,
           "forward_bs1": v_forward_bs1, "peft": v_peft}
    times = {v: [] for v in args.variants}
    stat_bytes, cuda_peak = {}, {}
    with torch.no_grad():
        for v in args.variants:  # warm-up
            fns[v]()
        for r in range(args.repeats):
            for v in args.variants:
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if dev == "cuda" else 0
                sync(dev)
                t = time.perf_counter()
                stat_bytes[v] = fns[v]()
                sync(dev)
                times[v].append(time.perf_counter() - t)
                if dev == "cuda":
                    cuda_peak[v] = (torch.cuda.max_memory_allocated() - base) / 2**20
                print(f"repeat {r + 1}/{args.repeats} {v:15s} {times[v][-1]:.2f}s", flush=True)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    result = {"benchmark": "calibration", "model": name, "config": vars(args), "environment": environment(),
              "tokens": int(sum(len(s) for s in samples)), "seconds": times, "median": med,
              "statistic_mib": {v: b / 2**20 for v, b in stat_bytes.items()}, "cuda_peak_mib": cuda_peak}
    result["environment"]["device"] = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    out = args.out or os.path.join(HERE, "results", f"calibration_{dev}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))


def markdown(r: dict) -> str:
    med, ts = r["median"], r["seconds"]
    rows = ["| variant | seconds, median (min-max) | vs batched forward | vs PEFT hook | statistics held |",
            "|---|---|---|---|---|"]
    for v in med:
        over = f"{med[v] / med['forward']:.2f}x" if "forward" in med else "-"
        vs = f"{med['peft'] / med[v]:.2f}x faster" if "peft" in med and v.startswith("ours") else "-"
        mem = f"{r['statistic_mib'][v]:.0f} MiB" if r["statistic_mib"].get(v) else "-"
        if r["cuda_peak_mib"].get(v) is not None:
            mem += f" (CUDA peak +{r['cuda_peak_mib'][v]:.0f} MiB)"
        rows.append(f"| {v} | {med[v]:.2f} ({min(ts[v]):.2f}-{max(ts[v]):.2f}) | {over} | {vs} | {mem} |")
    e, c = r["environment"], r["config"]
    rows.append(f"\n{r['model']}, {c['samples']} x {c['seq_len']} tokens ({r['tokens']} real), batch {c['batch_size']} "
                f"(PEFT and forward_bs1: 1), 7 projections; {c['repeats']} interleaved repeats; {e['device']}, "
                f"{e['cpu_count']} CPUs, torch {e['torch']}, peft {e['peft']}, commit {e['corda_fast_commit']}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
