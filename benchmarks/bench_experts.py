"""One MoE layer's experts with 8 / 32 / 128 experts: calibration and decomposition time, batched against a
per-expert loop, side by side in one run.

The model is a one-block Qwen3-MoE (hidden 256, expert width 128, top-8 routing, random weights) whose experts
(``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``) are the only targets; calibration runs 16 batches of
4 × 128 tokens.

- calibrate, batched: corda_fast's routed statistics (one sort of the (token, expert) pairs per call, one host sync).
- calibrate, loop: the same statistics gathered the way an eager experts loop finds its tokens — per expert a
  ``nonzero`` over the routing (one host sync per expert per call) — then the same accumulation.
- decompose, batched: ``stages.decompose`` over every expert at once (same-shaped experts together; the native
  batched kernel where it is registered, else the reference path spread over the cores).
- decompose, loop: ``stages.decompose`` called once per expert.

Median (min–max) over ``--repeats`` interleaved rounds; the ratio is loop / batched.

    python benchmarks/bench_experts.py              # ~3 min on 2 cores
    python benchmarks/bench_experts.py --repeats 1 --experts 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import cell, environment, spread  # noqa: E402

PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def moe_model(experts: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=experts,
                         num_experts_per_tok=8, vocab_size=1000, max_position_embeddings=256)
    return Qwen3MoeForCausalLM(cfg).eval()


DEVICE = torch.device("cpu")


def loader():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 1000, (4, 128), generator=g).to(DEVICE) for _ in range(16)]


def _loop_routed(self, acc, x, sample, n_seq, chosen):
    """The per-expert loop: each expert's tokens found with its own nonzero (a host sync each)."""
    from corda_fast import experts as ex

    for e in range(self.num_experts):
        if e not in self.up and e not in self.down:
            continue
        tok = (chosen == e).any(-1).nonzero().squeeze(1)
        if not tok.numel():
            continue
        xe, se = x.index_select(0, tok), sample.index_select(0, tok)
        samples = int(torch.unique(se).numel())
        if e in self.up:
            acc.add_rows(self.up[e], xe, se, n_seq, samples, tok.numel())
        if e in self.down:
            acc.add_rows(self.down[e], ex.intermediate(self.module, xe, e), se, n_seq, samples, tok.numel())


def calibrate(model, loop: bool):
    from corda_fast import CordaConfig, LoraSpec
    from corda_fast import calibrate as cal
    from corda_fast.stages import collect_covariance

    original = cal.ExpertTap._add_routed
    if loop:
        cal.ExpertTap._add_routed = _loop_routed
    try:
        data = loader()
        _sync()
        t = time.perf_counter()
        stats = collect_covariance(model, data, CordaConfig(show_progress=False),
                                   LoraSpec(target_modules=[], target_parameters=PARAMS))
        _sync()
        return time.perf_counter() - t, stats
    finally:
        cal.ExpertTap._add_routed = original


def decompose(model, stats, loop: bool):
    import copy

    from corda_fast import CordaConfig, LoraSpec
    from corda_fast.stages import decompose as dec
    from corda_fast.stages import resolve_targets

    targets = resolve_targets(model, LoraSpec(r=8, target_modules=[], target_parameters=PARAMS))
    config = CordaConfig(show_progress=False)
    _sync()
    t = time.perf_counter()
    if loop:
        out = {}
        keys = stats.layer_keys()
        for target in targets:
            out.update(dec(stats.subset([keys[target.name]]), [target], config))
    else:
        out = dec(copy.copy(stats), targets, config)
    _sync()
    return time.perf_counter() - t, out


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def run(experts: int, repeats: int) -> dict:
    model = moe_model(experts).to(DEVICE)
    times = {k: [] for k in ("calibrate_batched", "calibrate_loop", "decompose_batched", "decompose_loop")}
    for _ in range(repeats):
        for loop in (False, True):
            seconds, stats = calibrate(model, loop)
            times["calibrate_loop" if loop else "calibrate_batched"].append(seconds)
        for loop in (False, True):
            seconds, _ = decompose(model, stats, loop)
            times["decompose_loop" if loop else "decompose_batched"].append(seconds)
    from corda_fast import ops

    return {"experts": experts, "statistics": len(stats.sums), "kernel": ops.choose("batched_decompose", DEVICE),
            **{k: spread(v) for k, v in times.items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join(HERE, "results", "experts_cpu.json"))
    args = p.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    rows = []
    for n in args.experts:
        rows.append(run(n, args.repeats))
        print(rows[-1], flush=True)
    env = environment()
    if DEVICE.type == "cuda":
        env["device"] = torch.cuda.get_device_name(DEVICE)
    result = {"environment": env, "repeats": args.repeats, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))


def markdown(result: dict) -> str:
    out = ["| experts | statistics | calibrate batched s | calibrate loop s | loop / batched | decompose batched s | "
           "decompose loop s | loop / batched |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        out.append(f"| {r['experts']} | {r['statistics']} | {cell(r['calibrate_batched'], '.2f')} | "
                   f"{cell(r['calibrate_loop'], '.2f')} | "
                   f"{r['calibrate_loop']['median'] / r['calibrate_batched']['median']:.2f}x | "
                   f"{cell(r['decompose_batched'], '.2f')} | {cell(r['decompose_loop'], '.2f')} | "
                   f"{r['decompose_loop']['median'] / r['decompose_batched']['median']:.2f}x |")
    env = result["environment"]
    out.append(f"\n{env.get('device', 'cpu')}: one Qwen3-MoE block, hidden 256, expert width 128, top-8, "
               "16 × 4 × 128 tokens, rank 8, KPM defaults; "
               f"median (min–max) over {result['repeats']} interleaved rounds, decomposition kernel "
               f"`{result['rows'][0]['kernel']}`; {env['cpu_count']} CPUs, torch {env['torch']}, commit "
               f"{env['corda_fast_commit']}, {env['date']}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
