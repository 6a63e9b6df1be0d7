"""Calibration batches: from Hugging Face datasets, local files, Hub names or plain lists, with chat templates,
prompt/response masks, packing and padding.

:func:`calibration_batches` turns a source into padded batches (``input_ids``, ``attention_mask``, and ``labels``
where a mask applies: -100 marks tokens left out of the statistics) that ``init_adapters`` takes as its loader;
:func:`pad_batches` pads token sequences. ``datasets`` is imported only when a source needs it.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

MASKS = (None, "prompt", "response")
_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
             ".arrow": "arrow"}
# (kind, columns) tried in order when no column is named
_AUTO = (("messages", ("messages",)), ("messages", ("conversations",)), ("text", ("text",)),
         ("pair", ("prompt", "response")), ("pair", ("prompt", "completion")), ("pair", ("instruction", "output")),
         ("pair", ("question", "answer")), ("pair", ("input", "output")))


def pad_batches(sequences: Sequence, batch_size: int, pad_id: int = 0, side: str = "right",
                labels: Optional[Sequence] = None) -> list[dict]:
    """Group token sequences into padded batches ``{"input_ids", "attention_mask"[, "labels"]}`` (``(batch,
    longest)``).

    Args:
        sequences: 1-D token id tensors or lists, any lengths.
        batch_size: sequences per batch (the last batch may be smaller).
        pad_id: id written at padded positions (never enters a statistic: the mask is 0 there).
        side: ``"right"`` or ``"left"`` padding.
        labels: optional per-token labels of each sequence (padded with -100).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r}: expected 'right' or 'left'.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected an int >= 1.")
    out = []
    for i in range(0, len(sequences), batch_size):
        chunk = [torch.as_tensor(s, dtype=torch.long) for s in sequences[i:i + batch_size]]
        longest = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), longest), dtype=torch.long)
        lab = torch.full((len(chunk), longest), -100, dtype=torch.long) if labels is not None else None
        for j, s in enumerate(chunk):
            cols = slice(0, len(s)) if side == "right" else slice(longest - len(s), longest)
            ids[j, cols] = s
            mask[j, cols] = 1
            if lab is not None:
                lab[j, cols] = torch.as_tensor(labels[i + j], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask}
        if lab is not None:
            batch["labels"] = lab
        out.append(batch)
    return out


# ---------------------------------------------------------------------------------------------------- sources
def _from_list(source: list):
    import datasets

    if not source:
        raise ValueError("the calibration source is an empty list.")
    if all(isinstance(x, str) for x in source):
        return datasets.Dataset.from_dict({"text": list(source)})
    if all(isinstance(x, (list, tuple)) for x in source):
        return datasets.Dataset.from_dict({"messages": [list(c) for c in source]})
    if all(isinstance(x, dict) for x in source):
        return datasets.Dataset.from_list(list(source))
    raise ValueError("a calibration list must hold strings, chat conversations (lists of {'role', 'content'}) or "
                     "row dicts.")


def _pick_split(ds, split: Optional[str]):
    names = list(ds.keys())
    if split is None:
        if len(names) != 1:
            raise ValueError(f"the dataset has splits {names}: pass split=... to choose one.")
        split = names[0]
    if split not in names:
        raise ValueError(f"split {split!r} is not in the dataset (splits: {names}).")
    return ds[split]


def _from_path(path: str, split: Optional[str]):
    import datasets

    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except Exception as exc:
            raise ValueError(f"'{path}' is not a dataset folder written by save_to_disk ({exc}).") from None
        return _pick_split(ds, split) if isinstance(ds, datasets.DatasetDict) else ds
    ext = os.path.splitext(path)[1].lower()
    if ext not in _BUILDERS:
        raise ValueError(f"calibration file '{path}': unknown extension {ext!r}; expected one of {sorted(_BUILDERS)}.")
    try:
        ds = datasets.load_dataset(_BUILDERS[ext], data_files=path, split="train")
    except Exception as exc:
        cause = exc.__cause__ or exc.__context__ or exc
        detail = "not UTF-8 text" if isinstance(cause, UnicodeDecodeError) else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"calibration file '{path}' cannot be read as {_BUILDERS[ext]} ({detail}).") from None
    if len(ds) == 0:
        raise ValueError(f"calibration file '{path}' holds no rows.")
    return ds


def _from_hub(name: str, split: Optional[str]):
    import datasets

    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as exc:
        raise ValueError(f"dataset '{name}' could not be loaded from the Hugging Face Hub ({type(exc).__name__}: "
                         f"{str(exc)[:200]}). Offline, or without access: pass a local copy instead — a folder "
                         "written by Dataset.save_to_disk, or .jsonl / .parquet / .csv / .txt / .arrow files.") from None
    return _pick_split(ds, split) if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)) else ds


def load_source(source: Any, split: Optional[str] = None):
    """A ``datasets.Dataset`` / ``IterableDataset`` for any calibration source (see :func:`calibration_batches`)."""
    import datasets

    if isinstance(source, (list, tuple)):
        return _from_list(list(source))
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return _pick_split(source, split)
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.exists(path):
            return _from_path(path, split)
        if os.path.splitext(path)[1].lower() in _BUILDERS or path.startswith((".", "/", "~")):
            raise ValueError(f"calibration data '{path}' does not exist.")
        return _from_hub(path, split)
    raise TypeError(f"cannot calibrate from a {type(source).__name__}: give a datasets.Dataset / DatasetDict / "
                    "IterableDataset, a local path, a Hub dataset name, or a list of strings or conversations.")


def choose_columns(columns: Sequence[str], text_column=None, messages_column=None, prompt_column=None,
                   response_column=None) -> tuple[str, tuple]:
    """``(kind, columns)``: ``("text", (c,))``, ``("messages", (c,))`` or ``("pair", (prompt, response))``. Named
    columns must exist; with none named the obvious one is taken (logged), and an ambiguous set is an error."""
    named = [x for x in (text_column, messages_column, prompt_column, response_column) if x is not None]
    missing = [c for c in named if c not in columns]
    if missing:
        raise ValueError(f"column(s) {missing} not in the dataset (columns: {list(columns)}).")
    if text_column is not None:
        return "text", (text_column,)
    if messages_column is not None:
        return "messages", (messages_column,)
    if (prompt_column is None) != (response_column is None):
        raise ValueError("prompt_column and response_column go together.")
    if prompt_column is not None:
        return "pair", (prompt_column, response_column)
    found = [(kind, cols) for kind, cols in _AUTO if all(c in columns for c in cols)]
    kinds = {kind for kind, _ in found}
    if not found:
        raise ValueError(f"no calibration column among {list(columns)}: name one (text_column=, messages_column=, "
                         "or prompt_column= with response_column=).")
    if len(kinds) > 1:
        raise ValueError(f"ambiguous calibration columns {[c for _, cs in found for c in cs]} (columns: "
                         f"{list(columns)}): name the one to use (text_column=, messages_column=, or prompt_column= "
                         "with response_column=).")
    kind, cols = found[0]
    logger.info("calibrating on column(s) %s (%s)", list(cols), kind)
    return kind, cols


# ---------------------------------------------------------------------------------------------------- rendering
def _render(row: dict, kind: str, cols: tuple, tokenizer) -> tuple[str, Optional[list], bool]:
    """``(text, response character spans or None, text already holds special tokens)`` of one row."""
    template = getattr(tokenizer, "chat_template", None)
    if kind == "text":
        return str(row[cols[0]]), None, False
    if kind == "pair":
        prompt, response = str(row[cols[0]]), str(row[cols[1]])
        if template is None:  # no chat template: the two concatenated
            sep = "" if not prompt or prompt[-1].isspace() else "\n"
            return prompt + sep + response, [(len(prompt + sep), len(prompt + sep + response))], False
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    else:
        messages = list(row[cols[0]])
        if template is None:
            raise ValueError(f"the tokenizer has no chat template to render the '{cols[0]}' column with: set "
                             "tokenizer.chat_template, or calibrate on a text column.")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, m in enumerate(messages):  # each assistant turn: from the end of its generation prompt to its end
        if m.get("role") != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)) if k else 0
        end = len(tokenizer.apply_chat_template(messages[:k + 1], tokenize=False))
        spans.append((start, end))
    return text, spans, True


def _tokenize(tokenizer, text: str, spans: Optional[list], templated: bool) -> tuple[list, list]:
    """``(token ids, per-token "is response" flags)``."""
    try:
        enc = tokenizer(text, add_special_tokens=not templated, return_offsets_mapping=spans is not None)
    except NotImplementedError:  # slow (Python) tokenizers have no character offsets
        raise ValueError("finding the prompt and response tokens needs a fast tokenizer (character offsets); load "
                         "it with AutoTokenizer.from_pretrained(..., use_fast=True).") from None
    ids = list(enc["input_ids"])
    if spans is None:
        return ids, [True] * len(ids)
    flags = [any(a <= off[0] < b for a, b in spans) and off[1] > off[0] for off in enc["offset_mapping"]]
    return ids, flags


# ---------------------------------------------------------------------------------------------------- the batches
def calibration_batches(source: Any, tokenizer, *, split: Optional[str] = None, text_column: Optional[str] = None,
                        messages_column: Optional[str] = None, prompt_column: Optional[str] = None,
                        response_column: Optional[str] = None, num_samples: int = 256, max_seq_length: int = 2048,
                        batch_size: int = 8, concatenate: bool = False, shuffle: bool = True, seed: int = 233,
                        mask: Optional[str] = None, image_column: Optional[str] = None,
                        include_image_tokens: bool = False) -> list[dict]:
    """Padded calibration batches (``input_ids``, ``attention_mask``, and ``labels`` where ``mask`` applies) for
    ``init_adapters``.

    Args:
        source: a ``datasets.Dataset`` / ``DatasetDict`` (with ``split``) / ``IterableDataset`` (the first
            ``num_samples``); a local path — a folder written by ``save_to_disk``, or a ``.txt`` / ``.json`` /
            ``.jsonl`` / ``.parquet`` / ``.csv`` / ``.arrow`` file; a Hub dataset name (``"name"`` or
            ``"name:config"``, with ``split``); or a list of strings or of chat conversations.
        tokenizer: the model's tokenizer (a chat template renders ``messages`` and prompt/response pairs).
        text_column / messages_column / prompt_column + response_column: the data to calibrate on; none named: the
            obvious column (``messages``, ``text``, ``prompt``/``response``, ...), logged; ambiguous: an error.
        num_samples: samples (``concatenate``: windows) to return; fewer available: a warning with the real count.
        max_seq_length: tokens per sample (truncated) or per window.
        concatenate: pack the token stream of the (shuffled) rows into ``max_seq_length`` windows.
        shuffle / seed: which rows are used; the same arguments give the same batches.
        mask: ``None`` — every real token enters the statistics; ``"response"`` — only response (assistant)
            tokens (prompt tokens get ``labels == -100``); ``"prompt"`` — only prompt tokens.
        image_column / include_image_tokens: image + text rows for a vision-language model, ``tokenizer`` being its
            processor; image tokens enter no statistic unless ``include_image_tokens`` (``corda_fast.multimodal``).
    Returns:
        a list of dicts of ``(batch, longest)`` tensors, right-padded.
    """
    if mask not in MASKS:
        raise ValueError(f"mask={mask!r}: expected one of {MASKS}.")
    for name, value in (("num_samples", num_samples), ("max_seq_length", max_seq_length), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected an int >= 1.")
    ds = load_source(source, split)
    kind, cols = choose_columns(list(ds.column_names or []), text_column, messages_column, prompt_column,
                                response_column)
    if mask is not None and kind == "text":
        raise ValueError(f"mask={mask!r} needs prompt/response or messages data; column '{cols[0]}' is plain text.")
    if image_column is not None:
        from .multimodal import image_text_batches

        return image_text_batches(_rows(ds, shuffle, seed), tokenizer, image_column, kind, cols, num_samples,
                                  batch_size, mask, include_image_tokens, concatenate)
    samples = _samples(_rows(ds, shuffle, seed), kind, cols, tokenizer, num_samples, max_seq_length, concatenate,
                       flags=mask is not None)
    if not samples:
        raise ValueError("the calibration data yielded no tokens (an empty dataset, or empty rows).")
    if len(samples) < num_samples:
        logger.warning("calibration data gave %d %s, fewer than num_samples=%d", len(samples),
                       "windows" if concatenate else "samples", num_samples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = [s[0] for s in samples]
    labels = None
    if mask is not None:
        keep = (lambda f: f) if mask == "response" else (lambda f: not f)
        labels = [[t if keep(f) else -100 for t, f in zip(s[0], s[1])] for s in samples]
    return pad_batches(ids, batch_size, pad_id=pad, labels=labels)


def _rows(ds, shuffle: bool, seed: int):
    """The dataset's rows in the order they are used."""
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        return iter(ds.shuffle(seed=seed, buffer_size=10_000) if shuffle else ds)
    if len(ds) == 0:
        raise ValueError("the calibration dataset is empty.")
    return iter(ds.shuffle(seed=seed) if shuffle else ds)


def _samples(rows, kind: str, cols: tuple, tokenizer, num_samples: int, max_len: int, concatenate: bool,
             flags: bool = True) -> list[tuple[list, list]]:
    """``[(token ids, response flags)]``: one per row (truncated), or packed windows. Without ``flags`` (no mask)
    no character offsets are asked of the tokenizer."""
    out: list[tuple[list, list]] = []
    stream_ids: list = []
    stream_flags: list = []
    eos = tokenizer.eos_token_id
    for row in rows:
        text, spans, templated = _render(row, kind, cols, tokenizer)
        ids, is_response = _tokenize(tokenizer, text, spans if flags else None, templated)
        if not ids:
            continue
        if not concatenate:
            out.append((ids[:max_len], is_response[:max_len]))
            if len(out) == num_samples:
                break
            continue
        stream_ids += ids + ([eos] if eos is not None else [])
        stream_flags += is_response + ([is_response[-1]] if eos is not None else [])
        while len(stream_ids) >= max_len and len(out) < num_samples:
            out.append((stream_ids[:max_len], stream_flags[:max_len]))
            del stream_ids[:max_len], stream_flags[:max_len]
        if len(out) == num_samples:
            break
    return out
