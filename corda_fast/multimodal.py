"""Image + text calibration batches for vision-language models, rendered by the model's own processor.

:func:`image_text_batches` (reached through ``calibration_batches(source, processor, image_column=...)``) renders
each row — an image (or several) with a text or a conversation — the way the model sees it in fine-tuning: the
processor's chat template where it has one, its image placeholder tokens expanded to the image's patches. Each batch
carries everything the processor returns (``pixel_values``, ``image_grid_thw``, ...) and ``labels`` that keep out of
the statistics the padding, the image tokens (unless ``include_image_tokens``) and, with ``mask``, the prompt or the
response. The model still sees every token: images change the text tokens' activations through attention.

Rows give images as PIL images, file paths or a datasets ``Image`` column (one or a list). Sequences are not
truncated (an image's tokens must stay whole) and ``concatenate`` does not apply; with ``mask`` the response is the
last assistant turn.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)


def _images(value: Any) -> list:
    """A row's image(s) as a list of RGB PIL images (PIL images, paths, or datasets' ``{"bytes" | "path"}``)."""
    from PIL import Image

    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, dict):
            if item.get("bytes") is not None:
                import io

                item = Image.open(io.BytesIO(item["bytes"]))
            else:
                item = item.get("path")
        if isinstance(item, str):
            item = Image.open(item)
        if not hasattr(item, "convert"):
            raise ValueError(f"cannot read an image from a value of type {type(item).__name__}: give PIL images, "
                             "file paths, or a datasets Image column.")
        out.append(item.convert("RGB"))
    return out


def _with_images(messages: list, n: int) -> list:
    """``messages`` with ``n`` image entries at the start of the first user turn unless some turn already has one
    (string contents become ``[{"type": "text", ...}]``)."""
    messages = copy.deepcopy(list(messages))
    if any(isinstance(m.get("content"), list) and any(c.get("type") == "image" for c in m["content"])
           for m in messages):
        return messages
    for m in messages:
        if m.get("role") == "user":
            content = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            m["content"] = [{"type": "image"} for _ in range(n)] + content
            return messages
    raise ValueError("a conversation without a user turn: nowhere to put its image.")


def _render(processor, row: dict, kind: str, cols: tuple, n_images: int, mask: Optional[str]) -> tuple[str, Optional[str]]:
    """``(text, prompt text or None)`` of one row: a text column keeps its own image placeholders, or gets them (as
    a user turn through the chat template where the processor has one, else the image token prepended); a
    conversation goes through the chat template; with ``mask`` the prompt is the conversation up to its last
    assistant turn with the generation prompt."""
    template = getattr(processor, "chat_template", None)
    token = getattr(processor, "image_token", None)
    if kind == "text":
        text = str(row[cols[0]])
        if token and token in text:
            return text, None
        if template is None:
            return " ".join([token or ""] * n_images) + " " + text, None
        messages = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, tokenize=False), None
    if kind == "pair":
        messages = [{"role": "user", "content": str(row[cols[0]])},
                    {"role": "assistant", "content": str(row[cols[1]])}]
    else:
        messages = list(row[cols[0]])
    if template is None:
        raise ValueError("the processor has no chat template to render conversations with: set "
                         "processor.chat_template, or calibrate on a text column.")
    messages = _with_images(messages, n_images)
    text = processor.apply_chat_template(messages, tokenize=False)
    prompt = None
    if mask is not None:
        last = max((k for k, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise ValueError(f"mask={mask!r} needs an assistant turn in every conversation.")
        prompt = processor.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
    return text, prompt


def image_token_id(processor) -> Optional[int]:
    tid = getattr(processor, "image_token_id", None)
    if tid is None and getattr(processor, "image_token", None):
        tid = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return tid


def image_text_batches(rows, processor, image_column: str, kind: str, cols: tuple, num_samples: int,
                       batch_size: int, mask: Optional[str], include_image_tokens: bool,
                       concatenate: bool = False) -> list[dict]:
    """Padded image + text batches (see the module docstring) of the first ``num_samples`` rows."""
    if not hasattr(processor, "image_processor"):
        raise ValueError(f"image_column={image_column!r} needs the model's processor (AutoProcessor), not a "
                         f"{type(processor).__name__}.")
    if concatenate:
        raise ValueError("concatenate=True packs token streams; image + text samples stay whole.")
    samples = []
    for row in rows:
        if image_column not in row:
            raise ValueError(f"image_column '{image_column}' is not a column (columns: {sorted(row)}).")
        images = _images(row[image_column])
        samples.append((images, *_render(processor, row, kind, cols, len(images), mask)))
        if len(samples) == num_samples:
            break
    if not samples:
        raise ValueError("the calibration data yielded no samples (an empty dataset).")
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "right"  # prompt lengths count from the left
    try:
        return [_batch(processor, samples[i:i + batch_size], mask, include_image_tokens)
                for i in range(0, len(samples), batch_size)]
    finally:
        tok.padding_side = side


def _batch(processor, chunk: list, mask: Optional[str], include_image_tokens: bool) -> dict:
    images = [im for s in chunk for im in s[0]]
    batch = dict(processor(images=images, text=[s[1] for s in chunk], return_tensors="pt", padding=True))
    ids, attn = batch["input_ids"], batch["attention_mask"]
    keep = attn != 0
    tid = image_token_id(processor)
    if tid is not None and not include_image_tokens:
        keep &= ids != tid
    if mask is not None:
        for r, (imgs, _, prompt) in enumerate(chunk):
            n = len(processor(images=imgs, text=[prompt], return_tensors="pt")["input_ids"][0])
            part = torch.zeros_like(keep[r])
            part[:n] = True  # the prompt's tokens
            keep[r] &= part if mask == "prompt" else ~part
    batch["labels"] = torch.where(keep, ids, torch.full_like(ids, -100))
    return batch
