"""Micro benchmarks of the CPU design choices quoted in the code and README (SmolLM2-135M layer shapes).

  - statistic accumulation: block-upper-triangle ``xtx_accumulate`` vs one full ``addmm_`` (d = 576, 1536; 2048 rows)
  - kept singular vectors: float64 Gram route (``W·C_f``, Gram, eigh) vs float32 thin SVD, one thread
  - layer-group parallelism: two single-threaded calls at a time vs one multi-threaded call

Median (min-max) over ``--repeats`` calls, side by side; results in ``benchmarks/results/ops_cpu.json``.

    python benchmarks/bench_ops.py
"""

import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402

from corda_fast import ops  # noqa: E402

from common import environment  # noqa: E402


def timeit(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts)}


def main(repeats=7):
    torch.manual_seed(0)
    rows = {}
    for d in (576, 1536):
        x = torch.randn(2048, d)
        scale = torch.rand(2048)
        acc = torch.zeros(d, d)
        full = torch.zeros(d, d)
        rows[f"xtx d={d}: triangle"] = timeit(lambda: ops.xtx_accumulate(acc, x, scale, "torch"), repeats)
        rows[f"xtx d={d}: full addmm"] = timeit(lambda: full.addmm_((x * scale[:, None]).T, x * scale[:, None]), repeats)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for d_out, d_in in ((1536, 576), (576, 1536), (576, 576)):
            w = torch.randn(d_out, d_in)
            xx = torch.randn(4 * d_in, d_in)
            cf = xx.T @ xx / (4 * d_in) + 0.01 * torch.eye(d_in)
            wd, cd = w.double(), cf.double()

            def gram():
                m = wd @ cd
                torch.linalg.eigh(m @ m.T if d_out <= d_in else m.T @ m)

            rows[f"{d_out}x{d_in}: gram64 (1 thread)"] = timeit(gram, repeats)
            rows[f"{d_out}x{d_in}: svd32 (1 thread)"] = timeit(lambda: torch.linalg.svd(w @ cf, full_matrices=False),
                                                               repeats)
        g = torch.randn(576, 576, dtype=torch.float64)
        g = g @ g.T
        with ThreadPoolExecutor(2) as pool:
            rows["eigh 576 x8: 2 single-threaded at a time"] = timeit(
                lambda: list(pool.map(lambda _: torch.linalg.eigh(g), range(8))), repeats)
    finally:
        torch.set_num_threads(threads)
    rows["eigh 576 x8: one multi-threaded call at a time"] = timeit(
        lambda: [torch.linalg.eigh(g) for _ in range(8)], repeats)
    result = {"benchmark": "ops_cpu", "environment": environment(), "rows": rows}
    out = os.path.join(HERE, "results", "ops_cpu.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print("| op | median ms (min-max) |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v['median_ms']:.1f} ({v['min_ms']:.1f}-{v['max_ms']:.1f}) |")


if __name__ == "__main__":
    main()
