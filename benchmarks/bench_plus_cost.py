"""What CorDA++ costs over CorDA on the demo: end-to-end time and peak memory, side by side in one run.

Each configuration runs ``python -m corda_fast demo`` (SmolLM2-135M, 64 × 256 tokens of offline text, KPM, rank 16)
in its own process, interleaved over ``--repeats`` rounds: CorDA, CorDA++ with the defaults, CorDA++ with 4
candidates. Recorded per run: the command's wall time (model load to saved artifacts, imports excluded), its
stages (``calibrate``, ``select_allocate``, ``decompose``, ``build``, ``save``) and the process's peak resident
memory; the table gives the median (min–max) and the ratio of medians to CorDA.

    python benchmarks/bench_plus_cost.py                 # ~10 min on 2 cores
    python benchmarks/bench_plus_cost.py --samples 32 --seq-len 64   # the small calibration (~5 min)
    python benchmarks/bench_plus_cost.py --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import environment, spread  # noqa: E402

CONFIGS = {  # name: extra demo arguments
    "corda": [],
    "corda++ (defaults)": ["--method", "corda++"],
    "corda++ (4 candidates)": ["--method", "corda++", "--candidates", "4"],
}


def worker(out: str, extra: list[str]) -> None:
    """One demo run in this process; writes its wall time, stages and peak RSS to ``out``/cost.json."""
    from corda_fast import cli

    t = time.perf_counter()
    rc = cli.main(["demo", "--out", os.path.join(out, "demo"), "--quiet", *extra])
    wall = time.perf_counter() - t
    with open(os.path.join(out, "demo", "corda_report.json")) as f:
        report = json.load(f)
    with open(os.path.join(out, "cost.json"), "w") as f:
        json.dump({"rc": rc, "wall": wall, "seconds": report["seconds"],
                   "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--samples", type=int, default=None, help="calibration samples (default: the demo's, 64)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the demo's, 256)")
    p.add_argument("--worker", nargs=2, metavar=("OUT", "CONFIG"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    size = [*(["--samples", str(args.samples)] if args.samples else []),
            *(["--seq-len", str(args.seq_len)] if args.seq_len else [])]
    if args.worker:
        worker(args.worker[0], CONFIGS[args.worker[1]] + size)
        return
    name = "plus_cost_cpu.json" if not size else f"plus_cost_{args.samples or 64}x{args.seq_len or 256}_cpu.json"
    args.out = args.out or os.path.join(HERE, "results", name)
    runs = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name in CONFIGS:
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run([sys.executable, __file__, "--worker", tmp, name, *size], check=True)
                with open(os.path.join(tmp, "cost.json")) as f:
                    runs[name].append(json.load(f))
            print(name, runs[name][-1], flush=True)
    summary = {}
    for name, rs in runs.items():
        stages = sorted({k for r in rs for k in r["seconds"]})
        summary[name] = {"wall": spread([r["wall"] for r in rs]),
                         "peak_rss_mib": spread([r["peak_rss_mib"] for r in rs]),
                         "stages": {k: statistics.median(r["seconds"].get(k, 0.0) for r in rs) for k in stages}}
    result = {"environment": environment(), "repeats": args.repeats, "runs": runs, "summary": summary,
              "calibration": {"samples": args.samples or 64, "seq_len": args.seq_len or 256}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))


def markdown(result: dict) -> str:
    s = result["summary"]
    base = s["corda"]
    cal = result.get("calibration", {"samples": 64, "seq_len": 256})
    rows = [f"| demo (SmolLM2-135M, KPM r=16, {cal['samples']} x {cal['seq_len']} tokens) | end to end s | vs CorDA "
            "| calibrate | select + allocate | decompose | peak RSS MiB | vs CorDA |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in s.items():
        w, m, st = r["wall"], r["peak_rss_mib"], r["stages"]
        rows.append(f"| {name} | {w['median']:.1f} ({w['min']:.1f}–{w['max']:.1f}) | "
                    f"{w['median'] / base['wall']['median']:.2f}x | {st.get('calibrate', 0):.1f} | "
                    f"{st.get('select_allocate', 0):.1f} | {st.get('decompose', 0):.1f} | {m['median']:.0f} | "
                    f"{m['median'] / base['peak_rss_mib']['median']:.2f}x |")
    env = result["environment"]
    rows.append(f"\nmedian (min–max) over {result['repeats']} interleaved rounds, each run in its own process "
                f"(`python -m corda_fast demo`, imports excluded); stages are medians; {env['cpu_count']} CPUs, torch "
                f"{env['torch']}, commit {env['corda_fast_commit']}, {env['date']}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
