"""Peak host memory of the decomposition's largest steps, ours next to the plain torch calls, in one process.

A decomposition job (``decompose._group_factors``, one per CPU core at a time) peaks in one of three places:

- the Gram matrix of ``M = W·C_f`` and its eigen-decomposition (``ops.gram_basis(keep_m=False)``: ``M·Mᵀ`` summed
  from column blocks of ``M``, eigenvectors written in the Gram's column-major storage), against ``M = W·C_f`` whole,
  ``M·Mᵀ`` and ``torch.linalg.eigh`` on it;
- the damping rule's exact test (``ops.linalg._lu_residual``: LU factors in the spent Cholesky factor's storage, the
  inverse solved in column blocks), against ``torch.linalg.inv_ex`` and a whole ``C_f·C_f⁻¹``;
- the end of the job, ``C_f`` factored and the kept vectors solved through the factor (``ops.cholesky_in_place``:
  the factor in ``C_f``'s storage as LAPACK lays it out; ``ops.cholesky_solve_lower``: two triangular solves),
  against ``torch.linalg.cholesky_ex`` into a row-major ``C_f`` (torch factors a column-major copy) and
  ``torch.cholesky_solve`` (which copies the factor).

Each step runs once to map the libraries' pages, then ``--repeats`` times; reported: the peak resident memory above
the size before each run (median, min, max; Linux ``/proc``), taken after freed pages and MKL's buffers went back to
the system. One thread. The sizes make the blocks' effect visible at a few seconds' cost; the statistics are
synthetic (the steps' memory does not depend on the values). The allocator makes single runs vary by tens of MiB.

    python benchmarks/probe_job_memory.py                       # ~2 min on one core
    python benchmarks/probe_job_memory.py --d-out 1024 --d-in 4096 --d-lu 4096 --rank 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment  # noqa: E402


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_above(fn) -> int:
    """Bytes of resident memory ``fn`` adds at its peak above the size before it."""
    from corda_fast.offload import release_host_memory

    release_host_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    fn()
    return _status("VmHWM") - base


def plain_gram(w: torch.Tensor, c: torch.Tensor) -> None:
    m = w.double() @ c
    g = m @ m.mT
    del m
    torch.linalg.eigh(g)


def plain_residual(c: torch.Tensor, spent: torch.Tensor) -> None:
    inv, _ = torch.linalg.inv_ex(c)
    prod = torch.mm(c, inv, out=spent)
    prod.diagonal().sub_(1.0)
    float(prod.norm())


def plain_finish(work: torch.Tensor, c: torch.Tensor, v: torch.Tensor) -> None:
    work.copy_(c)
    chol, _ = torch.linalg.cholesky_ex(work, out=(work, torch.empty((), dtype=torch.int32)))
    torch.cholesky_solve(v, chol)


def ours_finish(work: torch.Tensor, c: torch.Tensor, v: torch.Tensor) -> None:
    from corda_fast.ops import cholesky_in_place, cholesky_solve_lower

    work.copy_(c)
    chol, _ = cholesky_in_place(work)
    cholesky_solve_lower(v, chol)


def main():
    from corda_fast.ops import linalg

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-out", type=int, default=1024)
    p.add_argument("--d-in", type=int, default=4096)
    p.add_argument("--d-lu", type=int, default=4096, help="width of the float32 statistic of the exact test")
    p.add_argument("--rank", type=int, default=16, help="kept vectors solved through the factor at the end")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "probe_job_memory_cpu.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(args.d_out, args.d_in, generator=g)
    low = torch.randn(args.d_in, 32, generator=g, dtype=torch.float64)
    c = low @ low.mT
    c.diagonal().add_(1.0)
    c32 = torch.randn(args.d_lu, 64, generator=g)
    c32 = c32 @ c32.mT
    c32.diagonal().add_(float(c32.diagonal().mean()))
    spent = torch.empty_like(c32)
    work, v = torch.empty_like(c), torch.randn(args.d_in, args.rank, generator=g, dtype=torch.float64)
    rows = {}
    for name, fn in [("gram_plain", lambda: plain_gram(w, c)),
                     ("gram_ours", lambda: linalg.gram_basis(w, c, keep_m=False)),
                     ("residual_plain", lambda: plain_residual(c32, spent)),
                     ("residual_ours", lambda: linalg._lu_residual(c32, spent)),
                     ("finish_plain", lambda: plain_finish(work, c, v)),
                     ("finish_ours", lambda: ours_finish(work, c, v))]:
        peak_above(fn)
        runs = sorted(peak_above(fn) / 2**20 for _ in range(args.repeats))
        rows[name] = {"median": statistics.median(runs), "min": runs[0], "max": runs[-1]}
    n = min(args.d_out, args.d_in)
    units = {"gram_MiB_per_n2": 8 * n * n / 2**20, "residual_MiB_per_d2": 4 * args.d_lu ** 2 / 2**20,
             "finish_MiB_per_d2": 8 * args.d_in ** 2 / 2**20}
    def show(name):
        r = rows[name]
        return f"{r['median']:.0f} ({r['min']:.0f}–{r['max']:.0f}) MiB"

    print(f"Gram of W·C_f ({args.d_out}×{args.d_in}), n² = {units['gram_MiB_per_n2']:.0f} MiB: plain "
          f"{show('gram_plain')}, ours {show('gram_ours')}; exact damping test at d = {args.d_lu} (float32), "
          f"d² = {units['residual_MiB_per_d2']:.0f} MiB: plain {show('residual_plain')}, ours {show('residual_ours')}; "
          f"factor + {args.rank} solves at d = {args.d_in} (float64, d² = {units['finish_MiB_per_d2']:.0f} MiB): plain "
          f"{show('finish_plain')}, ours {show('finish_ours')} (median (min–max) of {args.repeats})")
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "environment": environment(), "peak_mib": rows, **units}, f, indent=1)


if __name__ == "__main__":
    main()
