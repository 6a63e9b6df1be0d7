"""Calibration: forward hooks → covariance statistics. No linear algebra beyond ``XᵀX`` lives here.

One statistic per *distinct input*: layers that read the very same tensor object in a forward pass (q/k/v,
gate/up, BERT's query/key/value) are detected at run time and share one accumulator, so its ``XᵀX`` is computed
once. Padding (``attention_mask == 0``) never enters a statistic, batches may have any size and either padding
side, and the per-sample normalisation is applied per sequence, so a padded batch gives the statistics of
batch-size-1 calibration.

The model is left as it was whatever happens: hooks are removed and every module's own train/eval mode restored
in ``finally``, and calibration never writes to the model. Streaming (``streaming.py``) builds on the public pieces
here: :class:`Collector`, :func:`forward_runner`, :func:`iter_batches`, :func:`finish_statistics`, :func:`eval_mode`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed, experts, offload, ops
from .config import CordaConfig, LoraSpec
from .fingerprint import combine_digests, model_fingerprint, sample_digests
from .stats import CovarianceStats
from .targets import Target, resolve_targets

logger = logging.getLogger(__name__)

class CalibrationError(RuntimeError):
    """Calibration could not produce valid statistics (empty loader, non-finite activations, unused layers...)."""


# ---------------------------------------------------------------------------------------------------- batches
def model_device(model: nn.Module) -> torch.device:
    """Where the model's forward starts (for a model accelerate dispatched: its first real weight's device, or its
    hooks' execution device)."""
    return offload.model_execution_device(model)


def _split_batch(batch) -> tuple[dict, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(model kwargs, attention_mask or None, labels or None)`` of a loader batch: a dict (``labels`` taken out:
    no loss is computed), a tensor of input ids, or a tuple ``(input_ids[, attention_mask])``."""
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        if "input_ids" not in kwargs and "inputs_embeds" not in kwargs:
            raise CalibrationError(f"a calibration batch dict needs 'input_ids' (got keys {sorted(batch)}).")
        return kwargs, kwargs.get("attention_mask"), batch.get("labels")
    if torch.is_tensor(batch):
        return {"input_ids": batch}, None, None
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        kwargs = {"input_ids": batch[0]}
        if len(batch) > 1 and torch.is_tensor(batch[1]):
            kwargs["attention_mask"] = batch[1]
        return kwargs, kwargs.get("attention_mask"), None
    raise CalibrationError(
        f"cannot use a calibration batch of type {type(batch).__name__}: give dicts with 'input_ids' (and "
        "optionally 'attention_mask'), tensors of input ids, or (input_ids, attention_mask) tuples."
    )


def forward_runner(model: nn.Module, targets: list[Target]) -> Callable[[dict], Any]:
    """The cheapest forward that reaches every target: a transformers model's backbone (no LM/task head, which
    can cost as much as a few layers) when all targets live inside it, with the KV cache off."""
    prefix = getattr(model, "base_model_prefix", None)
    body = getattr(model, prefix, None) if prefix else None
    if isinstance(body, nn.Module) and body is not model and all(t.name.startswith(prefix + ".") for t in targets):
        runner = body
    else:
        runner = model
    try:
        import inspect

        params = inspect.signature(runner.forward).parameters
    except (TypeError, ValueError):
        params = {}
    takes_cache = "use_cache" in params
    # models with multimodal rotary positions (Qwen2-VL's mRoPE: 3-D position ids from the image grid) compute their
    # own; 2-D ids from the mask would replace them
    takes_positions = "position_ids" in params and not uses_mrope(model)

    def run(kwargs: dict):
        if takes_cache:
            kwargs = {"use_cache": False, **kwargs}
        mask = kwargs.get("attention_mask")
        if takes_positions and mask is not None and "position_ids" not in kwargs and mask.dim() == 2:
            # Left padding must not shift real tokens' positions (absolute position embeddings would change the
            # activations): number real tokens from 0 in every row, as generation does.
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return runner(**kwargs)

    return run


def uses_mrope(model: nn.Module) -> bool:
    """Whether the model's (text) config asks for multimodal rotary positions (``mrope_section``)."""
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        for name in ("rope_scaling", "rope_parameters"):
            rope = getattr(cfg, name, None)
            if isinstance(rope, dict) and "mrope_section" in rope:
                return True
    return False


# ---------------------------------------------------------------------------------------------------- hooks
class TokenLayout:
    """Which rows of a layer's input are real tokens and which sample each belongs to, for the current batch.

    Built from the host copy of the batch's mask (no device→host sync inside hooks) and its ``(batch, sequence)``
    shape; computed once per batch and input shape, index tensors copied to the input's device."""

    def __init__(self):
        self.batch_index = 0
        self.mask: Optional[torch.Tensor] = None
        self.lead: Optional[tuple] = None
        self._cache: dict = {}

    def start(self, index: int, mask: Optional[torch.Tensor], lead: Optional[tuple]) -> None:
        self.batch_index = index
        self.mask = mask
        self.lead = tuple(lead) if lead is not None else (tuple(mask.shape) if mask is not None else None)
        self._cache = {}

    def rows(self, lead_shape: tuple, device) -> tuple[Optional[torch.Tensor], torch.Tensor, int, int]:
        """(row index of real tokens or None, sample id per real row, #samples with ≥1 real token, #real rows)
        for activations whose leading dims are ``lead_shape``."""
        key = (lead_shape, str(device))
        if key not in self._cache:
            self._cache[key] = self._rows(lead_shape, device)
        return self._cache[key]

    def _rows(self, lead_shape: tuple, device):
        mask = self.mask
        if self.lead is None:  # no known layout (float inputs of a run_model() forward): one sample per call
            lead_shape = (int(torch.Size(lead_shape).numel()),)
        if len(lead_shape) == 1:
            lead_shape, mask = self._flat(lead_shape[0], mask)
        n_seq, seq_len = lead_shape[0], int(torch.Size(lead_shape[1:]).numel())
        if mask is not None and bool(mask.all()):  # nothing to drop: no index copies
            mask = None
        if mask is not None and tuple(mask.shape) != (n_seq, seq_len):
            # not the token sequence: e.g. a vision tower's (images, patches) — every row is real, one sample each
            mask = None
        if mask is None:
            sample = torch.arange(n_seq).repeat_interleave(seq_len)
            return None, sample.to(device, non_blocking=True), n_seq, n_seq * seq_len
        flat = mask.reshape(-1) != 0
        rows = flat.nonzero().squeeze(1)
        real = flat.reshape(n_seq, seq_len).any(1)
        remap = torch.cumsum(real.to(torch.int64), 0) - 1  # dense sample ids: all-padding sequences take no slot
        sample = remap.index_select(0, torch.div(rows, seq_len, rounding_mode="floor"))
        return rows.to(device, non_blocking=True), sample.to(device, non_blocking=True), int(real.sum()), \
            int(rows.numel())

    def _flat(self, n: int, mask: Optional[torch.Tensor]) -> tuple[tuple, Optional[torch.Tensor]]:
        """(leading shape, mask) for a layer input of shape ``(n, d)``: the batch's tokens flattened (``n = batch ·
        sequence``), one row per sample (``n = batch``: no sequence axis, e.g. a BERT pooler — each row is normalised
        alone and rows of all-padding samples are dropped), or, when the batch's shape is unknown (float inputs of a
        ``run_model()`` callable), one sample per call, as PEFT counts it."""
        lead = self.lead
        if lead is not None and n == lead[0] * lead[1]:
            return tuple(lead), mask
        if lead is not None and n == lead[0]:
            return (n, 1), None if mask is None else mask.reshape(n, -1).any(1, keepdim=True)
        return (1, n), None


class Accumulators:
    """The statistic sums and counts, one set per candidate group (CorDA++: batch ``i`` feeds group
    ``i mod groups``; the hooks only ever see the current group's), and the finiteness checks."""

    def __init__(self, config: CordaConfig, device: torch.device, groups: int = 1):
        self.config = config
        self.device = device
        self.dtype = config.dtype
        self.backend = ops.choose("xtx_accumulate", device, self.dtype)
        self.groups = [({}, {}, {}) for _ in range(groups)]  # (sums, n_samples, n_tokens) per group
        self.sums: dict[str, torch.Tensor]
        self.n_samples: dict[str, int]
        self.n_tokens: dict[str, int]
        self.use_group(0)
        self.pending: list = []  # (batch index, keys, device flags) not yet checked

    def use_group(self, group: int) -> None:
        self.sums, self.n_samples, self.n_tokens = self.groups[group]

    def add(self, key: str, x: torch.Tensor, layout: TokenLayout) -> None:
        """Add the real rows of ``x`` (``(..., d)``), each scaled by its sample's normalisation, into ``key``."""
        d = x.shape[-1]
        rows, sample, n_seq, n_rows = layout.rows(tuple(x.shape[:-1]), x.device)
        if n_rows == 0:
            return
        x2 = x.reshape(-1, d)
        if rows is not None:
            x2 = x2.index_select(0, rows)
        self.add_rows(key, x2, sample, n_seq, n_seq, n_rows)

    def add_rows(self, key: str, x2: torch.Tensor, sample: torch.Tensor, n_seq: int, samples: int,
                 n_rows: int) -> None:
        """Add rows ``x2`` (``(n_rows, d)``, real tokens only) of samples ``sample`` (ids in ``[0, n_seq)``) into
        ``key``, each scaled by its sample's normalisation; ``samples`` of them count as contributing samples."""
        scale = ops.sample_scales(x2, sample, n_seq, self.config.normalization)
        acc = self.sums.get(key)
        if acc is None:
            acc = self.sums[key] = torch.zeros(x2.shape[1], x2.shape[1], dtype=self.dtype, device=x2.device)
            self.n_samples[key] = 0
            self.n_tokens[key] = 0
        ops.xtx_accumulate(acc, x2, scale, self.backend)
        self.n_samples[key] += samples
        self.n_tokens[key] += n_rows

    def record_finite(self, batch: int, keys: list[str]) -> None:
        """Queue, on the device, whether the diagonal of every touched accumulator is still finite after batch
        ``batch`` (a NaN/Inf activation, or an all-zero sample under per-sample normalisation, poisons it)."""
        keys = [k for k in keys if k in self.sums]
        if keys:
            flags = torch.stack([torch.isfinite(self.sums[k].diagonal()).all() for k in keys])
            self.pending.append((batch, keys, flags))

    def first_poisoned(self) -> Optional[tuple[int, list[str]]]:
        """One host sync for all queued batches: ``(batch, poisoned keys)`` of the first bad one, or None."""
        pending, self.pending = self.pending, []
        if not pending:
            return None
        all_ok = torch.stack([flags.all() for _, _, flags in pending]).cpu()
        if bool(all_ok.all()):
            return None
        batch, keys, flags = pending[int((~all_ok).nonzero()[0])]
        return batch, [k for k, ok in zip(keys, flags.cpu().tolist()) if not ok]


class SharedInputs:
    """Which layers read the very same input tensor: detected on the first batch from the last few inputs seen
    (strong references, a tiny window), then checked on every batch. ``order`` lists statistic keys in
    first-execution order, ``members[key]`` the layers reading it (the first computes it)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.members: dict[str, list[str]] = {}
        self.assigned: dict[str, str] = {}  # layer name -> statistic key
        self.order: list[str] = []
        self.recent: list[tuple[torch.Tensor, str]] = []
        self.first_batch = True

    def key_of(self, name: str, x: torch.Tensor, batch: int) -> str:
        """The statistic ``name``'s input feeds (a new one on its first call, unless a recent input is the same
        tensor on the first batch). Raises when a layer that shared its input stops doing so."""
        key = self.assigned.get(name)
        if key is None:
            shared = self._recent_key(x) if self.first_batch and self.enabled else None
            key = shared or name
            if shared is None:
                self.members[key] = [name]
                self.order.append(key)
            else:
                self.members[key].append(name)
            self.assigned[name] = key
        if key != name and self._recent_key(x) != key:
            raise CalibrationError(
                f"layer '{name}' shared its input with '{key}' in the first batch but not in batch {batch}; "
                "calibrate with share_inputs=False for this model."
            )
        return key

    def remember(self, x: torch.Tensor, key: str) -> None:
        self.recent.append((x, key))
        if len(self.recent) > 4:
            self.recent.pop(0)

    def _recent_key(self, x: torch.Tensor) -> Optional[str]:
        return next((key for seen, key in self.recent if seen is x), None)


class ExpertTap:
    """The statistics of one experts module's targeted experts (``corda_fast.experts``), from its forward pre-hook:
    expert ``e``'s first projection over the real tokens the router sent to ``e`` (or every real token with
    ``route_all_experts``: one statistic for all experts), its ``down_proj`` over ``e``'s intermediate activations
    on those tokens. Router weights enter no statistic. One host sync per call (the tokens per expert)."""

    def __init__(self, module: nn.Module, targets: list[Target], route_all: bool):
        self.module = module
        self.num_experts = int(module.num_experts)
        self.up = {t.expert: t.name for t in targets if t.role == "up"}
        self.down = {t.expert: t.name for t in targets if t.role == "down"}
        self.route_all = route_all
        self.shared_up = self.up[min(self.up)] if route_all and self.up else None
        self.calls = 0

    def keys(self) -> list[tuple[str, list[str]]]:
        """``(statistic key, layers reading it)`` in a fixed order (known before any token is seen)."""
        out = [(self.shared_up, [self.up[e] for e in sorted(self.up)])] if self.shared_up else \
            [(self.up[e], [self.up[e]]) for e in sorted(self.up)]
        return out + [(self.down[e], [self.down[e]]) for e in sorted(self.down)]

    def add(self, acc: "Accumulators", layout: TokenLayout, args: tuple, kwargs: dict) -> None:
        hidden, index = experts.call_inputs(args, kwargs)
        self.calls += 1
        rows, sample, n_seq, n_rows = layout.rows((hidden.shape[0],), hidden.device)
        if n_rows == 0:
            return
        x = hidden if rows is None else hidden.index_select(0, rows)
        if self.route_all:
            if self.shared_up:
                acc.add_rows(self.shared_up, x, sample, n_seq, n_seq, n_rows)
            for e, key in sorted(self.down.items()):
                acc.add_rows(key, experts.intermediate(self.module, x, e), sample, n_seq, n_seq, n_rows)
            return
        chosen = index if rows is None else index.index_select(0, rows)
        self._add_routed(acc, x, sample, n_seq, chosen.reshape(x.shape[0], -1))

    def _add_routed(self, acc: "Accumulators", x: torch.Tensor, sample: torch.Tensor, n_seq: int,
                    chosen: torch.Tensor) -> None:
        """Group (token, expert) pairs by expert (a stable sort keeps each expert's tokens in order) and add each
        targeted expert's rows."""
        k, n_exp = chosen.shape[1], self.num_experts
        expert = chosen.reshape(-1).long()
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)
        valid = (expert >= 0) & (expert < n_exp)  # expert-parallel sentinels point past the last expert
        expert, token = expert[valid], token[valid]
        order = torch.argsort(expert, stable=True)
        expert, token = expert[order], token[order]
        pair = torch.unique(expert * n_seq + sample.index_select(0, token))  # (expert, sample) pairs present
        counts = torch.stack([torch.bincount(expert, minlength=n_exp),
                              torch.bincount(torch.div(pair, n_seq, rounding_mode="floor"), minlength=n_exp)])
        tokens_per, samples_per = counts.cpu().tolist()
        start = 0
        for e in range(n_exp):
            n = tokens_per[e]
            if n and (e in self.up or e in self.down):
                tok = token[start:start + n]
                xe, se = x.index_select(0, tok), sample.index_select(0, tok)
                if e in self.up:
                    acc.add_rows(self.up[e], xe, se, n_seq, samples_per[e], n)
                if e in self.down:
                    acc.add_rows(self.down[e], experts.intermediate(self.module, xe, e), se, n_seq, samples_per[e], n)
            start += n


class Collector:
    """Calibration's forward pre-hook and per-batch bookkeeping, over its parts: :class:`TokenLayout` (which rows
    count), :class:`Accumulators` (sums, counts, finiteness), :class:`SharedInputs` (one statistic per distinct
    input), and the data's sample digests (``fingerprint``)."""

    def __init__(self, targets: list[Target], config: CordaConfig, device: torch.device, groups: int = 1):
        self.names = {id(t.module): t.name for t in targets if t.expert is None}
        self.layout = TokenLayout()
        self.acc = Accumulators(config, device, groups)
        self.shared = SharedInputs(config.calibration.share_inputs)
        self.data_digest: list = []  # one digest per calibration sample (the cache records their fingerprint)
        self.opaque_data = False  # a run_model() callable: the data cannot be fingerprinted
        by_module: dict[int, list[Target]] = {}
        for t in targets:
            if t.expert is not None:
                by_module.setdefault(id(t.module), []).append(t)
        self.taps = {mid: ExpertTap(ts[0].module, ts, config.calibration.route_all_experts)
                     for mid, ts in by_module.items()}
        for tap in self.taps.values():  # expert statistics have fixed keys: registered up front
            for key, names in tap.keys():
                self.shared.members[key] = names
                self.shared.order.append(key)
                self.shared.assigned.update((n, key) for n in names)

    def attach(self, targets: list[Target]) -> list:
        """Register the calibration hooks on ``targets``' modules (one per experts module); returns the handles."""
        seen, handles = set(), []
        for t in targets:
            if id(t.module) in seen:
                continue
            seen.add(id(t.module))
            hook = self.expert_hook if t.expert is not None else self.hook
            handles.append(t.module.register_forward_pre_hook(hook, with_kwargs=True))
        return handles

    def expert_hook(self, module: nn.Module, args, kwargs):
        self.taps[id(module)].add(self.acc, self.layout, args, kwargs)
        return None

    def start_batch(self, index: int, mask: Optional[torch.Tensor], lead: Optional[tuple] = None):
        """Begin batch ``index``: its host mask (or None) and its ``(batch, sequence)`` shape (or None when unknown,
        as for float inputs of a ``run_model()`` callable)."""
        self.acc.use_group(index % len(self.acc.groups))
        self.layout.start(index, mask, lead)
        self.shared.recent.clear()

    def end_batch(self):
        self.shared.recent.clear()
        self.shared.first_batch = False
        self.layout.start(self.layout.batch_index, None, None)

    def hook(self, module: nn.Module, args, kwargs):
        name = self.names[id(module)]
        x = args[0] if args else next(iter(kwargs.values()))
        key = self.shared.key_of(name, x, self.layout.batch_index)
        if key == name:
            self.acc.add(key, x, self.layout)
            self.shared.remember(x, key)
        return None

    def record_finite(self):
        self.acc.record_finite(self.layout.batch_index, self.shared.order)

    def unrouted(self) -> set:
        """Experts of modules that ran whose statistic got no token (their router never chose them)."""
        acc = self.acc
        return {n for tap in self.taps.values() if tap.calls for key, names in tap.keys()
                if acc.n_samples.get(key, 0) == 0 for n in names}

    def check_finite(self):
        """Raises naming the first poisoned batch and layer (one host sync for all queued batches)."""
        bad = self.acc.first_poisoned()
        if bad is None:
            return
        batch, keys = bad
        raise CalibrationError(
            f"non-finite activations reached the statistics of layer '{keys[0]}' (input shared by "
            f"{self.shared.members[keys[0]]}) in calibration batch {batch}"
            + (f"; {len(keys) - 1} later layer(s) too" if len(keys) > 1 else "")
            + ". Check the model and data for NaN/Inf (or an all-zero sample under normalization='peft')."
        )

    def sync_ranks(self, n_batches: int, group=None) -> int:
        """Collective: sum every rank's statistics into this collector (``distributed.merge_statistics``).
        Returns the total number of batches over ranks."""
        return distributed.merge_statistics(self.acc.groups, self.shared.order, self.shared.members,
                                            self.shared.assigned, n_batches, self.acc.dtype, self.acc.device, group)


def batch_lead(kwargs: dict) -> tuple:
    """``(batch, sequence)`` of a batch's model inputs."""
    x = kwargs["input_ids"] if "input_ids" in kwargs else kwargs["inputs_embeds"]
    return tuple(x.shape[:2])


def iter_batches(loader, config: CordaConfig, device: torch.device, what: str, digest=None):
    """``(index, model kwargs on device, host copy of the mask or None)`` for each loader batch, with progress
    and ``config.calibration.max_batches``. Rows that a ``DistributedSampler`` repeated to pad its last round are
    masked out of the returned mask (they still run through the model, but enter no statistic). With ``digest`` (a
    list), one digest per sample is appended to it (:func:`fingerprint.sample_digests`). Raises
    :class:`CalibrationError` naming the batch for a batch without a (batch, sequence) shape or with no element."""
    total = None
    try:
        total = len(loader)
    except TypeError:
        pass
    max_batches = config.calibration.max_batches
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    padding = distributed.PaddingFilter.from_loader(loader)
    bar = tqdm(loader, total=total, desc=f"corda_fast: {what}", disable=not config.show_progress, unit="batch")
    rate = _TokenRate(bar) if config.show_progress else None
    for i, batch in enumerate(bar):
        if max_batches is not None and i >= max_batches:
            break
        kwargs, mask, labels = _split_batch(batch)
        _check_batch_shape(i, kwargs, mask)
        mask = None if mask is None else mask.cpu()
        if labels is not None and config.calibration.use_label_mask:
            mask = _label_mask(i, kwargs, mask, labels)
        if padding is not None:
            lead = (kwargs["input_ids"] if "input_ids" in kwargs else kwargs["inputs_embeds"]).shape[:2]
            repeated = padding.repeated(lead[0])
            if bool(repeated.any()):
                mask = torch.ones(lead, dtype=torch.long) if mask is None else mask.clone()
                mask[repeated] = 0
        if digest is not None:
            sample_digests(digest, kwargs, mask)
        if rate is not None:  # statistics tokens, from the host mask (no device sync)
            rate.next_batch(int(mask.sum()) if mask is not None else math.prod(batch_lead(kwargs)))
        kwargs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        yield i, kwargs, mask
    if rate is not None:
        rate.next_batch(0)  # the last batch has run


class _TokenRate:
    """The bar's ``tokens`` / ``tok_s``: tokens of the batches that have *run*, over the bar's own elapsed time.
    A batch counts once the consumer asks for the next one (the generator resumes after its forward), so the rate
    never credits a batch before its forward has taken its time."""

    def __init__(self, bar):
        self.bar = bar
        self.done = 0
        self.pending = 0

    def next_batch(self, tokens: int) -> None:
        self.done += self.pending
        self.pending = tokens
        elapsed = self.bar.format_dict.get("elapsed", 0.0)
        if self.done:
            self.bar.set_postfix(tokens=self.done, tok_s=f"{self.done / max(elapsed, 1e-9):.0f}", refresh=False)


def _label_mask(i: int, kwargs: dict, mask: Optional[torch.Tensor], labels) -> torch.Tensor:
    """The statistics' mask of a batch with ``labels``: real tokens whose label is not -100 (the model still sees
    every token through its own attention mask)."""
    x = kwargs["input_ids"] if "input_ids" in kwargs else kwargs["inputs_embeds"]
    if not torch.is_tensor(labels) or tuple(labels.shape) != tuple(x.shape[:2]):
        shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise CalibrationError(f"calibration batch {i}: labels of shape {shape} do not fit the inputs "
                               f"{tuple(x.shape[:2])}; give per-token labels (-100 = left out of the statistics) or "
                               "CalibrationConfig(use_label_mask=False).")
    keep = labels.cpu() != -100
    return (keep if mask is None else (mask != 0) & keep).to(torch.long)


def _check_batch_shape(i: int, kwargs: dict, mask: Optional[torch.Tensor]) -> None:
    """A clear error for a batch without a batch axis (1-D token ids), an empty batch, or a mask that does not fit.
    (Any model input of ≥ 2 dimensions passes: custom models may take other tensors than token ids.)"""
    name = "input_ids" if "input_ids" in kwargs else "inputs_embeds"
    x = kwargs[name]
    if not torch.is_tensor(x) or x.dim() < 2:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise CalibrationError(f"calibration batch {i}: {name} has shape {shape}, expected (batch, sequence"
                               + (", hidden)" if name == "inputs_embeds" else ")")
                               + ("; one sample needs a batch axis, e.g. ids.unsqueeze(0)." if torch.is_tensor(x)
                                  else "."))
    if x.numel() == 0:
        raise CalibrationError(f"calibration batch {i} is empty ({name} of shape {tuple(x.shape)}); drop empty "
                               "batches from the loader.")
    if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
        raise CalibrationError(f"calibration batch {i}: attention_mask of shape {tuple(mask.shape)} does not fit "
                               f"{name} of shape {tuple(x.shape)}.")


def data_fingerprint(loader: Any, config: CordaConfig) -> Optional[str]:
    """The fingerprint of the calibration data ``loader`` yields (the batches :func:`collect_covariance` would use:
    tokens and masks, in order; summed over ranks when calibration is distributed), as recorded in a cache's
    metadata. ``None`` for a ``run_model()`` callable, whose data cannot be seen."""
    if callable(loader) and not hasattr(loader, "__iter__"):
        return None
    digests: list = []
    for _ in iter_batches(loader, config, torch.device("cpu"), "checking data against the cache", digest=digests):
        pass
    return combine_digests(digests, distributed.is_active(config.calibration.distributed))


def finish_statistics(collector: Collector, targets: list[Target], config: CordaConfig, fingerprint: str,
                      n_batches: int, t0: float, group: int = 0) -> CovarianceStats:
    """The :class:`CovarianceStats` of a finished collector's candidate ``group`` (unused targets handled per
    ``config``)."""
    acc, shared = collector.acc, collector.shared
    acc.use_group(group)
    unrouted = collector.unrouted()
    unused = [t.name for t in targets if t.name not in unrouted and (
        t.name not in shared.assigned or acc.n_samples.get(shared.assigned[t.name], 0) == 0)]
    if unused:
        where = f" in candidate group {group} (batches {group}, {group} + {len(acc.groups)}, ...)" \
            if len(acc.groups) > 1 else ""
        msg = (f"{len(unused)} targeted layer(s) saw no calibration token{where}: {unused[:5]}"
               + (" ..." if len(unused) > 5 else ""))
        if config.calibration.unused_targets == "error":
            raise CalibrationError(msg + ". Exclude them (exclude_modules) or set unused_targets='skip'.")
        logger.warning("%s; they get no adapter (unused_targets='skip').", msg)
    fill_unrouted(acc, targets, unrouted, shared.assigned)
    keys = [k for k in shared.order if acc.n_samples.get(k, 0) > 0]
    return CovarianceStats(
        sums={k: ops.symmetrize(acc.sums[k]) for k in keys},
        n_samples={k: acc.n_samples[k] for k in keys},
        n_tokens={k: acc.n_tokens[k] for k in keys},
        members={k: [n for n in shared.members[k] if n not in unused] for k in keys},
        normalization=config.normalization,
        model_fingerprint=fingerprint,
        meta={"batches": n_batches, "backend": acc.backend, "precision": config.precision,
              **({"route_all_experts": True} if collector.taps and config.calibration.route_all_experts else {}),
              "seconds": round(time.perf_counter() - t0, 3),
              **({"candidate": group, "candidates": len(acc.groups)} if len(acc.groups) > 1 else {})},
    )


def fill_unrouted(acc: Accumulators, targets: list[Target], unrouted: set, assigned: dict) -> None:
    """An expert the router never chose has no data: its statistic becomes the identity (``C = I``, counted as one
    sample and no token), so CorDA reduces to the SVD of its weight alone — the ``r`` largest components with IPM
    (PiSSA's choice), the smallest with KPM — a defined adapter that ``InitReport.low_data`` lists with 0 tokens."""
    for t in targets:
        key = assigned.get(t.name)
        if t.name in unrouted and acc.n_samples.get(key, 0) == 0:
            acc.sums[key] = torch.eye(t.d_in, dtype=acc.dtype, device=acc.device)
            acc.n_samples[key], acc.n_tokens[key] = 1, 0
    if unrouted:
        logger.warning("%d expert statistic(s) got no routed token (e.g. %s): initialised from the weights alone "
                       "(C = I).", len(unrouted), sorted(unrouted)[:3])


# ---------------------------------------------------------------------------------------------------- public
@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode for the block and restore *each module's own* train/eval flag afterwards (a
    model with some submodules frozen in eval comes back exactly so), whatever happens inside."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def as_targets(model: nn.Module, targets: Union[None, LoraSpec, list]) -> list[Target]:
    """Resolved targets: ``targets`` itself if already resolved, else resolved from a :class:`LoraSpec` (default:
    every linear layer but the output head). Statistics do not depend on the rank, so it is not checked."""
    if targets is None or isinstance(targets, LoraSpec):
        return resolve_targets(model, targets, check_rank=False)
    return list(targets)


def collect_covariance(
    model: nn.Module,
    loader: Any,
    config: Optional[CordaConfig] = None,
    targets: Union[None, LoraSpec, list[Target]] = None,
) -> CovarianceStats:
    """Run ``model`` on ``loader`` and return the input statistics of every targeted layer.

    Args:
        model: any ``nn.Module``; transformers models run their backbone only when all targets lie in it.
        loader: an iterable of batches — dicts with ``input_ids`` (``(batch, seq)``) and optional
            ``attention_mask`` / ``labels`` (ignored), tensors of input ids, or ``(input_ids, attention_mask)``
            tuples — of any batch size and padding side; or a zero-argument callable that runs the model itself
            (PEFT's ``run_model``; then no mask is known and every token counts).
        config: :class:`CordaConfig` (``normalization``, ``precision``, ``calibration``).
        targets: resolved targets, or a :class:`LoraSpec` to resolve (default: every linear layer but the head).

    Returns:
        :class:`CovarianceStats` with one ``(d_in, d_in)`` statistic per distinct layer input.
    """
    config = config or CordaConfig()
    stats = _collect(model, loader, config, as_targets(model, targets), groups=1)[0]
    logger.info(
        "calibrated %d layers on %d batches (%d samples, %d tokens): %d distinct inputs, %.1f MiB of statistics, %.2fs",
        len(stats.layer_names()), stats.meta["batches"], max(stats.n_samples.values()), max(stats.n_tokens.values()),
        len(stats.sums), stats.nbytes() / 2**20, stats.meta["seconds"],
    )
    return stats


def collect_candidates(model: nn.Module, loader: Any, candidates: int, config: Optional[CordaConfig] = None,
                       targets: Union[None, LoraSpec, list[Target]] = None) -> list[CovarianceStats]:
    """CorDA++ candidate statistics: like :func:`collect_covariance` but in ``candidates`` disjoint groups of
    the calibration data collected in the same forward pass (batch ``i`` feeds group ``i mod candidates``).

    Returns one :class:`CovarianceStats` per group; every group shares the same statistic keys (inputs are shared
    the same way in every group). Raises :class:`CalibrationError` if the loader has fewer batches than groups.
    """
    config = config or CordaConfig()
    if not isinstance(candidates, int) or isinstance(candidates, bool) or candidates < 1:
        raise ValueError(f"candidates={candidates!r}: expected an int >= 1.")
    out = _collect(model, loader, config, as_targets(model, targets), groups=candidates)
    logger.info("calibrated %d layers into %d candidate groups on %d batches: %.1f MiB of statistics, %.2fs",
                len(out[0].layer_names()), candidates, out[0].meta["batches"],
                sum(s.nbytes() for s in out) / 2**20, out[0].meta["seconds"])
    return out


def _run_batches(collector: Collector, model: nn.Module, loader: Any, config: CordaConfig, targets: list[Target],
                 device: torch.device, groups: int) -> int:
    """The forward passes of one calibration; returns the number of batches run."""
    if callable(loader) and not hasattr(loader, "__iter__"):  # PEFT-style run_model()
        if groups > 1:
            raise CalibrationError(
                f"{groups} candidate groups need an iterable loader of batches (batch i feeds group "
                f"i mod {groups}); a run_model() callable is one opaque batch."
            )
        return _run_callable(collector, model, loader)
    run = forward_runner(model, targets)
    n_batches = 0
    for i, kwargs, mask in iter_batches(loader, config, device, "calibrating", digest=collector.data_digest):
        collector.start_batch(i, mask, batch_lead(kwargs))
        run(kwargs)
        collector.record_finite()
        collector.end_batch()
        n_batches += 1
        if device.type == "cpu" or n_batches % 16 == 0:  # fail fast where checking is free
            collector.check_finite()
    collector.check_finite()
    return n_batches


def _run_callable(collector: Collector, model: nn.Module, run_model) -> int:
    """Calibrate through a ``run_model()`` callable. Each forward of ``model`` inside it is one batch: with token ids
    (``input_ids=``, or an integer first argument) or ``inputs_embeds=`` with a 2-D ``attention_mask``, its layout is
    known — each row is one sample and its mask is honoured, so it may run padded batches of any size; a forward on
    float inputs (an MLP, a vision encoder, embeddings passed positionally) is one sample, as PEFT counts it. Layer
    calls outside a forward of ``model`` count as one sample per call."""
    collector.opaque_data = True
    state = {"forwards": 0}

    def before(module, args, kwargs):
        lead, mask = forward_layout(args, kwargs)
        collector.start_batch(state["forwards"], mask, lead)

    def after(module, args, kwargs, output):
        collector.record_finite()
        collector.end_batch()
        state["forwards"] += 1
        collector.start_batch(state["forwards"], None)

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True)]
    try:
        collector.start_batch(0, None)
        run_model()
        collector.record_finite()
        collector.end_batch()
    finally:
        for h in handles:
            h.remove()
    collector.check_finite()
    return 1


def forward_layout(args: tuple, kwargs: dict) -> tuple[Optional[tuple], Optional[torch.Tensor]]:
    """``((batch, sequence) or None, host mask or None)`` of one model forward's arguments: the layout is known from
    token ids (``input_ids=`` or an integer first positional argument) or from ``inputs_embeds=`` with a 2-D
    ``attention_mask`` of its leading shape; a mask that does not fit the layout (e.g. a 4-D attention bias) is
    dropped (every token counts). Float inputs alone give no layout: the call is one sample."""
    ids = kwargs.get("input_ids")
    if ids is None and args and torch.is_tensor(args[0]) and not args[0].is_floating_point() \
            and not args[0].is_complex():
        ids = args[0]
    mask = kwargs.get("attention_mask")
    mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None
    lead = None
    if torch.is_tensor(ids) and ids.dim() >= 2:
        lead = tuple(ids.shape[:2])
    elif torch.is_tensor(kwargs.get("inputs_embeds")) and mask is not None:
        lead = tuple(kwargs["inputs_embeds"].shape[:2])
    if mask is None or lead is None or tuple(mask.shape) != lead:
        return lead, None
    return lead, mask.detach().cpu()


def _collect(model: nn.Module, loader: Any, config: CordaConfig, targets: list[Target],
             groups: int) -> list[CovarianceStats]:
    device = model_device(model)
    collector = Collector(targets, config, device, groups)
    multi = distributed.is_active(config.calibration.distributed)
    handles = []
    t0 = time.perf_counter()
    with distributed.stage(multi, "calibration"):  # a failure here raises on every rank
        try:
            handles = collector.attach(targets)
            with eval_mode(model), torch.no_grad():
                n_batches = _run_batches(collector, model, loader, config, targets, device, groups)
        finally:
            for h in handles:
                h.remove()
    if multi:
        local = n_batches
        n_batches = collector.sync_ranks(n_batches)
        logger.info("statistics summed over ranks: %d batches here, %d in all", local, n_batches)
    if n_batches == 0:
        raise CalibrationError("the calibration loader yielded no batches; give it at least one batch of samples."
                               + (" (on every rank)" if multi else ""))
    if n_batches < groups:
        raise CalibrationError(
            f"the calibration loader yielded {n_batches} batch(es) but {groups} candidate groups were asked for "
            "(batch i feeds group i mod candidates): give at least as many batches as candidates, or lower "
            "`candidates`."
        )
    fingerprint = model_fingerprint(model)
    data = None if collector.opaque_data else combine_digests(collector.data_digest, multi)
    out = []
    for g in range(groups):
        stats = finish_statistics(collector, targets, config, fingerprint, n_batches, t0, group=g)
        stats.meta["model_class"] = type(model).__name__
        stats.meta["data_fingerprint"] = data
        if multi:
            stats.meta["ranks"] = distributed.rank_and_world()[1]
        out.append(stats)
    return out
