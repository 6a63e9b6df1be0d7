"""Fused low-rank training layer vs PEFT's ``lora.Linear`` and vs the frozen base linear alone.

1. Layer: forward + backward (``y = layer(x)``, ``y.backward(dy)``; gradients for x and the adapter) of
   - ``base``: the frozen ``nn.Linear`` alone (forward + input gradient; the floor),
   - ``peft``: PEFT's ``lora.Linear`` as ``get_peft_model`` builds it (16-bit models: float32 adapters),
   - ``fused``: the same layer after ``corda_fast.fuse`` (Triton on CUDA, torch path on CPU).
2. Training step: one AdamW step of a random Llama with LoRA on all linear layers, PEFT vs fused:
   tokens/s and memory.

Time: median (min–max) over ``--repeats`` rounds, the variants interleaved in each round (CUDA: synchronised
wall time). Memory: on CUDA the peak allocated above the state before the step; everywhere the bytes of
activations saved for backward (unique storages, parameters excluded; a deterministic count).

    python benchmarks/bench_fused.py                                   # CPU defaults → results/fused_cpu.json
    python benchmarks/bench_fused.py --device cuda --dtype bfloat16 \\
        --shapes 4096x4096 4096x11008 11008x4096 --tokens 8192 16384 --ranks 16 64 128 \\
        --train-hidden 2048 --train-layers 8 --train-batch 4 --train-seq 2048 --out results/fused_cuda.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import corda_fast  # noqa: E402

from common import environment  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SavedBytes:
    """Bytes of the tensors autograd saves for backward (unique storages; parameters and their views excluded)."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen = {}

    def pack(self, t):
        st = t.untyped_storage()
        if st.data_ptr() not in self.params:
            self.seen[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    @property
    def mib(self):
        return sum(self.seen.values()) / 2 ** 20


def measure(fns: dict, repeats: int, device) -> dict:
    """Median/min/max ms per named callable, interleaved; each warmed up twice first."""
    for fn in fns.values():
        fn(), fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v), "max_ms": 1e3 * max(v)}
            for k, v in times.items()}


def peak_mib(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def layer_rows(shapes, tokens_list, ranks, dtype, device, repeats):
    from peft import LoraConfig, get_peft_model

    rows = []
    for shape in shapes:
        k, n = (int(v) for v in shape.split("x"))
        for tokens in tokens_list:
            for r in ranks:
                torch.manual_seed(0)
                base = nn.Sequential(nn.Linear(k, n, bias=False)).to(device, dtype).requires_grad_(False)
                peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"],
                                                                      init_lora_weights=False))
                fused = copy.deepcopy(peft)
                corda_fast.fuse(fused)
                models = {"base": base, "peft": peft, "fused": fused}
                if device.type == "cuda":  # the same algebra through cuBLAS (addmm_), to judge the Triton kernel
                    models["fused_torch"] = copy.deepcopy(peft)
                    corda_fast.fuse(models["fused_torch"], backend="torch")
                x = torch.randn(tokens, k, device=device, dtype=dtype, requires_grad=True)
                dy = torch.randn(tokens, n, device=device, dtype=dtype)

                def step(model, x=x, dy=dy):
                    def run():
                        model(x).backward(dy)
                        x.grad = None
                        for p in model.parameters():
                            p.grad = None
                    return run

                fns = {name: step(m) for name, m in models.items()}
                timing = measure(fns, repeats, device)
                row = {"K": k, "N": n, "tokens": tokens, "rank": r, "dtype": str(dtype).replace("torch.", ""),
                       "adapter_dtype": str(peft.base_model.model[0].lora_A["default"].weight.dtype)}
                for name, m in models.items():
                    with SavedBytes(m) as sb:
                        y = m(x)
                    del y
                    row[name] = dict(timing[name], saved_mib=sb.mib, peak_mib=peak_mib(fns[name], device))
                row["fused_vs_peft_speedup"] = row["peft"]["median_ms"] / row["fused"]["median_ms"]
                row["fused_vs_base_time"] = row["fused"]["median_ms"] / row["base"]["median_ms"]
                row["peft_vs_base_time"] = row["peft"]["median_ms"] / row["base"]["median_ms"]
                if "fused_torch" in row:
                    row["fused_torch_vs_peft_speedup"] = row["peft"]["median_ms"] / row["fused_torch"]["median_ms"]
                print(f"K={k} N={n} tokens={tokens} r={r}: base {row['base']['median_ms']:.2f} ms, peft "
                      f"{row['peft']['median_ms']:.2f} ms, fused {row['fused']['median_ms']:.2f} ms "
                      f"(x{row['fused_vs_peft_speedup']:.2f} vs peft, {row['fused_vs_base_time']:.2f} of base); "
                      f"saved MiB peft {row['peft']['saved_mib']:.1f} fused {row['fused']['saved_mib']:.1f}",
                      flush=True)
                rows.append(row)
                del base, peft, fused, models, fns, x, dy
    return rows


def train_rows(hidden, layers, batch, seq, rank, dtype, device, repeats):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      vocab_size=4096, max_position_embeddings=max(seq, 256))
    base = LlamaForCausalLM(cfg).to(device, dtype)
    peft = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                           init_lora_weights=False))
    fused = copy.deepcopy(peft)
    corda_fast.fuse(fused)
    ids = torch.randint(0, 4096, (batch, seq), device=device)
    opts = {}

    def step(name, model):
        opt = opts.setdefault(name, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5))

        def run():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    models = {"peft": peft, "fused": fused}
    for m in models.values():
        m.train()
    fns = {name: step(name, m) for name, m in models.items()}
    timing = measure(fns, repeats, device)
    row = {"hidden": hidden, "layers": layers, "batch": batch, "seq": seq, "rank": rank,
           "dtype": str(dtype).replace("torch.", ""), "targets": "all-linear"}
    for name, m in models.items():
        with SavedBytes(m) as sb:
            loss = m(input_ids=ids, labels=ids).loss
        del loss
        row[name] = dict(timing[name], tokens_per_s=batch * seq / (timing[name]["median_ms"] / 1e3),
                         saved_mib=sb.mib, peak_mib=peak_mib(fns[name], device))
    row["fused_vs_peft_tokens_per_s"] = row["fused"]["tokens_per_s"] / row["peft"]["tokens_per_s"]
    row["fused_vs_peft_saved"] = row["fused"]["saved_mib"] / row["peft"]["saved_mib"]
    if row["peft"]["peak_mib"]:
        row["fused_vs_peft_peak"] = row["fused"]["peak_mib"] / row["peft"]["peak_mib"]
    print(f"train step hidden={hidden} layers={layers} {batch}x{seq} r={rank}: tokens/s peft "
          f"{row['peft']['tokens_per_s']:.0f} fused {row['fused']['tokens_per_s']:.0f} "
          f"(x{row['fused_vs_peft_tokens_per_s']:.2f}); saved MiB {row['peft']['saved_mib']:.1f} → "
          f"{row['fused']['saved_mib']:.1f}", flush=True)
    return [row]


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = ["| layer K×N | tokens | r | dtype (adapters) | base ms | PEFT ms | fused ms | fused vs PEFT | fused / base | "
             "saved MiB PEFT → fused |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    torch_col = any("fused_torch" in r for r in result["layer"])
    if torch_col:  # CUDA runs also time the fused algebra through cuBLAS
        lines[0] += " fused (cuBLAS path) vs PEFT |"
        lines[1] += "---:|"
    for r in result["layer"]:
        lines.append(f"| {r['K']}×{r['N']} | {r['tokens']} | {r['rank']} | {r['dtype']} ({r['adapter_dtype'][6:]}) | "
                     f"{r['base']['median_ms']:.2f} | {r['peft']['median_ms']:.2f} | {r['fused']['median_ms']:.2f} | "
                     f"{r['fused_vs_peft_speedup']:.2f}x | {r['fused_vs_base_time']:.2f} | "
                     f"{r['peft']['saved_mib']:.1f} → {r['fused']['saved_mib']:.1f} |"
                     + (f" {r['fused_torch_vs_peft_speedup']:.2f}x |" if torch_col else ""))
    lines += ["", "| training step (random Llama, LoRA all-linear) | PEFT tokens/s | fused tokens/s | ratio | "
              "saved MiB PEFT → fused | peak MiB PEFT → fused |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["train"]:
        peak = (f"{r['peft']['peak_mib']:.0f} → {r['fused']['peak_mib']:.0f}" if r["peft"]["peak_mib"] else "n/a (CPU)")
        lines.append(f"| hidden {r['hidden']}, {r['layers']} layers, {r['batch']}×{r['seq']} tokens, r={r['rank']}, "
                     f"{r['dtype']} | {r['peft']['tokens_per_s']:.0f} | {r['fused']['tokens_per_s']:.0f} | "
                     f"{r['fused_vs_peft_tokens_per_s']:.2f}x | {r['peft']['saved_mib']:.1f} → "
                     f"{r['fused']['saved_mib']:.1f} | {peak} |")
    lines.append(f"\n{env.get('device')}, {env.get('cpu_count')} CPUs, torch {env.get('torch')}, peft {env.get('peft')}, "
                 f"commit {env.get('corda_fast_commit')}, {env.get('date')}; median of {result['repeats']} interleaved "
                 "rounds (min–max in the JSON); fused backend: "
                 f"{result['backend']}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--shapes", nargs="+", default=["576x1536", "1536x576", "1024x1024"], help="KxN (in x out)")
    p.add_argument("--tokens", nargs="+", type=int, default=[2048])
    p.add_argument("--ranks", nargs="+", type=int, default=[16, 64])
    p.add_argument("--train-hidden", type=int, default=512)
    p.add_argument("--train-layers", type=int, default=4)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-seq", type=int, default=256)
    p.add_argument("--train-rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=os.path.join(HERE, "results", "fused_cpu.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    from corda_fast import ops

    env = environment()
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"environment": env, "repeats": args.repeats, "backend": ops.choose("lowrank_gemm", device), "args": vars(args)}
    result["layer"] = layer_rows(args.shapes, args.tokens, args.ranks, dtype, device, args.repeats)
    result["train"] = train_rows(args.train_hidden, args.train_layers, args.train_batch, args.train_seq,
                                 args.train_rank, dtype, device, args.repeats)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
