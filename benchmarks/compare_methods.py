"""A fair comparison: LoRA, PiSSA, CorDA KPM / IPM and CorDA++ KPM / IPM on SmolLM2-135M at the same rank, each at
several learning rates and seeds, compared at the best learning rate of each method.

The data and evaluation are those of ``quality_smollm2.py`` (knowledge = the prose of the Python documentation
topics, task = synthetic sorting lines; calibration and training read the first 90 %, evaluation the held-out 10 %).
Every method is initialised once (LoRA once per seed: its A is random) and fine-tuned ``--steps`` AdamW steps at each
learning rate of ``--lrs`` with each seed of ``--seeds`` (the seed sets the data order). A method's best learning
rate is the one with the lowest median held-out task loss; at it the table gives the task loss and the knowledge
perplexity's ratio to the original model's (> 1: forgetting), median (min–max) over seeds. A method is not
judged at a learning rate that suits another one.

    python benchmarks/compare_methods.py              # 6 methods x 3 learning rates x 3 seeds (~30 min on 2 cores)
    python benchmarks/compare_methods.py --quick      # smoke: 2 methods, 2 learning rates, 1 seed, 2 steps
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


from corda_fast.demo import materialize_smollm2  # noqa: E402

from common import (  # noqa: E402
    METHODS,
    cell,
    environment,
    evaluate,
    init_method,
    load_base,
    quality_data,
    spread,
    train,
)


def run_method(method: str, model_dir: str, data: dict, args) -> dict:
    """``{lr: [run per seed]}``, each run ``{"seed", "losses", "after"}``."""
    out, state, pm = {}, None, None
    for seed in args.seeds:
        if method == "lora" or state is None:
            pm, _ = init_method(method, model_dir, data, args, seed)
            state = {k: v.clone() for k, v in pm.state_dict().items()}
        for lr in args.lrs:
            pm.load_state_dict(state)
            t = time.perf_counter()
            losses = train(pm, data, argparse.Namespace(**{**vars(args), "lr": lr}), seed)
            after = evaluate(pm, data)
            out.setdefault(str(lr), []).append({"seed": seed, "losses": losses, "after": after,
                                                "seconds": round(time.perf_counter() - t, 1)})
            print(f"{method} lr {lr:g} seed {seed}: task {after['task_nll']:.4f} knowledge ppl "
                  f"{after['knowledge_ppl']:.3f}", flush=True)
    return out


def summarize(result: dict) -> dict:
    """Per method: every learning rate's spreads, and the best one (lowest median held-out task loss)."""
    orig = result["original"]["knowledge_ppl"]
    out = {}
    for method, by_lr in result["runs"].items():
        rows = {lr: {"task_nll": spread([r["after"]["task_nll"] for r in runs]),
                     "knowledge_ratio": spread([r["after"]["knowledge_ppl"] / orig for r in runs])}
                for lr, runs in by_lr.items()}
        best = min(rows, key=lambda lr: rows[lr]["task_nll"]["median"])
        out[method] = {"by_lr": rows, "best_lr": float(best), **rows[best]}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--candidates", type=int, default=1, help="CorDA++ candidate statistics (PlusConfig's default)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--train-len", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 methods, 2 learning rates, 1 seed, 2 steps")
    p.add_argument("--out", default=os.path.join(HERE, "results", "compare_methods.json"))
    args = p.parse_args()
    if args.quick:
        args.methods, args.lrs, args.seeds, args.steps = ["lora", "corda-kpm"], [1e-4, 1e-3], [0], 2
        args.calib_samples, args.calib_len, args.eval_windows = 8, 64, 1
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    model_dir = materialize_smollm2()
    data, _ = quality_data(AutoTokenizer.from_pretrained(model_dir), args.calib_samples, args.calib_len, 8,
                           args.eval_windows)
    result = {"environment": environment(), "config": vars(args), "original": evaluate(load_base(model_dir), data),
              "runs": {}}
    for method in args.methods:
        result["runs"][method] = run_method(method, model_dir, data, args)
    result["summary"] = summarize(result)
    result["seconds_total"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    try:
        plot(result, os.path.splitext(args.out)[0] + ".png")
    except ImportError as exc:
        print(f"no plot: {exc}", file=sys.stderr)
    print(markdown(result))


def markdown(result: dict) -> str:
    c, s = result["config"], result["summary"]

    rows = ["| method | best lr | held-out task NLL | knowledge ppl / original | task NLL at each lr |",
            "|---|---:|---:|---:|---|"]
    for m, v in s.items():
        each = ", ".join(f"{float(lr):g}: {r['task_nll']['median']:.3f}" for lr, r in v["by_lr"].items())
        rows.append(f"| {m} | {v['best_lr']:g} | {cell(v['task_nll'], '.4f')} | {cell(v['knowledge_ratio'], '.4f')} "
                    f"| {each} |")
    e = result["environment"]
    rows.append(f"\nSmolLM2-135M-Instruct (float32), rank {c['rank']} on the 7 projections, alpha = rank; calibration "
                f"{c['calib_samples']} × {c['calib_len']} tokens (KPM: knowledge, IPM: task); {c['steps']} AdamW "
                f"steps of {c['batch_size']} × {c['train_len']} task tokens at each lr of {c['lrs']}; median (min–max) "
                f"over seeds {c['seeds']}; original knowledge ppl {result['original']['knowledge_ppl']:.3f}; "
                f"{e['cpu_count']} CPUs, torch {e['torch']}, peft {e['peft']}, commit {e['corda_fast_commit']}, "
                f"{e['date']}; {result['seconds_total']:.0f} s in all.")
    return "\n".join(rows)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, v in result["summary"].items():
        xs = [r["task_nll"]["median"] for r in v["by_lr"].values()]
        ys = [r["knowledge_ratio"]["median"] for r in v["by_lr"].values()]
        line = ax.plot(xs, ys, "-", alpha=0.4)[0]
        ax.plot(v["task_nll"]["median"], v["knowledge_ratio"]["median"], "o", color=line.get_color(),
                label=f"{m} (best lr {v['best_lr']:g})")
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_yscale("log")  # a learning rate too high for a method sends its perplexity up by orders of magnitude
    ax.set_xlabel("held-out task NLL (lower: learned more)")
    ax.set_ylabel("knowledge perplexity / original (lower: forgot less)")
    ax.set_title("each method at its learning rates (line) and its best (dot)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
