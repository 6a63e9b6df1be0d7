"""Calibration batches from token sequences."""

from __future__ import annotations

from typing import Sequence

import torch


def pad_batches(sequences: Sequence, batch_size: int, pad_id: int = 0, side: str = "right") -> list[dict]:
    """Group token sequences into padded batches ``{"input_ids", "attention_mask"}`` (``(batch, longest)``).

    Args:
        sequences: 1-D token id tensors or lists, any lengths.
        batch_size: sequences per batch (the last batch may be smaller).
        pad_id: id written at padded positions (never enters a statistic: the mask is 0 there).
        side: ``"right"`` or ``"left"`` padding.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r}: expected 'right' or 'left'.")
    out = []
    for i in range(0, len(sequences), batch_size):
        chunk = [torch.as_tensor(s, dtype=torch.long) for s in sequences[i:i + batch_size]]
        longest = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), longest), dtype=torch.long)
        for j, s in enumerate(chunk):
            cols = slice(0, len(s)) if side == "right" else slice(longest - len(s), longest)
            ids[j, cols] = s
            mask[j, cols] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out
