"""Can CorDA++'s π be had without a full ``eigvalsh`` of each damped covariance? A probe, not a feature.

π needs ``λ_min`` and ``λ_max`` of ``C_f`` (unit mean diagonal, damped as scoring damps it). This measures, on a
saved statistics cache, single-threaded (as one scoring job per core runs): the exact ``eigvalsh``; against it a
Lanczos estimate of ``λ_max`` (``--steps-max`` steps on ``C_f``) and a shift-invert Lanczos estimate of ``λ_min``
(``--steps-min`` steps on ``C_f⁻¹`` through its Cholesky factor), each checked by one Cholesky factorization that
proves the estimate within a relative ``--delta`` (``C_f − λ̂(1−δ)I`` and ``λ̂(1+δ)I − C_f`` positive definite).
Prints how often each bound is certified, the estimates' errors against ``eigvalsh``, the two routes' times, how
much of ``λ_min(C_f) = λ + λ_min(C)`` the damping ``λ`` is (its quartiles over the statistics), and per width what one
``eigvalsh`` costs in Cholesky factorizations: a route certified to the score's precision needs at least three (the
shift-invert operator, one certificate per bound), so that ratio bounds what any such route can save.

    python -m corda_fast demo --samples 32 --seq-len 64 --covariance-cache stats.safetensors --out demo_out
    python benchmarks/probe_pi_bounds.py stats.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment  # noqa: E402


def lanczos_top(apply, n: int, steps: int, seed: int) -> float:
    """Largest Ritz value of the symmetric operator ``apply`` after ``steps`` Lanczos steps (full reorthogonalization)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.zeros(n, steps, dtype=torch.float64)
    q = torch.randn(n, 1, generator=g, dtype=torch.float64)
    basis[:, :1] = q / q.norm()
    alpha, beta = [], []
    for j in range(steps):
        w = apply(basis[:, j:j + 1])
        alpha.append(float(basis[:, j:j + 1].mT @ w))
        for _ in range(2):
            w = w - basis[:, :j + 1] @ (basis[:, :j + 1].mT @ w)
        if j + 1 < steps:
            beta.append(float(w.norm()))
            basis[:, j + 1:j + 2] = w / beta[-1]
    t = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    off = torch.tensor(beta, dtype=torch.float64)
    t += torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(t)[-1])


def positive_definite(m: torch.Tensor) -> bool:
    return int(torch.linalg.cholesky_ex(m)[1]) == 0


def probe(c_f: torch.Tensor, steps_min: int, steps_max: int, delta: float) -> dict:
    n = c_f.shape[0]
    t0 = time.perf_counter()
    ev = torch.linalg.eigvalsh(c_f)
    exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    chol = torch.linalg.cholesky(c_f)
    one_factor = time.perf_counter() - t0  # the unit any certified route pays at least three times
    lo = 1.0 / lanczos_top(lambda x: torch.cholesky_solve(x, chol), n, steps_min, 0)
    hi = lanczos_top(lambda x: c_f @ x, n, steps_max, 1)
    below = c_f.clone()
    below.diagonal().sub_(lo * (1 - delta))
    above = -c_f
    above.diagonal().add_(hi * (1 + delta))
    ok_lo, ok_hi = positive_definite(below), positive_definite(above)
    return {"d": n, "eigvalsh_s": exact, "cholesky_s": one_factor, "iterative_s": time.perf_counter() - t0,
            "certified_min": ok_lo,
            "certified_max": ok_hi, "min_rel_err": (lo - float(ev[0])) / float(ev[0]),
            "max_rel_err": (float(ev[-1]) - hi) / float(ev[-1]), "lambda_min": float(ev[0])}


def main():
    from corda_fast.ops import find_damping
    from corda_fast.stats import CovarianceStats

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cache", help="a covariance cache (.safetensors) written by corda_fast")
    p.add_argument("--steps-min", type=int, default=40)
    p.add_argument("--steps-max", type=int, default=30)
    p.add_argument("--delta", type=float, default=1e-9)
    p.add_argument("--out", default=None, help="write the rows and summary as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    stats = CovarianceStats.load(args.cache)
    rows = []
    for key in stats.sums:
        c = stats.covariance(key, torch.float64)
        c.div_(float(torch.diagonal(c).mean()))
        lam = find_damping(c)
        c.diagonal().add_(lam)  # unit mean diagonal: C + λ·I, as scoring damps it
        row = probe(c, args.steps_min, args.steps_max, args.delta)
        # how much of λ_min(C_f) = λ + λ_min(C) is the damping: 1 where C is singular
        rows.append({"key": key, "damping": lam, "damping_share": lam / row["lambda_min"], **row})
    n = len(rows)
    summary = {
        "statistics": n,
        "certified_min": sum(r["certified_min"] for r in rows),
        "certified_max": sum(r["certified_max"] for r in rows),
        "min_rel_err_above_1e-6": sum(r["min_rel_err"] > 1e-6 for r in rows),
        "eigvalsh_s": sum(r["eigvalsh_s"] for r in rows),
        "iterative_s": sum(r["iterative_s"] for r in rows),
        # per width: median eigvalsh and Cholesky seconds, and how many factorizations one eigvalsh costs
        "by_width": {str(d): {"eigvalsh_s": statistics.median(r["eigvalsh_s"] for r in rows if r["d"] == d),
                              "cholesky_s": statistics.median(r["cholesky_s"] for r in rows if r["d"] == d),
                              "statistics": sum(r["d"] == d for r in rows)}
                     for d in sorted({r["d"] for r in rows})},
        "damping_share_quartiles": [float(q) for q in torch.tensor([r["damping_share"] for r in rows],
                                                                   dtype=torch.float64).quantile(
                                                                       torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0],
                                                                                    dtype=torch.float64))],
    }
    print(f"{n} statistics, δ={args.delta:g}: λ_min certified for {summary['certified_min']}, λ_max for "
          f"{summary['certified_max']}; λ_min estimate off by more than 1e-6 for "
          f"{summary['min_rel_err_above_1e-6']}; eigvalsh {summary['eigvalsh_s']:.2f} s, Cholesky + Lanczos + "
          f"checks {summary['iterative_s']:.2f} s (one thread); λ / λ_min(C_f) quartiles (min, 25%, median, 75%, "
          f"max): {', '.join(f'{q:.3g}' for q in summary['damping_share_quartiles'])}")
    for d, w in summary["by_width"].items():
        print(f"d = {d} ({w['statistics']} statistics): eigvalsh {w['eigvalsh_s']:.3f} s, one Cholesky "
              f"{w['cholesky_s']:.3f} s (median): eigvalsh costs {w['eigvalsh_s'] / w['cholesky_s']:.1f} factorizations")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": vars(args), "environment": environment(), "summary": summary, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
