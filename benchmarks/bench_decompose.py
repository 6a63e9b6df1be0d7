"""Decomposition of a batch of layers: corda_fast (native ops, and the pure-torch path) vs the PEFT-style loop.

Same statistics and weights for every variant, in one run:
  - ``peft-loop``  one layer at a time as PEFT's ``collect_eigens_for_layer``: damping trials with an explicit
                   LU inverse, ``torch.linalg.inv`` + full thin SVD of ``W·C_f`` + full ``V̂ = (Vᵀ C_f⁻¹)ᵀ``, crop r;
  - ``native``     ``corda_fast.stages.decompose`` through the extension (``CORDA_FAST_BACKEND=native``);
  - ``torch``      ``corda_fast.stages.decompose`` on the pure-torch path (``CORDA_FAST_BACKEND=torch``).
Each variant's ``s·B·A`` is compared with a float64 textbook run (reconstruction error, median and max over
layers). Statistics come from random activations with a decaying spectrum (condition ~1e6), so KPM's smallest
components are as hard as on real models.

    python benchmarks/bench_decompose.py                          # SmolLM2-sized layers, CPU
    python benchmarks/bench_decompose.py --device cuda --shapes 4096x4096 11008x4096 4096x11008 --layers-per-shape 4
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
from corda_fast.stats import CovarianceStats  # noqa: E402

from common import environment  # noqa: E402


class _Layer(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.weight = torch.nn.Parameter(w, requires_grad=False)


def make_problem(shapes, per_shape, device, seed=0):
    """Targets (one per layer) and a CovarianceStats with one statistic per layer."""
    g = torch.Generator().manual_seed(seed)
    targets, sums, n, members = [], {}, {}, {}
    for d_out, d_in in shapes:
        for j in range(per_shape):
            name = f"l{d_out}x{d_in}.{j}"
            tokens = 2 * d_in
            x = torch.randn(tokens, d_in, generator=g) * torch.logspace(0, -3, d_in)  # condition ~1e6
            sums[name] = (x.T @ x).to(device)
            n[name], members[name] = tokens, [name]
            w = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(device)
            targets.append(corda_fast.stages.Target(name, _Layer(w), False, d_in, d_out, 0, 0.0, 1.0))
    stats = CovarianceStats(sums, n, dict(n), members, "none", "synthetic")
    return targets, stats


def peft_loop(stats, targets, rank, mode):
    """PEFT's per-layer arithmetic (float32): LU-inverse damping test, inverse, full SVD, full V̂, crop."""
    out = {}
    for t in targets:
        c = stats.covariance(t.name, torch.float32)
        eye = torch.eye(c.shape[0], device=c.device)
        lam = 0.01
        while True:
            cf = c + eye * torch.diagonal(c).mean() * lam
            inv = torch.linalg.inv(cf)
            if float(torch.dist(cf @ inv, eye)) < 0.05:
                break
            lam *= 2
        u, s, vh = torch.linalg.svd(t.module.weight.float() @ cf, full_matrices=False)
        v_hat = (vh @ inv).T
        sl = slice(0, rank) if mode == "ipm" else slice(s.shape[0] - rank, s.shape[0])
        root = s[sl].sqrt()
        out[t.name] = ((u[:, sl] * root).cpu(), (v_hat[:, sl] * root).T.cpu(), lam)
    if c.is_cuda:
        torch.cuda.synchronize()
    return out


def reference(stats, targets, rank, mode, lams):
    ref = {}
    for t in targets:
        c = stats.covariance(t.name, torch.float64)  # on the statistics' device (float64 SVDs are slow on CPU)
        cf = c + torch.eye(c.shape[0], dtype=torch.float64, device=c.device) * torch.diagonal(c).mean() * lams[t.name]
        u, s, vh = torch.linalg.svd(t.module.weight.double() @ cf, full_matrices=False)
        v_hat = torch.linalg.solve(cf, vh.T)
        sl = slice(0, rank) if mode == "ipm" else slice(s.shape[0] - rank, s.shape[0])
        ref[t.name] = ((u[:, sl] * s[sl]) @ v_hat[:, sl].T).cpu()
    return ref


def errors(factors, ref):
    return [float((b.double() @ a.double() - ref[n]).norm() / ref[n].norm()) for n, (b, a) in factors.items()]


def run_ours(stats, targets, rank, mode, native, device):
    os.environ["CORDA_FAST_BACKEND"] = "native" if native else "torch"
    for t in targets:
        t.rank = rank
    cfg = corda_fast.CordaConfig(mode=mode, show_progress=False)
    f = corda_fast.stages.decompose(stats, targets, cfg)
    if device == "cuda":
        torch.cuda.synchronize()
    return {n: (x.B.cpu(), x.A.cpu(), x.damping) for n, x in f.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["576x576", "1536x576", "576x1536"], help="d_out x d_in")
    p.add_argument("--layers-per-shape", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=["kpm", "ipm"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join(HERE, "results", "decompose_cpu.json"))
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    targets, stats = make_problem(shapes, args.layers_per_shape, args.device)
    from corda_fast import ops

    usable = ops.why_not("batched_decompose", "native", args.device) is None
    variants = ["peft-loop", "torch"] + (["native"] if usable else [])
    result = {"environment": {**environment(), "device": args.device,
                              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                              "extension": ops.extension_status()},
              "config": vars(args), "modes": {}}
    for mode in args.modes:
        times = {v: [] for v in variants}
        outs = {}
        for rep in range(args.repeats):
            for v in variants:  # interleaved, so drift of the machine hits every variant alike
                t = time.perf_counter()
                if v == "peft-loop":
                    o = peft_loop(stats, targets, args.rank, mode)
                else:
                    o = run_ours(stats, targets, args.rank, mode, v == "native", args.device)
                times[v].append(time.perf_counter() - t)
                outs[v] = o
        lams = {n: x[2] for n, x in outs["peft-loop"].items()}
        assert all(outs[v][n][2] == lams[n] for v in variants for n in lams), "variants chose different damping"
        ref = reference(stats, targets, args.rank, mode, lams)
        summary = {}
        for v in variants:
            err = errors({n: (x[0], x[1]) for n, x in outs[v].items()}, ref)
            summary[v] = {"seconds": {"median": statistics.median(times[v]), "min": min(times[v]),
                                      "max": max(times[v]), "runs": times[v]},
                          "error_median": statistics.median(err), "error_max": max(err)}
        base = summary["peft-loop"]["seconds"]["median"]
        for v in variants:
            summary[v]["speedup_vs_peft_loop"] = base / summary[v]["seconds"]["median"]
            summary[v]["error_vs_peft_loop"] = summary[v]["error_max"] / summary["peft-loop"]["error_max"]
        result["modes"][mode] = summary
        print(f"{mode}: " + ", ".join(f"{v} {s['seconds']['median']:.2f}s ({s['speedup_vs_peft_loop']:.2f}x, "
                                       f"max err {s['error_max']:.1e})" for v, s in summary.items()), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))


def markdown(result: dict) -> str:
    c = result["config"]
    rows = ["| mode | variant | time s, median (min–max) | speed-up vs PEFT loop | max rel. error `B·A` | median |",
            "|---|---|---|---:|---:|---:|"]
    for mode, summary in result["modes"].items():
        for v, s in summary.items():
            t = s["seconds"]
            rows.append(f"| {mode.upper()} | {v} | {t['median']:.2f} ({t['min']:.2f}–{t['max']:.2f}) | "
                        f"{s['speedup_vs_peft_loop']:.2f}x | {s['error_max']:.1e} | {s['error_median']:.1e} |")
    env = result["environment"]
    rows.append(f"\n{c['layers_per_shape']} layers each of {', '.join(c['shapes'])} (d_out×d_in), r = {c['rank']}, "
                f"{c['repeats']} interleaved runs; device {env['device']}{' ' + env['gpu'] if env.get('gpu') else ''}, "
                f"{env['cpu_count']} CPUs, torch {env['torch']}, extension {env['extension']}, commit "
                f"{env['corda_fast_commit']}, {env['date']}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
