"""After training on SmolLM2-135M: conversion of a trained CorDA adapter (r = 16, the 7 projections, 210 layers) to
a plain LoRA for the original model — exact (rank 32), rank 8, energy 0.99 — and the merge into one model (in the
residual base's own single shard, and re-sharded at 128 MiB).

A CorDA-KPM initialisation (16 × 128 calibration tokens) is written with ``save_for_trainers``; "training" moves
every A and B by a random step of their own mean magnitude (what conversion sees is the same as after real training:
two rank-16 products). Each variant runs in its own process, ``--repeats`` times interleaved: wall time of the call,
and peak host memory above the process's own baseline taken after imports (the high-water mark reset through
``/proc/self/clear_refs``), with the conversion's worst per-layer relative error and the output's size.

    python benchmarks/bench_convert.py [--repeats 3]        # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ["exact", "rank8", "energy0.99", "merge", "merge_128MiB"]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(variant: str, work: str, out: str) -> dict:
    """One timed call in this process: ``{"seconds", "peak_mib", ...}``."""
    from corda_fast import convert

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident size
    base = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    if variant.startswith("merge"):
        shard = 128 * 2**20 if variant == "merge_128MiB" else None
        res = convert.merge(os.path.join(work, "corda_out", "residual_base"), os.path.join(work, "trained"), out,
                            max_shard_bytes=shard)
        extra = {"layers": res["layers"], "shards": len(res["shards"])}
    else:
        kw = {"exact": {}, "rank8": {"rank": 8}, "energy0.99": {"energy": 0.99}}[variant]
        rep = convert.convert(os.path.join(work, "corda_out"), os.path.join(work, "trained"), out, **kw)
        ranks = [v["rank"] for v in rep["layers"].values()]
        extra = {"max_relative_error": rep["max_relative_error"], "rank_min": min(ranks), "rank_max": max(ranks),
                 "rank_mean": sum(ranks) / len(ranks)}
    seconds = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    return {"seconds": seconds, "peak_mib": (_rss_kib("VmHWM") - base) / 1024, "output_mib": size / 2**20, **extra}


def prepare(work: str, samples: int, seq_len: int) -> dict:
    """SmolLM2 with CorDA-KPM r=16 written for trainers, then a stand-in for training saved as the trained adapter."""
    import torch

    import corda_fast

    sys.path.insert(0, HERE)
    from common import LLAMA_TARGETS, smollm2, smollm2_batches

    model, tok = smollm2()
    batches, _ = smollm2_batches(tok, samples, seq_len, 8)
    pm = corda_fast.init_adapters(model, batches, mode="kpm", rank=16, target_modules=LLAMA_TARGETS,
                                  corda_config=corda_fast.CordaConfig(show_progress=False))
    corda_fast.save_for_trainers(pm, os.path.join(work, "corda_out"), tok)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * p.abs().mean())
    pm.save_pretrained(os.path.join(work, "trained"))
    return {"layers": sum(1 for n, _ in pm.named_parameters() if "lora_A" in n)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", default=os.path.join(HERE, "results", "convert_smollm2.json"))
    p.add_argument("--worker", nargs=3, metavar=("VARIANT", "WORK", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    from common import environment

    with tempfile.TemporaryDirectory() as work:
        setup = prepare(work, args.samples, args.seq_len)
        runs = {v: [] for v in VARIANTS}
        for r in range(args.repeats):
            for v in VARIANTS:
                out = os.path.join(work, f"{v}_{r}")
                proc = subprocess.run([sys.executable, __file__, "--worker", v, work, out], capture_output=True,
                                      text=True, check=True)
                runs[v].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"repeat {r + 1}/{args.repeats} {v:11s} {runs[v][-1]['seconds']:.2f}s "
                      f"peak +{runs[v][-1]['peak_mib']:.0f} MiB", flush=True)
        residual_mib = sum(os.path.getsize(os.path.join(work, "corda_out", "residual_base", f))
                           for f in os.listdir(os.path.join(work, "corda_out", "residual_base"))
                           if f.endswith(".safetensors")) / 2**20
    result = {"benchmark": "convert", "model": "SmolLM2-135M-Instruct (float32), CorDA-KPM r=16, 7 projections",
              "layers": setup["layers"], "residual_base_mib": residual_mib, "config": vars(args),
              "environment": environment(), "runs": runs}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))


def markdown(r: dict) -> str:
    rows = ["| variant | seconds, median (min–max) | peak host memory above baseline | output | ranks | max relative error |",
            "|---|---|---|---|---|---|"]
    for v, runs in r["runs"].items():
        t = [x["seconds"] for x in runs]
        last = runs[-1]
        ranks = (f"{last['rank_min']}–{last['rank_max']} (mean {last['rank_mean']:.1f})" if "rank_min" in last
                 else f"{last['layers']} layers merged")
        err = f"{last['max_relative_error']:.2e}" if "max_relative_error" in last else "-"
        rows.append(f"| {v} | {statistics.median(t):.2f} ({min(t):.2f}–{max(t):.2f}) | "
                    f"{statistics.median(x['peak_mib'] for x in runs):.0f} MiB | {last['output_mib']:.1f} MiB | {ranks} "
                    f"| {err} |")
    e = r["environment"]
    rows.append(f"\n{r['model']}, {r['layers']} layers, residual base {r['residual_base_mib']:.0f} MiB; each variant "
                f"in its own process, {len(next(iter(r['runs'].values())))} interleaved repeats; {e['cpu_count']} CPUs, "
                f"torch {e['torch']}, peft {e['peft']}, commit {e['corda_fast_commit']}, {e['date']}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
