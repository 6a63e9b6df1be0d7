"""Peak host memory and time vs model size: in-memory, streaming, and disk offload (accelerate device_map).

For random Llamas of three sizes (same block, 8 / 24 / 48 blocks), each mode runs in its own process
(``offload_worker.py``): load, ``init_adapters`` (IPM r=8 on the 7 projections, 4 batches of
4 x 64 tokens) and ``save_residual_base``; ``floor`` is plain offloaded inference of the same batches (load with the
same device map, forward). Disk offload loads with ``max_memory={"cpu": size / 4}``. Peak resident memory is read
above a baseline taken after imports and a warm-up of torch's linear algebra.

    python benchmarks/bench_offload.py                 # ~10 min on 2 CPUs
    python benchmarks/bench_offload.py --layers 2 4 --repeats 1   # smoke
    python benchmarks/bench_offload.py --replan        # the "planned" column of the saved run, by today's planner
    python benchmarks/bench_offload.py --modes corda_disk_onepass corda floor \
        --out benchmarks/results/offload_disk_cpu.json   # a disk-offloaded model in one pass beside streaming
    python benchmarks/bench_offload.py --model ~/.cache/corda_fast/SmolLM2-135M-Instruct \
        --out benchmarks/results/offload_smollm2_cpu.json   # a saved model (the demo's), every mode
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

from offload_worker import BATCH, PLUS_CANDIDATES, SAMPLES, SEQ, TARGETS, make_model  # noqa: E402

from common import environment  # noqa: E402

MODES = ["corda_inmemory", "corda_streaming", "corda", "floor", "plus_inmemory", "plus_streaming", "corda_disk_onepass"]
LABEL = {"corda_inmemory": "in memory (one pass)", "corda_streaming": "in memory, streaming",
         "corda": "disk offload (device_map, host = size/4)", "floor": "floor: offloaded inference only",
         "corda_disk_onepass": "disk offload, one pass (streaming=False)",
         "plus_inmemory": "CorDA++ in memory (one pass)", "plus_streaming": "CorDA++ in memory, streaming"}
PLAN_MODE = {"corda_inmemory": "one_pass", "corda_streaming": "streaming", "corda": "disk_offload",
             "corda_disk_onepass": "disk_offload_one_pass",
             "plus_inmemory": "plus", "plus_streaming": "plus_streaming"}


def predicted(model_dir: str, cpu_bytes: int) -> dict:
    """``plan_memory``'s host peak (MiB) per mode for this model and the workers' calibration, on a host without a
    GPU."""
    import torch

    import corda_fast

    plan = corda_fast.plan_memory(model_dir, samples=SAMPLES, seq_len=SEQ, batch_size=BATCH, target_modules=TARGETS,
                                  candidates=PLUS_CANDIDATES, max_memory={"cpu": cpu_bytes}, device_memory=0,
                                  threads=torch.get_num_threads())
    return {m: plan.modes[p].host_peak_bytes / 2**20 for m, p in PLAN_MODE.items()}


def run(mode: str, d: str, work: str, cpu_bytes: int) -> dict:
    out = subprocess.run([sys.executable, os.path.join(HERE, "offload_worker.py"), mode, d, work, str(cpu_bytes)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"{mode} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[8, 24, 48])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    p.add_argument("--out", default=os.path.join(HERE, "results", "offload_cpu.json"))
    p.add_argument("--model", default=None,
                   help="a saved model folder to run instead of the random Llamas (e.g. SmolLM2's, converted by "
                        "`python -m corda_fast demo`); its rows are named by the folder")
    p.add_argument("--replan", action="store_true",
                   help="run nothing: recompute the saved run's planned peaks with the current planner (the models "
                        "are rebuilt from their seed, their configs are all the planner reads) and rewrite --out")
    args = p.parse_args()
    if args.replan:
        return replan(args.out)
    rows = []
    for layers in ([None] if args.model else args.layers):
        root = tempfile.mkdtemp(prefix="corda_offload_bench_")
        try:
            if args.model:
                model_dir, (layers, size) = args.model, saved_model(args.model)
            else:
                model_dir, size = os.path.join(root, "model"), make_model(os.path.join(root, "model"), layers)
            plan = predicted(model_dir, size // 4)
            runs = {m: [] for m in args.modes}
            for r in range(args.repeats):
                for mode in args.modes:  # interleaved
                    work = os.path.join(root, f"{mode}_{r}")
                    runs[mode].append(run(mode, model_dir, work, size // 4))
                    shutil.rmtree(work, ignore_errors=True)
                    print(f"{layers} blocks ({size / 2**20:.0f} MiB) {mode:16s} peak {runs[mode][-1]['peak']:.0f} MiB "
                          f"{runs[mode][-1]['seconds']:.1f} s", flush=True)
            for mode, rs in runs.items():
                rows.append({"layers": layers, "model_mib": size / 2**20, "mode": mode,
                             "peak_mib": statistics.median(x["peak"] for x in rs),
                             "peak_min": min(x["peak"] for x in rs), "peak_max": max(x["peak"] for x in rs),
                             "seconds": statistics.median(x["seconds"] for x in rs),
                             "seconds_min": min(x["seconds"] for x in rs),
                             "seconds_max": max(x["seconds"] for x in rs), "predicted_mib": plan.get(mode),
                             **({"model": os.path.basename(os.path.normpath(args.model)), "model_dir": args.model}
                                if args.model else {})})
        finally:
            shutil.rmtree(root, ignore_errors=True)
    result = {"benchmark": "offload", "config": vars(args), "environment": environment(), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.out.replace(".json", ".png"))
    print(markdown(result))


def saved_model(d: str) -> tuple[int, int]:
    """``(blocks, bytes of weights)`` of a saved model folder, as loaded in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d)
    return model.config.num_hidden_layers, sum(p.numel() * p.element_size() for p in model.parameters())


def replan(path: str) -> None:
    with open(path) as f:
        result = json.load(f)
    for d in sorted({r["model_dir"] for r in result["rows"] if "model_dir" in r}):
        plan = predicted(d, saved_model(d)[1] // 4)
        for r in result["rows"]:
            if r.get("model_dir") == d:
                r["predicted_mib"] = plan.get(r["mode"])
    for layers in sorted({r["layers"] for r in result["rows"] if "model_dir" not in r}):
        root = tempfile.mkdtemp(prefix="corda_offload_replan_")
        try:
            size = make_model(os.path.join(root, "model"), layers)
            plan = predicted(os.path.join(root, "model"), size // 4)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        for r in result["rows"]:
            if r["layers"] == layers and "model_dir" not in r:
                r["predicted_mib"] = plan.get(r["mode"])
    result["planned_with"] = {k: environment()[k] for k in ("corda_fast_commit", "date")}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, path.replace(".json", ".png"))
    print(markdown(result))


def markdown(result: dict) -> str:
    rows = ["| model | mode | peak host memory above baseline, MiB (min-max) | x model size | seconds (min-max) "
            "| planned, MiB | planned / measured |",
            "|---|---|---|---:|---|---:|---:|"]
    for r in result["rows"]:
        plan = r.get("predicted_mib")
        name = f"{r['model']}, " if "model" in r else ""
        rows.append(f"| {name}{r['layers']} blocks, {r['model_mib']:.0f} MiB | {LABEL[r['mode']]} | "
                    f"{r['peak_mib']:.0f} ({r['peak_min']:.0f}-{r['peak_max']:.0f}) | {r['peak_mib'] / r['model_mib']:.2f} | "
                    f"{r['seconds']:.1f} ({r['seconds_min']:.1f}-{r['seconds_max']:.1f}) | "
                    + (f"{plan:.0f} | {plan / r['peak_mib']:.2f} |" if plan else "- | - |"))
    env, c = result["environment"], result["config"]
    what = "Random Llama blocks (hidden 512, MLP 1024, float32)" if not any("model" in r for r in result["rows"]) \
        else "The saved model (float32)"
    rows.append(f"\n{what}, IPM r=8 on the 7 projections, 16 x 64 calibration tokens, CorDA++ with "
                f"{PLUS_CANDIDATES} candidates; planned: corda_fast.plan_memory's host peak for the mode; load + "
                f"init_adapters + save_residual_base per process; median (min-max) of "
                f"{c['repeats']} runs; {env['cpu_count']} CPUs, torch {env['torch']}, transformers {env['transformers']}, "
                f"commit {env['corda_fast_commit']}, {env['date']}"
                + ("; planned column recomputed at commit {corda_fast_commit}, {date}".format(**result["planned_with"])
                   if "planned_with" in result else ""))
    return "\n".join(rows)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for mode in MODES:
        rs = [r for r in result["rows"] if r["mode"] == mode]
        if not rs:
            continue
        ax.plot([r["model_mib"] for r in rs], [r["peak_mib"] for r in rs], marker="o", label=LABEL[mode])
    sizes = sorted({r["model_mib"] for r in result["rows"]})
    ax.plot(sizes, sizes, color="k", lw=0.8, ls="--", label="= model size")
    ax.set_xlabel("model size, MiB")
    ax.set_ylabel("peak host memory above baseline, MiB")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
