"""Calibration: forward hooks → covariance statistics. No linear algebra beyond ``XᵀX`` lives here.

One statistic per *distinct input*: layers that read the very same tensor object in a forward pass (q/k/v,
gate/up, BERT's query/key/value) are detected at run time and share one accumulator, so its ``XᵀX`` is computed
once. Padding (``attention_mask == 0``) never enters a statistic, batches may have any size and either padding
side, and the per-sample normalisation is applied per sequence, so a padded batch gives the statistics of
batch-size-1 calibration.

The model is left as it was whatever happens: hooks are removed and the train/eval mode restored in ``finally``,
and calibration never writes to the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops
from .config import CordaConfig
from .targets import Target, resolve_targets

logger = logging.getLogger(__name__)

CACHE_FORMAT = "corda_fast.covariance.v1"


class CalibrationError(RuntimeError):
    """Calibration could not produce valid statistics (empty loader, non-finite activations, unused layers...)."""


class CacheError(ValueError):
    """A covariance cache that does not belong to this model / configuration."""


@dataclass
class CovarianceStats:
    """Uncentered second-moment statistics of the targeted layers' inputs.

    ``sums[key]`` is ``Σ_samples (X_s/m_s)ᵀ (X_s/m_s)`` over real tokens (``(d, d)``, float32 or float64) and
    ``n_samples[key]`` the number of samples that contributed; the covariance is their ratio (PEFT divides by
    the number of hook calls, which is the number of samples at batch size 1). ``members[key]`` lists the layers
    reading that input, the first being the one the statistic was computed on.
    """

    sums: dict[str, torch.Tensor]
    n_samples: dict[str, int]
    n_tokens: dict[str, int]
    members: dict[str, list[str]]
    normalization: str
    model_fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)

    def layer_keys(self) -> dict[str, str]:
        """``{layer name: statistic key}``."""
        return {name: key for key, names in self.members.items() for name in names}

    def key_of(self, name: str) -> str:
        return self.layer_keys()[name]

    def covariance(self, key: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``C = sum / n_samples`` for statistic ``key`` (``(d, d)``)."""
        s = self.sums[key]
        return s.to(dtype or s.dtype) / self.n_samples[key]

    def layer_names(self) -> list[str]:
        return list(self.layer_keys())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums.values())

    # ------------------------------------------------------------------ cache
    def save(self, path: str) -> None:
        """Write the statistics (sums and counts, so caches can be merged) as safetensors with metadata."""
        from safetensors.torch import save_file

        keys = list(self.sums)
        meta = {
            "format": CACHE_FORMAT,
            "model_fingerprint": self.model_fingerprint,
            "normalization": self.normalization,
            "keys": json.dumps(keys),
            "members": json.dumps(self.members),
            "n_samples": json.dumps(self.n_samples),
            "n_tokens": json.dumps(self.n_tokens),
            "meta": json.dumps(self.meta),
        }
        tensors = {f"stat{i}": self.sums[k].contiguous().cpu() for i, k in enumerate(keys)}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(tensors, path, metadata=meta)
        logger.info("saved covariance statistics of %d inputs (%d layers) to %s", len(keys), len(self.layer_names()), path)

    @classmethod
    def load(cls, path: str, model: Optional[nn.Module] = None, targets: Optional[list[Target]] = None,
             normalization: Optional[str] = None) -> "CovarianceStats":
        """Load a cache written by :meth:`save`, validated against ``model`` / ``targets`` / ``normalization``.

        Raises :class:`CacheError` naming the mismatched field (another model, a missing layer, a shape or
        normalisation mismatch, non-finite values).
        """
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise CacheError(f"covariance cache '{path}' does not exist.")
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CACHE_FORMAT:
                raise CacheError(f"'{path}' is not a corda_fast covariance cache (format={meta.get('format')!r}).")
            keys = json.loads(meta["keys"])
            sums = {k: f.get_tensor(f"stat{i}") for i, k in enumerate(keys)}
        stats = cls(
            sums=sums,
            n_samples={k: int(v) for k, v in json.loads(meta["n_samples"]).items()},
            n_tokens={k: int(v) for k, v in json.loads(meta["n_tokens"]).items()},
            members=json.loads(meta["members"]),
            normalization=meta["normalization"],
            model_fingerprint=meta["model_fingerprint"],
            meta=json.loads(meta.get("meta", "{}")),
        )
        if model is not None:
            fp = model_fingerprint(model)
            if fp != stats.model_fingerprint:
                raise CacheError(
                    f"covariance cache '{path}' was collected on another model (model_fingerprint "
                    f"{stats.model_fingerprint[:12]}..., this model {fp[:12]}...: different architecture or weights, "
                    f"cache made for {stats.meta.get('model_class', '?')}). Recalibrate, or load the model it was made on."
                )
        if normalization is not None and normalization != stats.normalization:
            raise CacheError(
                f"covariance cache '{path}' used normalization={stats.normalization!r} but the config asks for "
                f"{normalization!r}."
            )
        if targets is not None:
            keys = stats.layer_keys()
            missing = [t.name for t in targets if t.name not in keys]
            if missing:
                raise CacheError(
                    f"covariance cache '{path}' has no statistic for layer(s) {missing[:5]}"
                    + (" ..." if len(missing) > 5 else "") + "; it was collected for other target_modules."
                )
            for t in targets:
                key = keys[t.name]
                if tuple(stats.sums[key].shape) != (t.d_in, t.d_in):
                    raise CacheError(
                        f"covariance cache '{path}': statistic of '{t.name}' is {tuple(stats.sums[key].shape)}, "
                        f"the layer needs ({t.d_in}, {t.d_in})."
                    )
        bad = [k for k, s in stats.sums.items() if not torch.isfinite(s.diagonal()).all()]
        if bad:
            raise CacheError(f"covariance cache '{path}' holds non-finite statistics for {bad[:5]}.")
        return stats


def model_fingerprint(model: nn.Module) -> str:
    """A cheap identity of a model's architecture *and* weights (class, every parameter's name, shape, dtype and
    a strided sample of its values). Statistics depend on every upstream weight, so all parameters count."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        data = p.data
        if type(data) is not torch.Tensor:  # quantized tensor subclass (torchao): hash its values
            data = data.dequantize() if callable(getattr(data, "dequantize", None)) else None
            if data is None:
                h.update(type(p.data).__name__.encode())
                continue
        flat = data.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        h.update(flat[::step][:64].to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- batches
def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _split_batch(batch) -> tuple[dict, Optional[torch.Tensor]]:
    """``(model kwargs, attention_mask or None)`` of a loader batch: a dict (``labels`` dropped: no loss is
    needed), a tensor of input ids, or a tuple ``(input_ids[, attention_mask])``."""
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        if "input_ids" not in kwargs and "inputs_embeds" not in kwargs:
            raise CalibrationError(f"a calibration batch dict needs 'input_ids' (got keys {sorted(batch)}).")
        return kwargs, kwargs.get("attention_mask")
    if torch.is_tensor(batch):
        return {"input_ids": batch}, None
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        kwargs = {"input_ids": batch[0]}
        if len(batch) > 1 and torch.is_tensor(batch[1]):
            kwargs["attention_mask"] = batch[1]
        return kwargs, kwargs.get("attention_mask")
    raise CalibrationError(
        f"cannot use a calibration batch of type {type(batch).__name__}: give dicts with 'input_ids' (and "
        "optionally 'attention_mask'), tensors of input ids, or (input_ids, attention_mask) tuples."
    )


def _forward_runner(model: nn.Module, targets: list[Target]) -> Callable[[dict], Any]:
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
    takes_positions = "position_ids" in params

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


# ---------------------------------------------------------------------------------------------------- hooks
class _Collector:
    """Holds the per-batch token layout and the accumulators; its hooks do the work."""

    def __init__(self, targets: list[Target], config: CordaConfig, device: torch.device, groups: int = 1):
        self.config = config
        self.device = device
        self.backend = ops.active_backend(device, config.covariance_dtype)
        self.names = {id(t.module): t.name for t in targets}
        self.dtype = config.covariance_dtype
        # One (sums, n_samples, n_tokens) triple per candidate group (CorDA++); batch i feeds group i mod groups.
        # The hooks only ever see the current group's dicts.
        self.groups = [({}, {}, {}) for _ in range(groups)]
        self.sums: dict[str, torch.Tensor]
        self.n_samples: dict[str, int]
        self.n_tokens: dict[str, int]
        self.use_group(0)
        self.members: dict[str, list[str]] = {}
        self.assigned: dict[str, str] = {}  # layer name -> statistic key
        self.order: list[str] = []  # statistic keys in first-execution order
        self.recent: list[tuple[torch.Tensor, str]] = []  # last few inputs seen this batch (strong refs, tiny window)
        self.batch_index = 0
        self.first_batch = True
        self._layout_cache: dict = {}
        self.mask: Optional[torch.Tensor] = None
        self.pending: list = []  # (batch index, keys, device flags) not yet checked

    # -- per batch -------------------------------------------------------------------------------------------
    def use_group(self, group: int):
        self.sums, self.n_samples, self.n_tokens = self.groups[group]

    def start_batch(self, index: int, mask: Optional[torch.Tensor]):
        self.batch_index = index
        self.use_group(index % len(self.groups))
        self.mask = mask
        self._layout_cache = {}
        self.recent.clear()

    def end_batch(self):
        self.recent.clear()
        self.first_batch = False
        self.mask = None
        self._layout_cache = {}

    def _layout(self, lead_shape: tuple, device) -> tuple[Optional[torch.Tensor], torch.Tensor, int, int]:
        """(row index of real tokens or None, sample id per real row, #samples with ≥1 real token, #real rows)
        for activations whose leading dims are ``lead_shape``; computed once per batch from the host copy of the
        mask (no device→host sync inside hooks), index tensors copied to ``device``."""
        key = (lead_shape, str(device))
        if key in self._layout_cache:
            return self._layout_cache[key]
        mask = self.mask
        if len(lead_shape) == 1:  # (tokens, d): one sample per call, as PEFT, unless it is a flattened batch
            if mask is not None and mask.numel() == lead_shape[0]:
                lead_shape = tuple(mask.shape)
            else:
                mask = None
                lead_shape = (1, lead_shape[0])
        n_seq, seq_len = lead_shape[0], int(torch.Size(lead_shape[1:]).numel())
        if mask is not None and bool(mask.all()):  # nothing to drop: no index copies
            mask = None
        if mask is not None and tuple(mask.shape) != (n_seq, seq_len):
            raise CalibrationError(
                f"attention_mask of shape {tuple(self.mask.shape)} does not fit layer inputs with leading shape "
                f"{lead_shape} (batch {self.batch_index})."
            )
        if mask is None:
            sample = torch.arange(n_seq).repeat_interleave(seq_len)
            out = (None, sample.to(device, non_blocking=True), n_seq, n_seq * seq_len)
        else:
            flat = mask.reshape(-1) != 0
            rows = flat.nonzero().squeeze(1)
            real = flat.reshape(n_seq, seq_len).any(1)
            # renumber samples densely so empty (all-padding) sequences take no slot
            remap = torch.cumsum(real.to(torch.int64), 0) - 1
            sample = remap.index_select(0, torch.div(rows, seq_len, rounding_mode="floor"))
            out = (rows.to(device, non_blocking=True), sample.to(device, non_blocking=True), int(real.sum()),
                   int(rows.numel()))
        self._layout_cache[key] = out
        return out

    def _accumulate(self, key: str, x: torch.Tensor):
        d = x.shape[-1]
        rows, sample, n_seq, n_rows = self._layout(tuple(x.shape[:-1]), x.device)
        if n_rows == 0:
            return
        x2 = x.reshape(-1, d)
        if rows is not None:
            x2 = x2.index_select(0, rows)
        scale = ops.sample_scales(x2, sample, n_seq, self.config.normalization)
        acc = self.sums.get(key)
        if acc is None:
            acc = self.sums[key] = torch.zeros(d, d, dtype=self.dtype, device=x.device)
            self.n_samples[key] = 0
            self.n_tokens[key] = 0
        ops.xtx_accumulate(acc, x2, scale, self.backend)
        self.n_samples[key] += n_seq
        self.n_tokens[key] += n_rows

    def _find_recent(self, x: torch.Tensor) -> Optional[str]:
        for seen, key in self.recent:
            if seen is x:
                return key
        return None

    def hook(self, module: nn.Module, args, kwargs):
        name = self.names[id(module)]
        x = args[0] if args else next(iter(kwargs.values()))
        key = self.assigned.get(name)
        if key is None:  # first call: share a recent input's statistic (first batch only) or open its own
            shared = self._find_recent(x) if self.first_batch and self.config.share_inputs else None
            key = shared or name
            if shared is None:
                self.members[key] = [name]
                self.order.append(key)
            else:
                self.members[key].append(name)
            self.assigned[name] = key
        if key != name:
            if self._find_recent(x) != key:
                raise CalibrationError(
                    f"layer '{name}' shared its input with '{key}' in the first batch but not in batch "
                    f"{self.batch_index}; calibrate with share_inputs=False for this model."
                )
            return None
        self._accumulate(key, x)
        self.recent.append((x, key))
        if len(self.recent) > 4:
            self.recent.pop(0)
        return None

    def record_finite(self):
        """Queue, on the device, whether the diagonal of every touched accumulator is still finite after this
        batch (a NaN/Inf activation, or an all-zero sample under per-sample normalisation, poisons it). No sync:
        :meth:`check_finite` reads the queue."""
        keys = [k for k in self.order if k in self.sums]
        if keys:
            flags = torch.stack([torch.isfinite(self.sums[k].diagonal()).all() for k in keys])
            self.pending.append((self.batch_index, keys, flags))

    def check_finite(self):
        """One host sync for all queued batches; raises naming the first poisoned batch and layer."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        all_ok = torch.stack([flags.all() for _, _, flags in pending]).cpu()
        if bool(all_ok.all()):
            return
        batch, keys, flags = pending[int((~all_ok).nonzero()[0])]
        bad = [k for k, ok in zip(keys, flags.cpu().tolist()) if not ok]
        first = bad[0]
        raise CalibrationError(
            f"non-finite activations reached the statistics of layer '{first}' (input shared by "
            f"{self.members[first]}) in calibration batch {batch}"
            + (f"; {len(bad) - 1} later layer(s) too" if len(bad) > 1 else "")
            + ". Check the model and data for NaN/Inf (or an all-zero sample under normalization='peft')."
        )


def iter_batches(loader, config: CordaConfig, device: torch.device, what: str):
    """``(index, model kwargs on device, host copy of the mask or None)`` for each loader batch, with progress
    and ``config.max_batches``. Rows that a ``DistributedSampler`` repeated to pad its last round are masked out
    of the returned mask (they still run through the model, but enter no statistic)."""
    from .distributed import PaddingFilter

    total = None
    try:
        total = len(loader)
    except TypeError:
        pass
    if config.max_batches is not None and total is not None:
        total = min(total, config.max_batches)
    padding = PaddingFilter.from_loader(loader)
    bar = tqdm(loader, total=total, desc=f"corda_fast: {what}", disable=not config.show_progress, unit="batch")
    for i, batch in enumerate(bar):
        if config.max_batches is not None and i >= config.max_batches:
            break
        kwargs, mask = _split_batch(batch)
        mask = None if mask is None else mask.cpu()
        if padding is not None:
            lead = (kwargs["input_ids"] if "input_ids" in kwargs else kwargs["inputs_embeds"]).shape[:2]
            repeated = padding.repeated(lead[0])
            if bool(repeated.any()):
                mask = torch.ones(lead, dtype=torch.long) if mask is None else mask.clone()
                mask[repeated] = 0
        kwargs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        yield i, kwargs, mask


def finish_statistics(collector: _Collector, targets: list[Target], config: CordaConfig, fingerprint: str,
                      n_batches: int, t0: float, group: int = 0) -> CovarianceStats:
    """The :class:`CovarianceStats` of a finished collector's candidate ``group`` (unused targets handled per
    ``config``)."""
    collector.use_group(group)
    unused = [t.name for t in targets
              if t.name not in collector.assigned or collector.n_samples.get(collector.assigned[t.name], 0) == 0]
    if unused:
        where = f" in candidate group {group} (batches {group}, {group} + {len(collector.groups)}, ...)" \
            if len(collector.groups) > 1 else ""
        msg = f"{len(unused)} targeted layer(s) saw no calibration token{where}: {unused[:5]}" + (" ..." if len(unused) > 5 else "")
        if config.unused_targets == "error":
            raise CalibrationError(msg + ". Exclude them (exclude_modules) or set unused_targets='skip'.")
        logger.warning("%s; they get no adapter (unused_targets='skip').", msg)
    keys = [k for k in collector.order if collector.n_samples.get(k, 0) > 0]
    return CovarianceStats(
        sums={k: ops.symmetrize(collector.sums[k]) for k in keys},
        n_samples={k: collector.n_samples[k] for k in keys},
        n_tokens={k: collector.n_tokens[k] for k in keys},
        members={k: [n for n in collector.members[k] if n not in unused] for k in keys},
        normalization=config.normalization,
        model_fingerprint=fingerprint,
        meta={"batches": n_batches, "backend": collector.backend, "precision": config.covariance_precision,
              "seconds": round(time.perf_counter() - t0, 3),
              **({"candidate": group, "candidates": len(collector.groups)} if len(collector.groups) > 1 else {})},
    )


# ---------------------------------------------------------------------------------------------------- public
def collect_covariance(
    model: nn.Module,
    loader: Any,
    config: Optional[CordaConfig] = None,
    targets: Optional[list[Target]] = None,
) -> CovarianceStats:
    """Run ``model`` on ``loader`` and return the input statistics of every targeted layer.

    Args:
        model: any ``nn.Module``; transformers models run their backbone only when all targets lie in it.
        loader: an iterable of batches — dicts with ``input_ids`` (``(batch, seq)``) and optional
            ``attention_mask`` / ``labels`` (ignored), tensors of input ids, or ``(input_ids, attention_mask)``
            tuples — of any batch size and padding side; or a zero-argument callable that runs the model itself
            (PEFT's ``run_model``; then no mask is known and every token counts).
        config: :class:`CordaConfig` (``normalization``, ``covariance_precision``, ``share_inputs``,
            ``max_batches``, ``unused_targets``).
        targets: pre-resolved targets (default: resolved from ``config``).

    Returns:
        :class:`CovarianceStats` with one ``(d_in, d_in)`` statistic per distinct layer input.
    """
    config = config or CordaConfig()
    targets = targets if targets is not None else resolve_targets(model, config, check_rank=False)
    stats = _collect(model, loader, config, targets, groups=1)[0]
    logger.info(
        "calibrated %d layers on %d batches (%d samples, %d tokens): %d distinct inputs, %.1f MiB of statistics, %.2fs",
        len(stats.layer_names()), stats.meta["batches"], max(stats.n_samples.values()), max(stats.n_tokens.values()),
        len(stats.sums), stats.nbytes() / 2**20, stats.meta["seconds"],
    )
    return stats


def collect_candidates(model: nn.Module, loader: Any, candidates: int, config: Optional[CordaConfig] = None,
                       targets: Optional[list[Target]] = None) -> list[CovarianceStats]:
    """CorDA++ candidate statistics: like :func:`collect_covariance` but in ``candidates`` disjoint groups of
    the calibration data collected in the same forward pass (batch ``i`` feeds group ``i mod candidates``).

    Returns one :class:`CovarianceStats` per group; every group shares the same statistic keys (inputs are shared
    the same way in every group). Raises :class:`CalibrationError` if the loader has fewer batches than groups.
    """
    config = config or CordaConfig()
    targets = targets if targets is not None else resolve_targets(model, config, check_rank=False)
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates={candidates!r}: expected an int >= 1.")
    out = _collect(model, loader, config, targets, groups=candidates)
    logger.info("calibrated %d layers into %d candidate groups on %d batches: %.1f MiB of statistics, %.2fs",
                len(out[0].layer_names()), candidates, out[0].meta["batches"],
                sum(s.nbytes() for s in out) / 2**20, out[0].meta["seconds"])
    return out


def _collect(model: nn.Module, loader: Any, config: CordaConfig, targets: list[Target],
             groups: int) -> list[CovarianceStats]:
    from . import distributed

    device = _model_device(model)
    collector = _Collector(targets, config, device, groups)
    multi = distributed.is_active(config.distributed)
    was_training = model.training
    handles = []
    t0 = time.perf_counter()
    n_batches = 0
    with distributed.stage(multi, "calibration"):  # a failure here raises on every rank
        try:
            for t in targets:
                handles.append(t.module.register_forward_pre_hook(collector.hook, with_kwargs=True))
            model.eval()
            with torch.no_grad():
                if callable(loader) and not hasattr(loader, "__iter__"):  # PEFT-style run_model()
                    if groups > 1:
                        raise CalibrationError(
                            f"{groups} candidate groups need an iterable loader of batches (batch i feeds group "
                            f"i mod {groups}); a run_model() callable is one opaque batch."
                        )
                    collector.start_batch(0, None)
                    loader()
                    collector.record_finite()
                    collector.end_batch()
                    n_batches = 1
                else:
                    run = _forward_runner(model, targets)
                    for i, kwargs, mask in iter_batches(loader, config, device, "calibrating"):
                        collector.start_batch(i, mask)
                        run(kwargs)
                        collector.record_finite()
                        collector.end_batch()
                        n_batches += 1
                        if device.type == "cpu" or n_batches % 16 == 0:  # fail fast where checking is free
                            collector.check_finite()
                collector.check_finite()
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
    if multi:
        local = n_batches
        n_batches = distributed.sync_collector(collector, n_batches)
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
    out = []
    for g in range(groups):
        stats = finish_statistics(collector, targets, config, fingerprint, n_batches, t0, group=g)
        stats.meta["model_class"] = type(model).__name__
        if multi:
            stats.meta["ranks"] = distributed.rank_and_world()[1]
        out.append(stats)
    return out
