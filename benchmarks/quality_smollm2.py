"""Quality of CorDA / CorDA++ initialisations on SmolLM2-135M, offline, on CPU: forgetting and convergence.

Knowledge = the English prose of the Python documentation topics shipped with the standard library
(``pydoc_data.topics`` without its indented code blocks); task = a synthetic format far from prose: lines
``sort: 42 7 19 3 => 3 7 19 42`` (random lists, fixed seed), so that fine-tuning on it can make the model forget.
Both are split 90 / 10 by position; calibration and training read the first part, every evaluation the held-out
part.

Methods, all at the same adapter parameter budget (uniform rank ``--rank`` on the 7 projections, alpha = rank):
  - ``lora``        PEFT LoRA (A Kaiming, B = 0; the seed changes A)
  - ``pissa``       PEFT PiSSA (``pissa_niter_4``: top-r components of W, residual frozen)
  - ``corda-kpm``   CorDA KPM calibrated on knowledge (the r smallest components of W·C adapted)
  - ``corda++-kpm`` CorDA++ KPM on knowledge (``--candidates`` statistics, dynamic selection and ranks)
  - ``corda-ipm``   CorDA IPM calibrated on task windows (the r largest components adapted)
  - ``corda++-ipm`` CorDA++ IPM on task windows
Measured per method:
  1. at init, the adapter *disabled* (the paper's check: discard the adapted components, keep the residual):
     knowledge perplexity and task loss; also for ``svd-bottom`` (the r smallest plain singular components of
     each W removed, no calibration) and the original model;
  2. ``--steps`` AdamW steps on task windows (``--seeds`` seeds: data order, and LoRA's A), the training loss
     per step (convergence), then held-out task loss and knowledge perplexity (retention).

Writes ``benchmarks/results/quality_smollm2.json`` and PNG plots next to it; ``python
benchmarks/report.py`` turns the JSON into the README tables.

    python benchmarks/quality_smollm2.py                      # full run (~20 min on 2 cores)
    python benchmarks/quality_smollm2.py --quick              # smoke: 2 steps, tiny evaluations
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402

import corda_fast  # noqa: E402
import corda_fast.plus  # noqa: E402,F401  (imported up front: later edits of the tree cannot leak into a run)
from corda_fast.demo import materialize_smollm2  # noqa: E402

from common import (  # noqa: E402
    LLAMA_TARGETS,
    METHODS,
    cell,
    environment,
    evaluate,
    init_method,
    load_base,
    mean_nll,
    quality_data,
    spread,
    train,
)

TARGETS = LLAMA_TARGETS

@torch.no_grad()
def svd_bottom_residual(model_dir, rank):
    """The original model with the ``rank`` smallest plain singular components of every target removed."""
    model = load_base(model_dir)
    for name, mod in model.named_modules():
        if name.split(".")[-1] in TARGETS:
            w = mod.weight.double()
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            mod.weight.copy_((w - (u[:, -rank:] * s[-rank:]) @ vh[-rank:]).float())
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--calib-batch", type=int, default=8, help="calibration batch size (CorDA++ candidate "
                   "groups are made of whole batches: batch i feeds candidate i mod --candidates)")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--train-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 seed, tiny calibration and eval")
    p.add_argument("--out", default=os.path.join(HERE, "results", "quality_smollm2.json"))
    args = p.parse_args()
    if args.quick:
        args.steps, args.seeds, args.calib_samples, args.calib_len, args.eval_windows = 2, [0], 8, 64, 2
        args.calib_batch = 4
        args.candidates = 2
        args.out = args.out.replace(".json", "_quick.json")
    args.plot_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(args.plot_dir, exist_ok=True)
    t_start = time.perf_counter()

    from transformers import AutoTokenizer

    model_dir = materialize_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    data, sizes = quality_data(tok, args.calib_samples, args.calib_len, args.calib_batch, args.eval_windows)
    (k_train, k_eval), (t_train, t_eval) = sizes["knowledge"], sizes["task"]
    result = {"environment": environment(), "config": {k: v for k, v in vars(args).items() if k != "plot_dir"},
              "data": {"knowledge": f"pydoc_data.topics prose (Python {sys.version.split()[0]}), {k_train} + "
                                    f"{k_eval} tokens",
                       "task": f"synthetic sorting lines, {t_train} + {t_eval} tokens"},
              "discard": {}, "methods": {}}

    base = load_base(model_dir)
    result["discard"]["original"] = evaluate(base, data)
    del base
    result["discard"]["svd-bottom"] = evaluate(svd_bottom_residual(model_dir, args.rank), data)
    print(f"original {result['discard']['original']}\nsvd-bottom {result['discard']['svd-bottom']}", flush=True)

    for method in args.methods:
        runs = []
        cached_state = None
        for seed in args.seeds:
            if cached_state is None or method == "lora":
                pm, info = init_method(method, model_dir, data, args, seed)
                if method != "lora":
                    cached_state = {k: v.clone() for k, v in pm.state_dict().items()}
                if seed == args.seeds[0]:
                    with pm.disable_adapter():
                        result["discard"][method] = evaluate(pm, data)
                    # sanity: with the adapter on, the initialised model is the original one
                    result["discard"][method]["adapter_on_knowledge_ppl"] = math.exp(
                        mean_nll(pm, data["knowledge_eval"]))
            else:
                pm.load_state_dict(cached_state)
            t = time.perf_counter()
            losses = train(pm, data, args, seed)
            after = evaluate(pm, data)
            runs.append({"seed": seed, "losses": losses, "after": after, "train_seconds": round(time.perf_counter() - t, 1)})
            print(f"{method} seed {seed}: {after} ({runs[-1]['train_seconds']} s)", flush=True)
        result["methods"][method] = {
            "info": info, "runs": runs,
            "task_nll": spread([r["after"]["task_nll"] for r in runs]),
            "knowledge_ppl": spread([r["after"]["knowledge_ppl"] for r in runs]),
            "final_train_loss": spread([statistics.mean(r["losses"][-5:]) for r in runs]),
        }
        del pm
    result["seconds_total"] = round(time.perf_counter() - t_start, 1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.plot_dir, "_quick" if args.quick else "")
    print(markdown(result))


def plot(result, out_dir, suffix=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, r in result["methods"].items():
        curves = torch.tensor([run["losses"] for run in r["runs"]])
        mean = curves.mean(0)
        x = range(1, len(mean) + 1)
        axes[0].plot(x, mean, label=m)
        if curves.shape[0] > 1:
            axes[0].fill_between(x, curves.min(0).values, curves.max(0).values, alpha=0.15)
        axes[1].errorbar(r["task_nll"]["median"], r["knowledge_ppl"]["median"],
                         xerr=[[r["task_nll"]["median"] - r["task_nll"]["min"]],
                               [r["task_nll"]["max"] - r["task_nll"]["median"]]],
                         yerr=[[r["knowledge_ppl"]["median"] - r["knowledge_ppl"]["min"]],
                               [r["knowledge_ppl"]["max"] - r["knowledge_ppl"]["median"]]], fmt="o", label=m)
    orig = result["discard"]["original"]
    axes[1].axhline(orig["knowledge_ppl"], color="k", ls="--", lw=0.8, label="original model")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss (task)")
    axes[0].set_title("convergence (mean over seeds, band = min-max)")
    axes[0].legend()
    axes[1].set_xlabel("held-out task NLL after fine-tuning (lower = learned more)")
    axes[1].set_ylabel("knowledge perplexity after fine-tuning (lower = forgot less)")
    axes[1].set_yscale("log")
    axes[1].set_title("forgetting vs learning")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"quality_smollm2{suffix}.png"), dpi=100)
    plt.close(fig)


def markdown(result: dict) -> str:
    d = result["discard"]
    rows = ["| model (adapter disabled at init) | knowledge ppl | task NLL |", "|---|---:|---:|"]
    for m, v in d.items():
        rows.append(f"| {m} | {v['knowledge_ppl']:.3f} | {v['task_nll']:.4f} |")
    c = result["config"]
    rows += ["", f"| method (after {c['steps']} steps) | trainable | task NLL | knowledge ppl | last-5 train loss |",
             "|---|---:|---:|---:|---:|"]

    for m, r in result["methods"].items():
        rows.append(f"| {m} | {r['info']['trainable']:,} | {cell(r['task_nll'], '.4f')} | "
                    f"{cell(r['knowledge_ppl'], '.3f')} | {cell(r['final_train_loss'], '.4f')} |")
    env = result["environment"]
    rows.append(f"\nSmolLM2-135M-Instruct (float32), rank {c['rank']} budget on 7 projections, alpha = rank; calibration "
                f"{c['calib_samples']} × {c['calib_len']} tokens; AdamW lr {c['lr']}, batch {c['batch_size']} × "
                f"{c['train_len']} tokens; median (min–max) over seeds {c['seeds']}; {env['cpu_count']} CPUs, torch "
                f"{env['torch']}, peft {env['peft']}, commit {env['corda_fast_commit']}, {env['date']}; "
                f"{result['seconds_total']:.0f} s in all.")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
