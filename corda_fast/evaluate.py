"""What training changed: a trained model against its base, on knowledge it should keep and on the task it learnt.

:func:`evaluate` compares two causal LMs on batches from :func:`corda_fast.calibration_batches` sources:

- **knowledge perplexity** — ``exp`` of the mean next-token NLL over the knowledge source's real tokens, base and
  trained, and their ratio (the drift: > 1 is forgetting);
- **KL to the base** — the mean over predicted tokens of ``KL(p_base ‖ p_trained)`` of the next-token distributions,
  on the knowledge source (held-out text: how far the trained model moved where it should not have);
- **task loss** — the mean NLL on the task source (its labels when a mask applies: response tokens only), base and
  trained;
- **intruder dimensions** per adapted layer — of the trained weight's top ``k`` left singular vectors, how many have
  a cosine similarity below ``threshold`` with every left singular vector of the base weight (directions training
  introduced rather than reweighted; LoRA-style updates are known to create them, full fine-tuning much less).

The trained model may be a merged model, a converted LoRA on the original base, or the residual base with the
trained adapter: :func:`load_trained` takes any of them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)


def load_trained(trained: str, adapter: Optional[str] = None, base: Optional[str] = None, dtype=torch.float32):
    """The trained model, plain (adapters merged): ``trained`` a merged model folder; or a model folder (the residual
    base) with ``adapter``; or an adapter folder alone, loaded onto ``base`` (a converted LoRA for the original
    model) or else onto the model its ``adapter_config.json`` names."""
    from transformers import AutoModelForCausalLM

    if os.path.isfile(os.path.join(trained, "adapter_config.json")):
        adapter, trained = trained, None
    if adapter is None:
        return AutoModelForCausalLM.from_pretrained(trained, dtype=dtype).eval()
    from peft import PeftModel

    if trained is None:
        with open(os.path.join(adapter, "adapter_config.json")) as f:
            trained = base or json.load(f).get("base_model_name_or_path")
        if not trained or not os.path.isdir(trained):
            raise ValueError(f"adapter '{adapter}' names no local base model ({trained!r}): pass the base folder.")
    model = AutoModelForCausalLM.from_pretrained(trained, dtype=dtype)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


@torch.no_grad()
def _predicted(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-probabilities (n, vocab), targets (n,))`` of the predicted tokens of a batch: a token is predicted when
    it and the one before are real (``attention_mask``) and its label is not -100."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    keep = (batch["attention_mask"][:, 1:] != 0) & (batch["attention_mask"][:, :-1] != 0)
    if "labels" in batch:
        keep &= batch["labels"][:, 1:] != -100
    return torch.log_softmax(logits[keep], -1), batch["input_ids"][:, 1:][keep]


@torch.no_grad()
def compare_on(base: nn.Module, trained: nn.Module, batches: list[dict]) -> dict:
    """Both models on the same batches, one batch at a time (no ``tokens × vocab`` array kept): mean NLL of each and
    the mean ``KL(p_base ‖ p_trained)`` over the predicted tokens."""
    nll_b = nll_t = kl = 0.0
    n = 0
    for batch in batches:
        lb, target = _predicted(base, batch)
        lt, _ = _predicted(trained, batch)
        idx = target.unsqueeze(1)
        nll_b -= float(lb.gather(1, idx).sum())
        nll_t -= float(lt.gather(1, idx).sum())
        kl += float((lb.exp() * (lb - lt)).sum())
        n += target.numel()
    n = max(n, 1)
    return {"tokens": n, "nll_base": nll_b / n, "nll_trained": nll_t / n, "kl_to_base": kl / n}


@torch.no_grad()
def intruder_dimensions(w_base: torch.Tensor, w_trained: torch.Tensor, k: int = 10, threshold: float = 0.5) -> int:
    """How many of ``w_trained``'s top ``k`` left singular vectors have ``|cos| < threshold`` with every left singular
    vector of ``w_base`` (both ``(d_out, d_in)``, compared in float64)."""
    u_b = torch.linalg.svd(w_base.double(), full_matrices=False)[0]
    u_t = torch.linalg.svd(w_trained.double(), full_matrices=False)[0][:, :k]
    return int(((u_t.mT @ u_b).abs().amax(1) < threshold).sum())


def _changed_layers(base: nn.Module, trained: nn.Module, k: int, threshold: float) -> dict[str, dict]:
    """``{layer: {"intruders", "relative_change"}}`` for every linear (or Conv1D) weight that training changed."""
    trained_params = dict(trained.named_parameters())
    out = {}
    for name, p in base.named_parameters():
        q = trained_params.get(name)
        if q is None or p.dim() != 2 or not name.endswith(".weight") or torch.equal(p, q):
            continue
        module = base.get_submodule(name[: -len(".weight")])
        if isinstance(module, nn.Embedding):
            continue
        conv1d = type(module).__name__ == "Conv1D"
        wb, wt = (p.mT, q.mT) if conv1d else (p, q)
        out[name[: -len(".weight")]] = {
            "intruders": intruder_dimensions(wb, wt, k, threshold),
            "relative_change": float((wt.double() - wb.double()).norm() / wb.double().norm()),
        }
    return out


def evaluate(base: nn.Module, trained: nn.Module, knowledge: list[dict], task: list[dict], k: int = 10,
             threshold: float = 0.5) -> dict:
    """The report of the module docstring for two models (same tokenizer) on knowledge and task batches."""
    kn, ta = compare_on(base, trained, knowledge), compare_on(base, trained, task)
    ppl_b, ppl_t = math.exp(kn["nll_base"]), math.exp(kn["nll_trained"])
    layers = _changed_layers(base, trained, k, threshold)
    return {
        "knowledge": {"tokens": kn["tokens"], "perplexity_base": ppl_b, "perplexity_trained": ppl_t,
                      "perplexity_ratio": ppl_t / ppl_b, "kl_to_base": kn["kl_to_base"]},
        "task": {"tokens": ta["tokens"], "loss_base": ta["nll_base"], "loss_trained": ta["nll_trained"],
                 "kl_to_base": ta["kl_to_base"]},
        "intruders": {"k": k, "threshold": threshold, "layers": layers,
                      "total": sum(v["intruders"] for v in layers.values())},
    }


def report_table(r: dict) -> str:
    """The report as text."""
    kn, ta, it = r["knowledge"], r["task"], r["intruders"]
    lines = [
        f"knowledge : perplexity {kn['perplexity_base']:.3f} -> {kn['perplexity_trained']:.3f} "
        f"(x{kn['perplexity_ratio']:.4f}), KL to base {kn['kl_to_base']:.3g} nats/token ({kn['tokens']} tokens)",
        f"task      : loss {ta['loss_base']:.4f} -> {ta['loss_trained']:.4f} ({ta['tokens']} tokens)",
        f"intruders : {it['total']} in {len(it['layers'])} changed layers (top {it['k']} singular vectors, "
        f"|cos| < {it['threshold']} with every base one)",
    ]
    by_kind: dict[str, list[int]] = {}
    for name, v in it["layers"].items():
        by_kind.setdefault(name.split(".")[-1], []).append(v["intruders"])
    lines += [f"            {kind:10s} {sum(v) / len(v):.2f} per layer (max {max(v)})" for kind, v in by_kind.items()]
    return "\n".join(lines)


def plot(r: dict, path: str) -> None:
    """Intruder dimensions per changed layer (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["intruders"]["layers"])
    values = [r["intruders"]["layers"][n]["intruders"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.08), 3))
    ax.bar(range(len(names)), values)
    ax.set_xlabel("changed layer (model order)")
    ax.set_ylabel(f"intruders in top {r['intruders']['k']}")
    kn = r["knowledge"]
    ax.set_title(f"knowledge perplexity x{kn['perplexity_ratio']:.3f}, KL {kn['kl_to_base']:.3g}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
