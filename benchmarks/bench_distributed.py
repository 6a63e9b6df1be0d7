"""Data-parallel calibration: throughput against the number of ranks (CPU processes, gloo, one thread each).

For each world size, ``torchrun --nproc_per_node W`` runs ``init_adapters`` on a random Llama with the calibration
samples sharded over the ranks; rank 0 records calibration time (forward passes + the reduction of the statistics),
decomposition time (spread over the ranks), and the time of one all-reduce of statistics of the same total size.
A single process with all cores' threads is measured alongside. Median of ``--repeats`` runs.

    python benchmarks/bench_distributed.py            # → benchmarks/results/distributed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def model_and_samples(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875), num_hidden_layers=args.layers,
                      num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
                      vocab_size=4096, max_position_embeddings=max(args.seq_len, 256))
    model = LlamaForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, 4096, (args.seq_len,), generator=g) for _ in range(args.samples)]
    return model, samples


def worker(args):
    import torch
    import torch.distributed as dist

    import corda_fast

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("gloo")
    torch.set_num_threads(args.threads)
    model, samples = model_and_samples(args)
    mine = corda_fast.distributed.shard(samples) if distributed else samples
    batches = corda_fast.pad_batches(mine, args.batch_size)
    if distributed:
        dist.barrier()
    t = time.perf_counter()
    _, report = corda_fast.init_adapters(model, batches, rank=args.rank, mode="kpm", return_report=True,
                                         corda_config=corda_fast.CordaConfig(show_progress=False))
    total = time.perf_counter() - t
    out = {"calibrate_s": report.seconds["calibrate"], "decompose_s": report.seconds["decompose"], "total_s": total,
           "samples_here": len(mine), "statistics_mib": report.statistics_mib}
    if distributed:
        # one all-reduce of as many bytes as the statistics (the reduction's communication, alone)
        buf = torch.zeros(int(report.statistics_mib * 2**20 / 4))
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(buf)
        out["allreduce_s"] = time.perf_counter() - t
        dist.destroy_process_group()
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        with open(args.worker_out, "w") as f:
            json.dump(out, f)


def run(world: int, threads: int, args) -> dict:
    out_file = os.path.join(args.tmp, f"w{world}_t{threads}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           os.path.abspath(__file__), "--worker", "--worker-out", out_file, "--threads", str(threads)]
    for k in ("hidden", "layers", "samples", "seq_len", "batch_size", "rank"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ROOT}
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    with open(out_file) as f:
        return json.load(f)


def markdown(result: dict) -> str:
    env = result["environment"]
    a = result["args"]
    lines = ["| ranks × threads | calibration s | samples/s | speed-up | decomposition s | all-reduce of the statistics s |",
             "|---|---:|---:|---:|---:|---:|"]
    base = next(r for r in result["rows"] if r["world"] == 1 and r["threads"] == 1)
    for r in result["rows"]:
        lines.append(f"| {r['world']} × {r['threads']} | {r['calibrate_s']:.2f} ({r['calibrate_min']:.2f}–"
                     f"{r['calibrate_max']:.2f}) | {a['samples'] / r['calibrate_s']:.1f} | "
                     f"{base['calibrate_s'] / r['calibrate_s']:.2f}x | {r['decompose_s']:.2f} | "
                     + (f"{r['allreduce_s']:.3f} |" if "allreduce_s" in r else "- |"))
    lines.append(f"\nrandom Llama hidden {a['hidden']}, {a['layers']} layers, {a['samples']} × {a['seq_len']} tokens "
                 f"(batches of {a['batch_size']}), KPM r={a['rank']}; {env['cpu_count']} CPUs, torch {env['torch']}, "
                 f"gloo, commit {env['corda_fast_commit']}, {env['date']}; median (min–max) of {a['repeats']} runs")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worlds", type=int, nargs="+", default=None, help="world sizes (default: 1 .. number of CPUs)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "distributed_cpu.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="/tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from common import environment

    cores = os.cpu_count() or 1
    worlds = args.worlds or list(range(1, cores + 1))
    configs = [(w, 1) for w in worlds] + ([(1, cores)] if cores > 1 else [])
    runs = {c: [] for c in configs}
    for _ in range(args.repeats):  # interleaved
        for world, threads in configs:
            runs[(world, threads)].append(run(world, threads, args))
            print(world, threads, runs[(world, threads)][-1], flush=True)
    rows = []
    for (world, threads), rs in runs.items():
        cal = [r["calibrate_s"] for r in rs]
        row = {"world": world, "threads": threads, "calibrate_s": statistics.median(cal), "calibrate_min": min(cal),
               "calibrate_max": max(cal), "decompose_s": statistics.median(r["decompose_s"] for r in rs),
               "total_s": statistics.median(r["total_s"] for r in rs)}
        if "allreduce_s" in rs[0]:
            row["allreduce_s"] = statistics.median(r["allreduce_s"] for r in rs)
        rows.append(row)
    result = {"environment": environment(), "args": vars(args), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))


if __name__ == "__main__":
    main()
