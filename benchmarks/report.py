"""Regenerate the result tables of README.md and docs/*.md (and PNG plots) from ``benchmarks/results/*.json``.

Each table sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``; NAME picks the result file and the
benchmark script whose ``markdown()`` renders it (below). Tables whose result file is missing are left as they are.
``--check`` exits non-zero if a page is out of date (nothing is written).

    python benchmarks/report.py            # rewrite the pages in place, write benchmarks/results/*.png
    python benchmarks/report.py --check    # pages up to date? (no plots, nothing written)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TABLES = {  # name: (result file, module with markdown())
    "vs_peft": ("vs_peft_cpu.json", "bench_vs_peft"),
    "calibration": ("calibration_cpu.json", "bench_calibration"),
    "decompose": ("decompose_cpu.json", "bench_decompose"),
    "quality": ("quality_smollm2.json", "quality_smollm2"),
    "suite": ("suite_cpu.json", "report"),
    "fused": ("fused_cpu.json", "bench_fused"),
    "fused_bf16": ("fused_cpu_bf16.json", "bench_fused"),
    "distributed": ("distributed_cpu.json", "bench_distributed"),
    "offload": ("offload_cpu.json", "bench_offload"),
    "offload_disk": ("offload_disk_cpu.json", "bench_offload"),
    "offload_smollm2": ("offload_smollm2_cpu.json", "bench_offload"),
    "ablation_plus": ("ablation_plus.json", "ablation_plus"),
    "plus_cost": ("plus_cost_cpu.json", "bench_plus_cost"),
    "plus_cost_small": ("plus_cost_32x64_cpu.json", "bench_plus_cost"),
    "convert": ("convert_smollm2.json", "bench_convert"),
    "compare": ("compare_methods.json", "compare_methods"),
    "experts": ("experts_cpu.json", "bench_experts"),
}


def _suite_rows(result: dict):
    """``{group: [(name, stats, extra_info)]}`` of a pytest-benchmark JSON file."""
    groups: dict = {}
    for b in result["benchmarks"]:
        groups.setdefault(b["group"], []).append((b["name"].split("[")[-1].rstrip("]"), b["stats"], b["extra_info"]))
    return groups


def markdown(result: dict) -> str:
    """The pytest-benchmark suite as one table: median (min–max) per case and the ratio to its group's baseline."""
    rows = ["| group | case | median ms (min–max) | rounds | time vs baseline |", "|---|---|---|---:|---:|"]
    env = None
    for group, cases in _suite_rows(result).items():
        base = next((s for n, s, e in cases if n == e.get("baseline")), None)
        for name, st, extra in cases:
            env = extra
            ratio = f"{st['median'] / base['median']:.2f}x" if base else "-"
            rows.append(f"| {group} | {name} | {1e3 * st['median']:.2f} ({1e3 * st['min']:.2f}–{1e3 * st['max']:.2f}) | "
                        f"{st['rounds']} | {ratio} |")
    if env:
        rows.append(f"\n`{env.get('mode')}` mode; {env.get('cpu_count')} CPUs, torch {env.get('torch')}, peft "
                    f"{env.get('peft')}, extension {env.get('extension')}, commit {env.get('corda_fast_commit')}, "
                    f"{result.get('datetime', '')[:19]}; ratios < 1 are faster than the group's baseline")
    return "\n".join(rows)


def plots(results_dir: str) -> list[str]:
    """PNG plots of the suite (time vs baseline per group), PEFT comparison and decomposition results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    path = os.path.join(results_dir, "suite_cpu.json")
    if os.path.isfile(path):
        with open(path) as f:
            groups = _suite_rows(json.load(f))
        fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.6))
        for ax, (group, cases) in zip(axes if len(groups) > 1 else [axes], groups.items()):
            base = next((s for n, s, e in cases if n == e.get("baseline")), cases[0][1])
            ax.bar([n for n, _, _ in cases], [s["median"] / base["median"] for _, s, _ in cases])
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_title(group)
            ax.tick_params(axis="x", rotation=45)
        axes[0].set_ylabel("median time / baseline")
        fig.tight_layout()
        out = os.path.join(results_dir, "suite_cpu.png")
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    for fname, title, key in (("vs_peft_cpu.json", "init_adapters vs PEFT (SmolLM2-135M, CPU)", "summary"),):
        path = os.path.join(results_dir, fname)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            summary = json.load(f)[key]
        stages = ["calibrate", "decompose", "build_peft"]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        bottom = [0.0] * len(summary)
        for st in stages:
            vals = [summary[v][st]["median"] if st in summary[v] else 0.0 for v in summary]
            ax.barh(list(summary), vals, left=bottom, label=st)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xlabel("seconds (median)")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        out = os.path.join(results_dir, fname.replace(".json", ".png"))
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    path = os.path.join(results_dir, "decompose_cpu.json")
    if os.path.isfile(path):
        with open(path) as f:
            modes = json.load(f)["modes"]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        width = 0.8 / max(1, len(next(iter(modes.values()))))
        for k, v in enumerate(next(iter(modes.values()))):
            ax.bar([i + k * width for i in range(len(modes))], [modes[m][v]["seconds"]["median"] for m in modes],
                   width, label=v)
        ax.set_xticks([i + width for i in range(len(modes))], [m.upper() for m in modes])
        ax.set_ylabel("seconds (median)")
        ax.set_title("decomposing a batch of layers (CPU)")
        ax.legend()
        fig.tight_layout()
        out = os.path.join(results_dir, "decompose_cpu.png")
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written


def render(readme: str) -> tuple[str, list[str]]:
    done = []
    for name, (fname, module) in TABLES.items():
        path = os.path.join(HERE, "results", fname)
        pattern = re.compile(rf"(<!-- table:{name} -->\n)(.*?)(<!-- /table:{name} -->)", re.S)
        if not os.path.isfile(path) or not pattern.search(readme):
            continue
        with open(path) as f:
            result = json.load(f)
        table = importlib.import_module(module).markdown(result).rstrip("\n") + "\n"
        readme = pattern.sub(lambda m: m.group(1) + table + m.group(3), readme)
        done.append(name)
    return readme, done


def pages() -> list[str]:
    """README.md and every docs/*.md page."""
    docs = os.path.join(ROOT, "docs")
    return [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md")) if os.path.isdir(docs) else []


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    stale = []
    for path in pages():
        with open(path, encoding="utf-8") as f:
            old = f.read()
        new, done = render(old)
        rel = os.path.relpath(path, ROOT)
        if new == old:
            print(f"{rel}: up to date ({', '.join(done) or 'no tables'})")
        elif args.check:
            stale.append(rel)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
            print(f"{rel}: regenerated {', '.join(done)}")
    if stale:
        sys.exit(f"tables out of date in {', '.join(stale)}: run python benchmarks/report.py")
    if args.check:
        return
    for out in plots(os.path.join(HERE, "results")):
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
