"""CorDA++ ablation on SmolLM2-135M, offline, on CPU: which of the open choices matter, against CorDA and LoRA.

One adapter budget (uniform rank ``--rank`` on the 7 projections, alpha = rank). The calibration data are drawn
once; every initialisation is fine-tuned with ``--seeds`` seeds (training order, and LoRA's random A). The
calibration data are run once per source
(``knowledge``: documentation prose, ``task``: sorting lines; the corpora of ``quality_smollm2.py``) into 8
statistics, one per calibration batch, windows sorted by their position in the corpus, so batch ``i`` holds the
``i``-th eighth of the draw. Every candidate set below is a sum of those (exact: statistics add):

  - ``interleaved``: candidate ``g`` of ``N`` = batches ``i ≡ g (mod N)`` (what ``collect_candidates`` does);
  - ``contiguous``: candidate ``g`` = batches ``2g, 2g+1`` (each a region of the corpus);
  - ``mixed``: two interleaved halves of the own source and two of the other source;
  - ``N = 1, 2, 4, 8`` (8 = one batch each, 1 = all of them).

Variants, one choice changed at a time from ``default`` (interleaved, N = 4, selection ``all``, ``score_at`` next,
no cap): ``adapter`` (selection sum), ``current`` (score_at), ``cap4`` (ranks ≤ 4× uniform),
``contiguous``, ``mixed``, ``n2``, ``n8``, ``n1`` (no selection: CorDA's statistic, all the data, with the
allocation); ``raw`` (no normalisation of the candidates) and ``frobenius`` (the stable rank as the selection
sum) are compared at the plan level only. KPM is calibrated on knowledge and judged by retention (knowledge
perplexity) and task NLL after fine-tuning on the task; IPM is calibrated on the task and judged by its early
(the third of the steps after the first) and final (last third) training loss. Variants whose plan equals one already
trained (same statistics per layer, same ranks) reuse its result, since the run is then identical.

Writes ``benchmarks/results/ablation_plus.json`` (environment, plans, runs) and ``ablation_plus.png``;
``python benchmarks/report.py`` renders the table into docs/corda_plus.md.

    python benchmarks/ablation_plus.py                      # ~55 min on 2 cores
    python benchmarks/ablation_plus.py --quick              # smoke: 1 seed, 2 steps
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402

import corda_fast  # noqa: E402
import corda_fast.api as api  # noqa: E402
from corda_fast.calibrate import collect_candidates  # noqa: E402
from corda_fast.demo import materialize_smollm2  # noqa: E402
from corda_fast.plus import decide, score_candidates  # noqa: E402
from corda_fast.stats import CovarianceStats  # noqa: E402
from corda_fast.targets import resolve_targets  # noqa: E402

from common import (  # noqa: E402
    LLAMA_TARGETS,
    batches_of,
    cell,
    consecutive,
    environment,
    evaluate,
    knowledge_text,
    load_base,
    split_tokens,
    spread,
    task_text,
    train,
)

TARGETS = LLAMA_TARGETS

SETS = {  # candidate set -> (source, groups of the 8 per-batch statistics)
    "interleaved4": ("own", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    "contiguous4": ("own", [[0, 1], [2, 3], [4, 5], [6, 7]]),
    "mixed4": ("mixed", None),
    "interleaved2": ("own", [[0, 2, 4, 6], [1, 3, 5, 7]]),
    "eight": ("own", [[i] for i in range(8)]),
    "one": ("own", [list(range(8))]),
}
VARIANTS = {  # name -> (candidate set, PlusConfig changes, plus.decide's arguments, trained)
    "default": ("interleaved4", {}, {}, True),
    "adapter": ("interleaved4", {}, {"selection_sum": "adapter"}, True),
    "frobenius": ("interleaved4", {}, {"selection_sum": "frobenius"}, False),
    "current": ("interleaved4", {}, {"score_at": "current"}, True),
    "cap4": ("interleaved4", {"max_rank_factor": 4.0}, {}, True),
    "raw": ("interleaved4", {}, {"normalize": False}, False),
    "contiguous": ("contiguous4", {}, {}, True),
    "mixed": ("mixed4", {}, {}, True),
    "n2": ("interleaved2", {}, {}, True),
    "n8": ("eight", {}, {}, True),
    "n1": ("one", {}, {}, True),
}


def merge(groups: list[CovarianceStats], idx: list[int]) -> CovarianceStats:
    """The statistics of several groups added (what one candidate over those batches would have collected)."""
    g0 = groups[idx[0]]
    sums = {k: sum(groups[i].sums[k] for i in idx) for k in g0.sums}
    n_samples = {k: sum(groups[i].n_samples[k] for i in idx) for k in g0.sums}
    n_tokens = {k: sum(groups[i].n_tokens[k] for i in idx) for k in g0.sums}
    return CovarianceStats(sums, n_samples, n_tokens, g0.members, g0.normalization, g0.model_fingerprint,
                           dict(g0.meta))


def candidate_set(name: str, own: list, other: list) -> tuple[list[CovarianceStats], list[tuple]]:
    """``(candidates, provenance)``; provenance names the per-batch statistics each candidate sums."""
    source, parts = SETS[name]
    if source == "mixed":
        halves = [[0, 2, 4, 6], [1, 3, 5, 7]]
        return ([merge(own, h) for h in halves] + [merge(other, h) for h in halves],
                [("own", *h) for h in halves] + [("other", *h) for h in halves])
    return [merge(own, p) for p in parts], [("own", *p) for p in parts]


def kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def plan_summary(p, provenance, default=None) -> dict:
    ranks = {l.name: l.rank for l in p.layers}
    by_kind = collections.defaultdict(list)
    for l in p.layers:
        by_kind[kind(l.name)].append(l.rank)
    out = {"budget": p.budget, "realised": p.realised, "rank_min": min(ranks.values()),
           "rank_max": max(ranks.values()),
           "rank_by_kind": {k: {"mean": round(statistics.mean(v), 2), "min": min(v), "max": max(v),
                                "histogram": dict(sorted(collections.Counter(v).items()))}
                            for k, v in by_kind.items()},
           "candidates_chosen": dict(collections.Counter(l.candidate for l in p.layers)),
           "damping": sorted({l.damping for l in p.layers}),
           "signature": [[l.name, list(provenance[l.candidate]), l.rank] for l in p.layers]}
    if default is not None:
        same = {n: (c, r) for n, c, r in ((s[0], tuple(s[1]), s[2]) for s in default["signature"])}
        out["same_candidate_as_default"] = sum(tuple(provenance[l.candidate]) == same[l.name][0] for l in p.layers)
        out["same_rank_as_default"] = sum(l.rank == same[l.name][1] for l in p.layers)
        out["layers"] = len(p.layers)
    return out


def build(model_dir, mode, batches, args, cands, scores, pconf, choices, corda_stats=None):
    """A CorDA / CorDA++ PeftModel on a fresh base from precomputed statistics (no recalibration): the
    statistics stages of ``init_adapters`` are swapped for the precomputed ones, everything after runs as is."""
    saved = api.collect_candidates, api.plan, api.collect_covariance
    try:
        api.collect_candidates = lambda *a, **k: []
        api.plan = lambda _c, targets, config, use_rslora=False: decide(cands, scores, targets, config,
                                                                        use_rslora=use_rslora, **choices)
        api.collect_covariance = lambda *a, **k: corda_stats
        config = corda_fast.CordaConfig(plus=pconf, show_progress=False)
        pm, report = corda_fast.init_adapters(load_base(model_dir), batches, mode=mode, rank=args.rank,
                                              lora_alpha=args.rank, target_modules=TARGETS, return_report=True,
                                              corda_config=config, streaming=False)
    finally:
        api.collect_candidates, api.plan, api.collect_covariance = saved
    return pm, report


def fine_tune(pm, data, args, seed) -> dict:
    t = time.perf_counter()
    losses = train(pm, data, args, seed)
    after = evaluate(pm, data)
    q = max(1, len(losses) // 3)  # step 1 is the same for every method (the model at init is the original)
    return {"seed": seed, "losses": losses, "early_loss": statistics.mean(losses[1:1 + q]),
            "final_loss": statistics.mean(losses[-q:]), **after, "seconds": round(time.perf_counter() - t, 1)}


def sorted_windows(ids, n, length, rng):
    starts = sorted(rng.randrange(0, len(ids) - length) for _ in range(n))
    return [ids[s:s + length] for s in starts]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--train-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--modes", nargs="+", default=["kpm", "ipm"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 steps, tiny calibration")
    p.add_argument("--out", default=os.path.join(HERE, "results", "ablation_plus.json"))
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.calib_samples, args.calib_len, args.eval_windows = [0], 5, 16, 64, 2
        args.out = args.out.replace(".json", "_quick.json")
    t_start = time.perf_counter()
    torch.manual_seed(0)

    from transformers import AutoTokenizer

    model_dir = materialize_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    k_train, k_eval = split_tokens(tok, knowledge_text(), 2_000_000)
    t_train, t_eval = split_tokens(tok, task_text(), 2_000_000)
    data = {"knowledge_eval": batches_of(consecutive(k_eval, args.eval_windows, 256), 8),
            "task_eval": batches_of(consecutive(t_eval, args.eval_windows, 256), 8), "task_train": t_train}
    calib_batch = args.calib_samples // 8
    result = {"environment": environment(), "config": vars(args), "variants": {k: list(v) for k, v in VARIANTS.items()},
              "modes": {}, "lora": []}
    rng = random.Random(1000)
    batches = {"knowledge": batches_of(sorted_windows(k_train, args.calib_samples, args.calib_len, rng), calib_batch),
               "task": batches_of(sorted_windows(t_train, args.calib_samples, args.calib_len, rng), calib_batch)}
    base = load_base(model_dir)
    lora_spec, cfg = api.configure(mode="kpm", rank=args.rank, lora_alpha=args.rank, target_modules=TARGETS,
                                   corda_config=corda_fast.CordaConfig(show_progress=False))
    targets = resolve_targets(base, lora_spec)
    t = time.perf_counter()
    groups = {src: collect_candidates(base, b, 8, cfg, targets) for src, b in batches.items()}
    result["calibration_seconds"] = round(time.perf_counter() - t, 1)
    print(f"calibrated both sources in {result['calibration_seconds']} s", flush=True)
    from peft import LoraConfig, get_peft_model

    for seed in args.seeds:
        torch.manual_seed(seed)
        pm = get_peft_model(load_base(model_dir), LoraConfig(r=args.rank, lora_alpha=args.rank,
                                                              target_modules=TARGETS, init_lora_weights=True))
        result["lora"].append(fine_tune(pm, data, args, seed))
        print(f"lora seed {seed}: {result['lora'][-1]['task_nll']:.4f} {result['lora'][-1]['knowledge_ppl']:.3f}",
              flush=True)
    for mode in args.modes:
        own_src, other_src = ("knowledge", "task") if mode == "kpm" else ("task", "knowledge")
        own, other = groups[own_src], groups[other_src]
        res = {"plans": {}, "runs": {}, "score_seconds": {}}
        result["modes"][mode] = res

        def run_seeds(name, pm):
            """Fine-tune one initialisation once per seed, from the same initial adapter."""
            init_state = {k: v.clone() for k, v in pm.state_dict().items() if "lora_" in k}
            runs = []
            for seed in args.seeds:
                pm.load_state_dict(init_state, strict=False)
                runs.append(fine_tune(pm, data, args, seed))
                r = runs[-1]
                print(f"  {mode} {name} seed {seed}: task {r['task_nll']:.4f} ppl {r['knowledge_ppl']:.3f} early "
                      f"{r['early_loss']:.4f} final {r['final_loss']:.4f} ({r['seconds']} s)", flush=True)
            return runs

        pm, rep = build(model_dir, mode, batches[own_src], args, None, None, None, {},
                        corda_stats=merge(own, list(range(8))))
        res["runs"]["corda"] = run_seeds("corda", pm)
        del pm
        scored = {}
        done = {}  # plan signature -> variant trained with it
        for name in args.variants:
            set_name, change, choices, trained = VARIANTS[name]
            if set_name not in scored:
                cands, prov = candidate_set(set_name, own, other)
                t = time.perf_counter()
                scored[set_name] = (cands, prov, score_candidates(cands, targets, cfg.replace(
                    mode=mode, plus=corda_fast.PlusConfig(candidates=len(cands)))))
                res["score_seconds"][set_name] = round(time.perf_counter() - t, 1)
            cands, prov, scores = scored[set_name]
            pconf = corda_fast.PlusConfig(candidates=len(cands), **change)
            pl = decide(cands, scores, targets, cfg.replace(mode=mode, plus=pconf), **choices)
            summary = plan_summary(pl, prov, res["plans"].get("default"))
            res["plans"][name] = summary
            print(f"  {mode} {name}: ranks {summary['rank_min']}..{summary['rank_max']}, same candidate / rank as "
                  f"default {summary.get('same_candidate_as_default')} / {summary.get('same_rank_as_default')}",
                  flush=True)
            if not trained:
                continue
            sig = json.dumps(summary["signature"])
            if sig in done:
                res["runs"][name] = [{**r, "same_plan_as": done[sig]} for r in res["runs"][done[sig]]]
                continue
            pm, rep = build(model_dir, mode, batches[own_src], args, cands, scores, pconf, choices)
            res["runs"][name] = run_seeds(name, pm)
            done[sig] = name
            del pm
        result["seconds_total"] = round(time.perf_counter() - t_start, 1)
        with open(args.out, "w") as f:  # after every mode: a partial run is still readable
            json.dump(result, f, indent=1)
    result["summary"] = summarize(result)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.out.replace(".json", ".png"))
    print(markdown(result))


def summarize(result: dict) -> dict:
    """Per mode and method: median (min-max) over seeds of every measure, and the plan facts."""
    out = {}
    for mode, res in result["modes"].items():
        rows = {}
        for name in ["lora", "corda"] + [v for v in result["variants"] if v in res["plans"]]:
            runs = result["lora"] if name == "lora" else res["runs"].get(name, [])
            row = {m: spread([r[m] for r in runs]) for m in ("task_nll", "knowledge_ppl", "early_loss", "final_loss")
                   } if runs else {}
            if name in res["plans"]:
                p = res["plans"][name]
                row["plan"] = {k: p[k] for k in ("rank_min", "rank_max", "rank_by_kind", "candidates_chosen")}
                for k in ("same_candidate_as_default", "same_rank_as_default", "layers"):
                    if k in p:
                        row["plan"][k] = p[k]
                if runs and "same_plan_as" in runs[0]:
                    row["same_plan_as"] = runs[0]["same_plan_as"]
            rows[name] = row
        out[mode] = rows
    return out


def markdown(result: dict) -> str:
    s = result.get("summary") or summarize(result)
    c = result["config"]

    rows = []
    for mode, table in s.items():
        if mode == "kpm":
            rows += ["| KPM (knowledge-calibrated) | task NLL ↓ | knowledge ppl ↓ | ranks (min–max) | same candidate / "
                     "rank as default |", "|---|---:|---:|---:|---:|"]
        else:
            rows += ["", "| IPM (task-calibrated) | early loss ↓ | final loss ↓ | task NLL ↓ | knowledge ppl | "
                     "ranks (min–max) | same candidate / rank as default |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, r in table.items():
            plan = r.get("plan", {})
            ranks = f"{plan['rank_min']}–{plan['rank_max']}" if plan else "uniform"
            same = (f"{plan['same_candidate_as_default']} / {plan['same_rank_as_default']} of {plan['layers']}"
                    if "same_candidate_as_default" in plan else "")
            label = name if r.get("task_nll") else f"{name} (plan only)"
            if r.get("same_plan_as"):
                label += f" (= {r['same_plan_as']}'s plan)"
            if mode == "kpm":
                rows.append(f"| {label} | {cell(r.get('task_nll'), '.4f')} | {cell(r.get('knowledge_ppl'), '.3f')} | "
                            f"{ranks} | {same} |")
            else:
                rows.append(f"| {label} | {cell(r.get('early_loss'), '.4f')} | {cell(r.get('final_loss'), '.4f')} | "
                            f"{cell(r.get('task_nll'), '.4f')} | {cell(r.get('knowledge_ppl'), '.1f')} | {ranks} | "
                            f"{same} |")
    env = result["environment"]
    rows.append(f"\nSmolLM2-135M-Instruct (float32), rank {c['rank']} budget on 7 projections, alpha = rank; "
                f"calibration {c['calib_samples']} × {c['calib_len']} tokens per source in 8 batches; "
                f"{c['steps']} AdamW steps (lr {c['lr']}, batch {c['batch_size']} × {c['train_len']} tokens); "
                f"median (min–max) over fine-tuning seeds {c['seeds']} (data order; LoRA's A) from one calibration "
                f"draw; {env['cpu_count']} CPUs, torch {env['torch']}, peft "
                f"{env['peft']}, commit {env['corda_fast_commit']}, {env['date']}; "
                f"{result['seconds_total']:.0f} s in all.")
    return "\n".join(rows)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {  # mode: (x measure, y measure, x label, y label)
        "kpm": ("task_nll", "knowledge_ppl", "task NLL after fine-tuning (lower = learned more)",
                "knowledge perplexity after fine-tuning (lower = forgot less)"),
        "ipm": ("early_loss", "final_loss", "early training loss (lower = faster start)", "final training loss"),
    }
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, (mode, (mx, my, lx, ly)) in zip(axes, panels.items()):
        for name, r in result["summary"].get(mode, {}).items():
            if not r.get(mx):
                continue
            x, y = r[mx], r[my]
            ax.errorbar(x["median"], y["median"], xerr=[[x["median"] - x["min"]], [x["max"] - x["median"]]],
                        yerr=[[y["median"] - y["min"]], [y["max"] - y["median"]]], fmt="o", label=name)
        ax.set_xlabel(lx)
        ax.set_ylabel(ly)
        ax.set_title(f"{mode.upper()}: median and min-max over seeds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
