"""Accuracy of CorDA-KPM factors on SmolLM2-135M against a float64 run (not a timing benchmark).

For every adapted layer: relative Frobenius error of ``W_res`` and of ``s·B·A`` against a float64 run of the
textbook algorithm (written out here, independently of the library: explicit inverse, full SVD, ``V̂ = (Vᵀ C_f⁻¹)ᵀ``)
on float64 statistics of the same batches, with the same damping rule, for
  - ``default``      : float32 statistics, float64 Gram route (``svd_method="auto"``)
  - ``svd32``        : float32 statistics, float32 SVD (PEFT's arithmetic)
  - ``float64-dec``  : float32 statistics, decomposed with ``precision="float64"``
  - ``float64``      : statistics and decomposition with ``precision="float64"``
Also times the decomposition of each. Writes ``benchmarks/results/accuracy_smollm2.json``.

    python benchmarks/accuracy_smollm2.py [--samples 32 --seq-len 256 --rank 16]
"""

import argparse
import json
import os
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402

import corda_fast  # noqa: E402
from corda_fast.demo import builtin_text, load_model, make_batches, materialize_smollm2  # noqa: E402

from common import environment  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(model, stats, targets, **kw):
    kw.pop("rank")  # carried by the targets
    cfg = corda_fast.CordaConfig(mode="kpm", show_progress=False, **kw)
    t = time.perf_counter()
    f = corda_fast.stages.decompose(stats, targets, cfg)
    secs = time.perf_counter() - t
    out = {}
    for tg in targets:
        fa = f[tg.name]
        delta = fa.scaling * fa.B.double() @ fa.A.double()
        # residual exactly as build_peft_model forms it: from the stored factors, in the factor dtype
        w = tg.weight_matrix().detach()
        res = (w.to(fa.A.dtype) - (fa.scaling * fa.B) @ fa.A).to(w.dtype).double()
        out[tg.name] = (delta, res, fa.damping)
    return out, secs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", default=os.path.join(HERE, "results", "accuracy_smollm2.json"))
    args = p.parse_args()
    model, tok = load_model(materialize_smollm2())
    batches, _ = make_batches(tok, [builtin_text()], False, args.samples, args.seq_len, 8)
    cfg = corda_fast.CordaConfig(mode="kpm", show_progress=False)
    targets = corda_fast.stages.resolve_targets(model, corda_fast.LoraSpec(r=args.rank, target_modules=TARGETS))
    s32 = corda_fast.stages.collect_covariance(model, batches, cfg, targets)
    s64 = corda_fast.stages.collect_covariance(model, batches, cfg.replace(precision="float64"), targets)
    t = time.perf_counter()
    ref = {}
    for tg in targets:  # textbook float64 CorDA-KPM
        key = s64.key_of(tg.name)
        c = s64.covariance(key, torch.float64)
        lam = corda_fast.stages.find_damping(c)
        c_f = c + torch.eye(c.shape[0], dtype=torch.float64) * torch.diagonal(c).mean() * lam
        w = tg.weight_matrix().detach().double()
        u, sv, vh = torch.linalg.svd(w @ c_f, full_matrices=False)
        v_hat = (vh @ torch.linalg.inv(c_f)).T
        sr = sv[-args.rank:] / tg.scaling
        delta = tg.scaling * (u[:, -args.rank:] * sr.sqrt()) @ (v_hat[:, -args.rank:].T * sr.sqrt().unsqueeze(1))
        ref[tg.name] = (delta, w - delta, lam)
    t_ref = time.perf_counter() - t
    variants = {
        "default": (s32, dict()),
        "svd32": (s32, dict(svd_method="svd")),
        "float64-dec": (s32, dict(precision="float64")),
        "float64": (s64, dict(precision="float64")),
    }
    result = {"model": "SmolLM2-135M-Instruct", "mode": "kpm", "rank": args.rank, "samples": args.samples,
              "seq_len": args.seq_len, "reference_seconds": t_ref, "variants": {},
              "environment": environment()}
    for name, (stats, kw) in variants.items():
        got, secs = run(model, stats, targets, rank=args.rank, **kw)
        rows = {}
        for n, (d_ref, w_ref, lam_ref) in ref.items():
            d, w, lam = got[n]
            kind = n.split(".")[-1]
            rows.setdefault(kind, {"w_res": [], "delta": [], "same_damping": []})
            rows[kind]["w_res"].append(float((w - w_ref).norm() / w_ref.norm()))
            rows[kind]["delta"].append(float((d - d_ref).norm() / d_ref.norm()))
            rows[kind]["same_damping"].append(lam == lam_ref)
        summary = {k: {"w_res_max": max(v["w_res"]), "w_res_median": statistics.median(v["w_res"]),
                       "delta_max": max(v["delta"]), "delta_median": statistics.median(v["delta"]),
                       "same_damping": all(v["same_damping"])} for k, v in rows.items()}
        result["variants"][name] = {"decompose_seconds": secs, "per_kind": summary,
                                    "w_res_max": max(s["w_res_max"] for s in summary.values()),
                                    "delta_max": max(s["delta_max"] for s in summary.values())}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("| variant | decompose s | max rel. err W_res | max rel. err s·B·A | median s·B·A (q/o/down) |")
    print("|---|---|---|---|---|")
    for name, v in result["variants"].items():
        med = "/".join(f"{v['per_kind'][k]['delta_median']:.1e}" for k in ("q_proj", "o_proj", "down_proj"))
        print(f"| {name} | {v['decompose_seconds']:.2f} | {v['w_res_max']:.1e} | {v['delta_max']:.1e} | {med} |")


if __name__ == "__main__":
    main()
