"""``init_adapters``: statistics → decomposition → PEFT model → report, each a named step.

::

    configure          LoraSpec + CordaConfig from lora_config / corda_config / shortcuts
    plan_source        where the statistics come from: "cache" | "one_pass" | "streaming" | "plus" | "plus_streaming"
    run_source         statistics from that source, decomposed into factors (CorDA++: selection and allocation)
    build              the PEFT model (residual base + adapters); optionally saved, optionally fused
    fill_report        the one place the InitReport is filled
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from . import block_cache, distributed, offload
from .calibrate import collect_candidates, collect_covariance, data_fingerprint, model_device
from .config import CordaConfig, CordaConfigError, LoraSpec
from .decompose import LayerFactors, decompose, decompose_sharded
from .experts import split_name
from .fingerprint import model_fingerprint
from .fused import fuse
from .peft_bridge import build_with_undo, save_initial_adapter
from .plus import decide, merge_scores, plan, score_candidates, selected_statistics
from .preflight import (
    check_experts,
    check_no_adapters,
    check_offload,
    check_shared_weights,
    check_spill,
    check_task_type,
    check_writable,
)
from .stats import CacheError, CovarianceStats, read_cache_metadata
from .streaming import block_cache as block_cache_for
from .streaming import iter_block_candidates, iter_block_statistics
from .targets import Target, TargetError, resolve_targets

logger = logging.getLogger(__name__)

@dataclass
class InitReport:
    """What :func:`init_adapters` did: per-layer rank / damping / adapted spectrum, and wall time per stage."""

    mode: str
    source: str = "one_pass"  # "cache" | "one_pass" | "streaming" | "plus" | "plus_streaming" (CorDA++, two passes)
    layers: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    n_statistics: int = 0
    statistics_mib: float = 0.0
    n_samples: int = 0
    n_tokens: int = 0
    covariance_cache: Optional[str] = None
    cache_hit: bool = False
    streaming: bool = False
    fused: int = 0  # LoRA layers switched to the fused training path (init_adapters(fused=True))
    low_data: list = field(default_factory=list)  # statistics built from fewer real tokens than their width
    plus: Any = None  # CorDA++: the plus.PlusPlan (per-layer compactness, candidate, rank; .table(), .plot(path))
    weights: dict = field(default_factory=dict)  # where targeted weights live: {"module"|"host"|"disk": count}
    onload_device: Optional[str] = None  # sequential onloading: blocks ran on this device

    def to_dict(self) -> dict:
        """The report as JSON-ready data (what ``corda_report.json`` holds besides the job's own fields)."""
        out = {
            "mode": self.mode, "source": self.source,
            "calibration": {"samples": self.n_samples, "tokens": self.n_tokens},
            "layers": self.layers, "n_layers": len(self.layers), "distinct_statistics": self.n_statistics,
            "statistics_mib": round(self.statistics_mib, 2),
            "damping_values": sorted({round(l["damping"], 6) for l in self.layers}),
            "low_data": self.low_data, "weights": self.weights,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
            "covariance_cache": self.covariance_cache, "cache_hit": self.cache_hit, "streaming": self.streaming,
            "fused": self.fused, "onload_device": self.onload_device,
        }
        if self.plus is not None:
            p = self.plus
            out["plus"] = {
                "candidates": len(p.layers[0].scores) if p.layers else 0, "budget": p.budget, "realised": p.realised,
                "layers": [{"name": l.name, "compactness": l.compactness, "candidate": l.candidate, "scores": l.scores,
                            "rank": l.rank, "alpha": l.alpha} for l in p.layers],
                "rank_histogram": {kind: {str(r): n for r, n in h.items()} for kind, h in p.rank_histogram().items()},
            }
        return out

    def summary(self) -> str:
        """The report as text (the one renderer: logged by :func:`init_adapters`, printed by the command line)."""
        ranks = sorted({l["rank"] for l in self.layers})
        lines = [
            f"CorDA-{self.mode.upper()}: {len(self.layers)} layers, rank(s) {_spread(ranks)}, "
            f"{self.n_statistics} distinct input statistics ({self.statistics_mib:.1f} MiB"
            + (" at peak, streaming by block)" if self.streaming else ")"),
            *self._shape_lines(),
            f"calibration: {self.n_samples} samples, {self.n_tokens} tokens"
            + (f" (from cache {self.covariance_cache})" if self.cache_hit else ""),
            f"damping λ used: {sorted({round(l['damping'], 6) for l in self.layers})}",
            "time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()),
        ]
        lines += self._notes()
        if self.plus is not None:
            chosen = [l.candidate for l in self.plus.layers]
            lines.insert(1, f"CorDA++: {len({*chosen})} of {len(self.plus.layers[0].scores)} candidates chosen, "
                            f"budget {self.plus.budget} → {self.plus.realised} adapter parameters; ranks per module: "
                            + ", ".join(f"{kind} {_rank_range(hist)}"
                                        for kind, hist in self.plus.rank_histogram().items()))
        return "\n".join(lines)

    def _shape_lines(self) -> list[str]:
        """One line per module kind and shape: ``  30 x down_proj   576x1536``."""
        from collections import Counter

        shapes = Counter((_kind(l["name"]), tuple(l["shape"])) for l in self.layers)
        return [f"  {n:3d} x {kind:10s} {shape[0]}x{shape[1]}" for (kind, shape), n in sorted(shapes.items())]

    def _notes(self) -> list[str]:
        """Warnings and the less common circumstances: too little data, offloaded or quantized bases, onloading."""
        lines = []
        if self.low_data:
            lines.append("WARNING: " + low_data_message(self.low_data))
        if self.weights.get("host") or self.weights.get("disk"):
            lines.append(f"offloaded model: targeted weights {self.weights} (residuals kept where each weight lives)")
        if self.onload_device:
            lines.append(f"sequential onloading: each block calibrated and decomposed on {self.onload_device}")
        quantized = [l["quantized"] for l in self.layers if "quantized" in l]
        if quantized:
            lines.append(f"quantized base layers: {len(quantized)} ({quantized[0]['quantization']}), residual "
                         f"{quantized[0]['residual']}; ‖W_res_stored + s·B·A − W_q‖/‖W_q‖ max "
                         f"{max(q['model_vs_quantized'] for q in quantized):.3g}, residual quantization noise max "
                         f"{max(q['residual_quantization'] for q in quantized):.3g}")
        return lines


def _kind(name: str) -> str:
    """``down_proj`` for a layer, ``down_proj[e]`` for an expert of a 3-D parameter."""
    base, expert = split_name(name)
    return base.split(".")[-1] + ("[e]" if expert is not None else "")


def _spread(values: list) -> str:
    """``16`` for one value, ``2..64`` for several."""
    return str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}" if values else "-"


def _rank_range(hist: dict) -> str:
    """``mean (min–max)`` of a ``{rank: count}`` histogram."""
    n = sum(hist.values())
    return f"{sum(r * c for r, c in hist.items()) / n:.1f} ({min(hist)}–{max(hist)})"


@dataclass
class _Outcome:
    """What a statistics source produced: factors, the statistic layout, and the tallies the report needs."""

    factors: dict[str, LayerFactors]
    key_of: dict[str, str]
    targets: list[Target]
    lora: LoraSpec
    n_statistics: int = 0
    statistics_bytes: int = 0
    n_samples: int = 0
    n_tokens: int = 0
    seconds: dict = field(default_factory=dict)
    plan: Any = None
    tokens: dict = field(default_factory=dict)  # statistic key -> (real tokens, samples, width)

    def record_tokens(self, stats: CovarianceStats) -> None:
        for key, s in stats.sums.items():
            self.tokens[key] = (stats.n_tokens[key], stats.n_samples[key], int(s.shape[0]))

    def tally_candidates(self, cands: list[CovarianceStats]) -> None:
        """Count one block's candidate groups (streaming CorDA++): the groups' data add up, blocks do not."""
        self.n_statistics += sum(len(c.sums) for c in cands)
        self.statistics_bytes = max(self.statistics_bytes, sum(c.nbytes() for c in cands))
        self.n_samples = max(self.n_samples, sum(max(c.n_samples.values()) for c in cands))
        self.n_tokens = max(self.n_tokens, sum(max(c.n_tokens.values()) for c in cands))
        for c in cands:
            self.key_of.update(c.layer_keys())

    def tally(self, stats: CovarianceStats, disjoint: bool = False, peak: bool = False) -> None:
        """Count ``stats``: ``disjoint`` data (CorDA++ candidate groups) adds samples, else the largest count is
        kept; ``peak`` (streaming blocks) keeps the largest size, else sizes add up."""
        self.n_statistics += len(stats.sums)
        size = stats.nbytes()
        self.statistics_bytes = max(self.statistics_bytes, size) if peak else self.statistics_bytes + size
        samples, tokens = max(stats.n_samples.values()), max(stats.n_tokens.values())
        if disjoint:
            self.n_samples += samples
            self.n_tokens += tokens
        else:
            self.n_samples = max(self.n_samples, samples)
            self.n_tokens = max(self.n_tokens, tokens)
        self.key_of.update(stats.layer_keys())
        if not disjoint:  # CorDA++ records the statistics it selects instead
            self.record_tokens(stats)


# ---------------------------------------------------------------------------------------------------- configure
def configure(lora_config=None, corda_config: Optional[CordaConfig] = None, **shortcuts) -> tuple[LoraSpec, CordaConfig]:
    """``(LoraSpec, CordaConfig)`` of a call: ``lora_config`` (a ``peft.LoraConfig``, a :class:`LoraSpec` or None)
    and ``corda_config``, with the non-None ``shortcuts`` applied on top: ``rank`` / ``lora_alpha`` /
    ``target_modules`` / ``task_type`` (LoRA), ``mode`` / ``residual_folder`` (CorDA), ``streaming`` /
    ``covariance_cache`` / ``use_label_mask`` / ``onload_device`` (calibration). Invalid values raise
    :class:`~corda_fast.CordaConfigError` naming the field."""
    if lora_config is None:
        lora = LoraSpec()
    elif isinstance(lora_config, LoraSpec):
        lora = lora_config
    else:
        lora = LoraSpec.from_peft(lora_config)
    config = corda_config if corda_config is not None else CordaConfig()
    if not isinstance(config, CordaConfig):
        raise TypeError(f"corda_config must be a corda_fast.CordaConfig, got {type(config).__name__} (PEFT's own "
                        "CordaConfig belongs in LoraConfig.corda_config).")
    peft_mode = getattr(getattr(lora_config, "corda_config", None), "corda_method", None)
    if peft_mode is not None and shortcuts.get("mode") is None:  # PEFT's CordaConfig names the mode
        if corda_config is not None and corda_config.mode != peft_mode:
            raise CordaConfigError(f"lora_config.corda_config.corda_method={peft_mode!r} and CordaConfig.mode="
                                   f"{corda_config.mode!r} disagree: give one of them (or mode=).")
        config = config.replace(mode=peft_mode)
    given = {k: v for k, v in shortcuts.items() if v is not None}
    lora_changes = {{"rank": "r"}.get(k, k): given.pop(k) for k in ("rank", "lora_alpha", "target_modules", "task_type")
                    if k in given}
    calib_changes = {k: given.pop(k) for k in ("streaming", "covariance_cache", "use_label_mask", "onload_device")
                     if k in given}
    if "residual_folder" in given:
        config = config.replace(residual_folder=given.pop("residual_folder"))
    mode = given.pop("mode", None)
    if given:
        raise TypeError(f"unknown shortcut(s) {sorted(given)}")
    if lora_changes:
        try:
            lora = lora.replace(**lora_changes)
        except CordaConfigError as exc:  # name the argument the caller typed: rank=, not LoraConfig.r
            if "r" in lora_changes and "LoraConfig.r=" in str(exc):
                raise CordaConfigError(str(exc).replace("LoraConfig.r=", "rank=", 1).replace(
                    " is invalid", " (LoraConfig.r) is invalid", 1)) from None
            raise
    if calib_changes:
        config = config.replace(calibration=config.calibration.replace(**calib_changes))
    if mode is not None:
        config = config.replace(mode=mode)
    if config.show_progress and distributed.is_active(config.calibration.distributed) \
            and distributed.rank_and_world()[0] != 0:
        config = config.replace(show_progress=False)  # one set of progress bars: rank 0's
    return lora, config


def _statistics_may_not_fit(model: nn.Module, targets: list[Target], config: CordaConfig) -> bool:
    """Whether the statistics (upper bound: one per target, per CorDA++ candidate) exceed a quarter of the free
    memory of the model's device."""
    per = 8 if config.precision == "float64" else 4
    need = sum(t.d_in * t.d_in * per for t in targets) * (config.plus.candidates if config.plus is not None else 1)
    device = model_device(model)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return False
    return need > free / 4


# ---------------------------------------------------------------------------------------------------- source
def plan_source(model: nn.Module, loader: Any, targets: list[Target], config: CordaConfig) -> str:
    """Which statistics source this call uses, checked before anything runs: ``"plus"`` (CorDA++ candidates;
    ``"plus_streaming"`` block by block), ``"cache"`` (an existing, complete ``covariance_cache``), ``"streaming"``
    (block by block; with a cache folder, resumable) or ``"one_pass"``."""
    calib = config.calibration
    cache = calib.covariance_cache
    folder, cache_hit = _cache_state(model, targets, config)
    streaming = calib.streaming
    if streaming == "auto":
        streaming = not cache_hit and _statistics_may_not_fit(model, targets, config)
        if distributed.is_active(calib.distributed):  # free memory differs by rank; all must take the same path
            streaming = any(distributed.gather_objects(streaming))
    if config.plus is not None:
        if cache is not None:
            raise ValueError("CorDA++ (corda_config.plus) does not read or write a covariance_cache (its statistics "
                             "are per candidate group); drop covariance_cache.")
        if loader is None or (streaming and callable(loader) and not hasattr(loader, "__iter__")):
            raise ValueError("CorDA++ (corda_config.plus) needs a calibration `loader`"
                             + (" of batches (iterable) to stream." if streaming else "."))
        return "plus_streaming" if streaming else "plus"
    if streaming and not (cache_hit and folder is None):
        if loader is None or (callable(loader) and not hasattr(loader, "__iter__")):
            raise ValueError("streaming=True needs an iterable calibration `loader` of batches.")
        if cache is not None and folder is None:
            raise ValueError(f"streaming=True writes its covariance_cache as a folder, one file per block, so that a "
                             f"run resumes: '{cache}' names a file; give a folder path (without the .safetensors "
                             "suffix), or streaming=False to write one file.")
        if folder is not None:
            check_writable(cache, "covariance_cache folder")
        return "streaming"
    if cache_hit:
        _check_cache(cache, loader, config, folder)
        return "cache"
    if loader is None:
        raise ValueError("init_adapters needs a calibration `loader` (or an existing `covariance_cache`).")
    if folder is not None and folder.present() and not calib.overwrite_cache:
        raise CacheError(f"covariance cache folder '{cache}' holds {len(folder.present())} of {len(folder.by_block)} "
                         "blocks (an interrupted streaming run): resume it with streaming=True, or recalibrate "
                         "(overwrite_cache=True).")
    check_writable(cache, "covariance_cache " + ("folder" if folder is not None else "file"))
    return "one_pass"


def _cache_folder(model: nn.Module, targets: list[Target], config: CordaConfig):
    """The :class:`~corda_fast.block_cache.BlockCache` when ``covariance_cache`` names a folder, else ``None``."""
    cache = config.calibration.covariance_cache
    return block_cache_for(cache, model, targets, config) if cache is not None and block_cache.is_folder(cache) \
        else None


def _cache_state(model: nn.Module, targets: list[Target], config: CordaConfig):
    """``(the BlockCache of a folder cache or None, whether the cache exists whole)``; ranks must agree."""
    calib = config.calibration
    cache = calib.covariance_cache
    folder = _cache_folder(model, targets, config)
    if folder is not None and distributed.is_active(calib.distributed):
        raise ValueError(f"covariance_cache '{cache}' is a folder (one file per block); with distributed calibration "
                         "give a file (*.safetensors) instead.")
    cache_hit = cache is not None and not calib.overwrite_cache and (
        folder.complete() if folder is not None else os.path.isfile(cache))
    if cache is not None and distributed.is_active(calib.distributed):
        # every rank must take the same path (their collectives must match); no rank writes the cache before all
        # have passed this gather, so a shared filesystem gives every rank the same answer
        hits = distributed.gather_objects(cache_hit)
        if any(hits) != all(hits):
            raise CacheError(f"covariance_cache '{cache}' exists on ranks {[r for r, h in enumerate(hits) if h]} "
                             "only: give every rank the same file (a shared filesystem) or another path.")
    return folder, cache_hit


def _check_cache(cache: str, loader: Any, config: CordaConfig, folder=None) -> None:
    """An existing cache is readable, and made from the data ``loader`` yields (when a loader is given). A folder's
    files are checked as they are read (their data fingerprint against the loader's)."""
    if folder is not None:
        if loader is not None and data_fingerprint(loader, config) is None:
            raise CacheError(f"covariance cache folder '{cache}' exists, and a run_model() callable's data cannot be "
                             "checked against it: pass loader=None to use it as it is, or another path.")
        return
    header = read_cache_metadata(cache)
    meta = json.loads(header.get("meta", "{}"))
    recorded = meta.get("data_fingerprint")
    if bool(meta.get("route_all_experts")) != config.calibration.route_all_experts and any(
            name.endswith("]") for name in json.loads(header.get("members", "{}"))):
        raise CacheError(f"covariance cache '{cache}' holds expert statistics made with route_all_experts="
                         f"{bool(meta.get('route_all_experts'))}; the config asks for "
                         f"{config.calibration.route_all_experts}. Recalibrate (overwrite_cache=True or another path).")
    if loader is None:
        return
    way_out = ("pass loader=None to use the cache as it is, another covariance_cache path, or "
               "CalibrationConfig(overwrite_cache=True) to recalibrate and overwrite it")
    found = data_fingerprint(loader, config)
    if found is None:
        raise CacheError(f"covariance cache '{cache}' exists, and a run_model() callable's data cannot be checked "
                         f"against it: {way_out}.")
    if found != recorded:
        raise CacheError(f"covariance cache '{cache}' was computed from other calibration data than the loader "
                         f"passed: {way_out}.")


def _decompose(stats: CovarianceStats, targets: list[Target], config: CordaConfig,
               bases: Optional[dict] = None) -> dict[str, LayerFactors]:
    """Decompose (releasing each statistic once used), spread over the ranks when calibration is distributed;
    ``bases`` (CorDA++'s scored eigen-decompositions) are reused where given."""
    if distributed.is_active(config.calibration.distributed):
        return decompose_sharded(stats, targets, config, release=True)
    return decompose(stats, targets, config, release=True, bases=bases)


def _timed(outcome: _Outcome, stage: str, t0: float) -> float:
    now = time.perf_counter()
    outcome.seconds[stage] = outcome.seconds.get(stage, 0.0) + now - t0
    return now


def run_source(source: str, model: nn.Module, loader: Any, targets: list[Target], lora: LoraSpec,
               config: CordaConfig) -> _Outcome:
    """Statistics from ``source``, decomposed into factors (each statistic released once decomposed)."""
    out = _Outcome({}, {}, targets, lora)
    run = {"plus": _run_plus, "plus_streaming": _run_plus_streaming, "streaming": _run_streaming}.get(source, _run_stats)
    run(out, source, model, loader, config)
    return out


def _use_plan(out: _Outcome, model: nn.Module, plan_: Any) -> None:
    """CorDA++'s ranks and alphas into the outcome: every layer gets an explicit (escaped full-name) entry; the
    user's patterns were the uniform baseline."""
    out.plan = plan_
    out.lora = out.lora.replace(rank_pattern=plan_.rank_pattern, alpha_pattern=plan_.alpha_pattern)
    out.targets = resolve_targets(model, out.lora)


def _run_plus(out: _Outcome, source: str, model: nn.Module, loader: Any, config: CordaConfig) -> None:
    t0 = time.perf_counter()
    candidates = collect_candidates(model, loader, config.plus.candidates, config, out.targets)
    for c in candidates:
        out.tally(c, disjoint=True)
    t0 = _timed(out, "calibrate", t0)
    reuse = config.resolved_svd_method == "gram" and not distributed.is_active(config.calibration.distributed)
    _use_plan(out, model, plan(candidates, out.targets, config, use_rslora=out.lora.use_rslora, keep_bases=reuse))
    del candidates
    t0 = _timed(out, "select_allocate", t0)
    out.key_of = out.plan.stats.layer_keys()
    out.record_tokens(out.plan.stats)
    out.factors = _decompose(out.plan.stats, out.targets, config, out.plan.bases)  # one candidate: scored bases reused
    out.plan.stats = None  # released
    out.plan.bases = {}
    _timed(out, "decompose", t0)


def _run_plus_streaming(out: _Outcome, source: str, model: nn.Module, loader: Any, config: CordaConfig) -> None:
    """CorDA++ block by block, in two passes: the first keeps each layer's candidate scores (spectra, compactness:
    kilobytes) and drops the statistics; ranks are allocated over all layers; the second recomputes each block's
    statistics and decomposes the chosen ones at their allocated ranks."""
    quiet = config.replace(show_progress=False)
    groups = config.plus.candidates
    t0 = time.perf_counter()
    scores = None
    for cands in iter_block_candidates(model, loader, config, out.targets, groups):
        out.tally_candidates(cands)
        t0 = _timed(out, "calibrate", t0)
        scores = merge_scores(scores, score_candidates(cands, out.targets, quiet))
        del cands
        offload.release_host_memory()
        t0 = _timed(out, "select_allocate", t0)
    _use_plan(out, model, decide(None, scores, out.targets, config, use_rslora=out.lora.use_rslora))
    t0 = _timed(out, "select_allocate", t0)
    for cands in iter_block_candidates(model, loader, config, out.targets, groups):
        chosen = selected_statistics(cands, out.plan, scores.layer_keys)
        del cands
        out.key_of.update(chosen.layer_keys())
        out.record_tokens(chosen)
        t0 = _timed(out, "calibrate_again", t0)
        out.factors.update(_decompose(chosen, out.targets, quiet))
        del chosen
        offload.release_host_memory()
        t0 = _timed(out, "decompose", t0)


def _run_streaming(out: _Outcome, source: str, model: nn.Module, loader: Any, config: CordaConfig) -> None:
    quiet = config.replace(show_progress=False)
    t0 = time.perf_counter()
    folder = _cache_folder(model, out.targets, config)  # streaming writes only folders (checked in plan_source)
    for block_stats in iter_block_statistics(model, loader, config, out.targets, cache=folder):
        out.tally(block_stats, peak=True)
        t0 = _timed(out, "calibrate", t0)
        out.factors.update(_decompose(block_stats, out.targets, quiet))
        del block_stats
        offload.release_host_memory()  # the block's statistics and decomposition workspace go back to the OS
        t0 = _timed(out, "decompose", t0)


def _run_stats(out: _Outcome, source: str, model: nn.Module, loader: Any, config: CordaConfig) -> None:
    """One pass over the whole model, or a cache."""
    t0 = time.perf_counter()
    cache = config.calibration.covariance_cache
    folder = _cache_folder(model, out.targets, config)
    if source == "cache" and folder is not None:
        found = data_fingerprint(loader, config) if loader is not None else None
        stats = block_cache.load_folder(folder, model_fingerprint(model), found)
        logger.info("loaded covariance statistics of %d blocks from %s", len(folder.by_block), cache)
    elif source == "cache":
        stats = CovarianceStats.load(cache, model_fingerprint(model), out.targets, config.normalization)
        logger.info("loaded covariance statistics from %s", cache)
    else:
        stats = collect_covariance(model, loader, config, out.targets)
        if folder is not None:
            block_cache.save_folder(folder, stats, stats.model_fingerprint)
        elif cache is not None and distributed.rank_and_world()[0] == 0:  # identical on every rank
            stats.save(cache)
    out.tally(stats)
    t0 = _timed(out, "calibrate", t0)
    out.factors = _decompose(stats, out.targets, config)  # statistics freed as they are used
    del stats
    _timed(out, "decompose", t0)


# ---------------------------------------------------------------------------------------------------- build, report
def build(model: nn.Module, outcome: _Outcome, config: CordaConfig, initial_adapter_dir: Optional[str],
          fused: bool) -> tuple[Any, dict, int]:
    """``(peft model, quantization report, number of fused layers)``. A failure after the model was wrapped
    (saving the initial adapter, fusing) puts the model back exactly as it was before raising."""
    quant_report: dict = {}
    peft_model, undo = build_with_undo(model, outcome.factors, outcome.targets, config, outcome.lora,
                                       quant_report=quant_report)
    try:
        if initial_adapter_dir is not None:
            save_initial_adapter(peft_model, initial_adapter_dir)
        n_fused = len(fuse(peft_model).fused) if fused else 0
    except BaseException:
        undo()
        raise
    undo.release()
    return peft_model, quant_report, n_fused


def fill_report(report: InitReport, outcome: _Outcome, quant_report: dict, n_fused: int, build_seconds: float,
                total_seconds: float) -> InitReport:
    """Everything the report says, in one place."""
    report.seconds.update(outcome.seconds)
    report.seconds["build_peft"] = build_seconds
    report.seconds["total"] = total_seconds
    report.n_statistics = outcome.n_statistics
    report.statistics_mib = outcome.statistics_bytes / 2**20
    report.n_samples, report.n_tokens = outcome.n_samples, outcome.n_tokens
    report.cache_hit = report.source == "cache"
    report.streaming = report.source in ("streaming", "plus_streaming")
    report.plus = outcome.plan
    report.fused = n_fused
    by_name = {t.name: t for t in outcome.targets}
    for name, f in outcome.factors.items():
        t = by_name[name]
        report.layers.append({
            "name": name, "shape": [t.d_out, t.d_in], "rank": t.rank, "scaling": t.scaling, "damping": f.damping,
            "shares_input_with": outcome.key_of[name], "tokens": outcome.tokens.get(outcome.key_of[name], (0,))[0],
            "sigma_adapted_max": float(f.singular_values.max()), "sigma_adapted_min": float(f.singular_values.min()),
            **({"quantized": quant_report[name]} if name in quant_report else {}),
        })
    report.low_data = low_data(outcome)
    if report.low_data:
        logger.warning("%s", low_data_message(report.low_data))
    if quant_report:
        worst = max(quant_report.items(), key=lambda kv: kv[1]["model_vs_quantized"])
        logger.info("quantized base: %d layers, residual %s; largest ‖W_res_stored + sBA − W_q‖/‖W_q‖ = %.3g (%s)",
                    len(quant_report), worst[1]["residual"], worst[1]["model_vs_quantized"], worst[0])
    return report


def low_data(outcome: _Outcome) -> list[dict]:
    """The statistics built from fewer real tokens than their width (rank-deficient: the damping, not the data,
    decides their adapters), with how many more samples of the same average length would be needed."""
    members: dict[str, list] = {}
    for name, key in outcome.key_of.items():
        if name in outcome.factors:
            members.setdefault(key, []).append(name)
    out = []
    for key, names in members.items():
        tokens, samples, width = outcome.tokens.get(key, (None, 0, 0))
        if tokens is not None and tokens < width:
            per_sample = tokens / max(samples, 1)
            more = math.ceil((width - tokens) / per_sample) if per_sample > 0 else None
            out.append({"layers": names, "width": width, "tokens": tokens, "more_samples": more})
    return out


def low_data_message(rows: list[dict]) -> str:
    first = rows[0]
    return (f"too little calibration data for {len(rows)} statistic(s): e.g. {first['layers'][:3]} read inputs "
            f"{first['width']} wide from {first['tokens']} real tokens (rank-deficient; the damping decides the "
            f"adapter); about {first['more_samples']} more samples of the same length would cover it"
            + (f" (the widest needs {max(r['width'] - r['tokens'] for r in rows)} more tokens)" if len(rows) > 1 else "")
            + ".")


def _check_quantized(targets: list[Target], config: CordaConfig) -> None:
    torchao_layers = [t.name for t in targets if t.quant == "torchao"]
    if torchao_layers and config.quantized_residual == "requantize" and config.requantize_config is None:
        raise TargetError(
            f"{len(torchao_layers)} targeted layer(s) hold torchao-quantized weights (e.g. '{torchao_layers[0]}'), "
            "and a torchao weight does not record the config that made it: pass CordaConfig(requantize_config=<that "
            "torchao config, e.g. Int8WeightOnlyConfig()>) to re-quantize the residual, or quantized_residual='keep'.")


# ---------------------------------------------------------------------------------------------------- the call
def init_adapters(
    model: nn.Module, loader: Any = None, *, lora_config: Any = None, corda_config: Optional[CordaConfig] = None,
    mode: Optional[str] = None, rank: Optional[int] = None, lora_alpha: Optional[float] = None,
    target_modules: Union[None, str, list] = None, task_type: Optional[str] = None,
    streaming: Union[None, bool, str] = None, covariance_cache: Optional[str] = None,
    use_label_mask: Optional[bool] = None, onload_device: Union[None, str, torch.device] = None,
    residual_folder: Optional[str] = None, initial_adapter_dir: Optional[str] = None, fused: bool = False,
    return_report: bool = False,
):
    """Initialise CorDA adapters on ``model`` from calibration data and return a ready-to-train PEFT model.

    Args:
        model: a transformers (or any torch) model in float32/bfloat16/float16 (a ``torch.compile`` wrapper is
            unwrapped). Its targeted base weights become the residual ``W_res`` (as PEFT's CorDA/PiSSA do); on error
            it is left exactly as it was.
        loader: calibration batches — an iterable of dicts with ``input_ids`` ``(batch, seq)`` and optional
            ``attention_mask`` (padding on either side is ignored) / ``labels``; tensors of input ids;
            ``(input_ids, attention_mask)`` tuples; or a zero-argument callable that runs the model. May be
            ``None`` when ``covariance_cache`` exists.
        lora_config: a ``peft.LoraConfig`` (or :class:`~corda_fast.LoraSpec`): ``r``, ``lora_alpha``,
            ``target_modules``, ``exclude_modules``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``,
            ``lora_dropout``, ``task_type`` are honoured; LoRA options CorDA cannot honour (DoRA, LoRA bias, ...)
            are rejected by name. Default: rank 8, ``alpha = r``, every linear layer but the output head.
        corda_config: :class:`~corda_fast.CordaConfig` — mode, normalisation, precision, damping, calibration
            (cache, streaming, distributed), ``plus=PlusConfig(...)`` for CorDA++, quantized bases.
        mode, rank, lora_alpha, target_modules, task_type, streaming, covariance_cache, use_label_mask,
            onload_device, residual_folder: shortcuts applied on top of the two configs (``rank`` is
            ``LoraConfig.r``; ``streaming``, ``covariance_cache``, ``use_label_mask`` and ``onload_device`` are
            ``CordaConfig.calibration``'s). With ``use_label_mask`` (default), tokens whose ``labels`` are -100
            enter no statistic. ``streaming=True, onload_device="cuda:0"``: sequential onloading of a model held in
            host memory. A model accelerate dispatched (``device_map``, ``max_memory``, ``offload_folder``) works
            as it is: residuals stay where each weight lives (``residual_folder`` for disk-offloaded layers).
        initial_adapter_dir: if given, the freshly initialised adapter is saved there (needed later by
            :func:`corda_fast.save_as_lora` to convert the trained adapter to a plain LoRA).
        fused: switch the returned model's LoRA layers to the fused training path (:func:`corda_fast.fuse`).
        return_report: also return an :class:`InitReport`.
    Returns:
        ``peft.PeftModel`` (and the report if ``return_report``).
    """
    # torch.compile'd models: calibrate and wrap the original module in eager mode (hooks added to a compiled
    # graph would force recompiles); compile the returned PEFT model again if wanted.
    model = getattr(model, "_orig_mod", model)
    lora, config = configure(lora_config, corda_config, mode=mode, rank=rank, lora_alpha=lora_alpha,
                             target_modules=target_modules, task_type=task_type, streaming=streaming,
                             covariance_cache=covariance_cache, use_label_mask=use_label_mask,
                             onload_device=onload_device, residual_folder=residual_folder)
    t0 = time.perf_counter()
    targets, report = _preflight(model, loader, lora, config, initial_adapter_dir)
    outcome = run_source(report.source, model, loader, targets, lora, config)
    t1 = time.perf_counter()
    peft_model, quant_report, n_fused = build(model, outcome, config, initial_adapter_dir, fused)
    t2 = time.perf_counter()
    fill_report(report, outcome, quant_report, n_fused, t2 - t1, t2 - t0)
    logger.info("%s", report.summary())
    return (peft_model, report) if return_report else peft_model


def _preflight(model: nn.Module, loader: Any, lora: LoraSpec, config: CordaConfig,
               initial_adapter_dir: Optional[str]) -> tuple[list[Target], InitReport]:
    """Every check that can fail before anything changes, then ``(targets, the report to fill)``."""
    check_no_adapters(model)
    check_task_type(lora.task_type)
    targets = resolve_targets(model, lora)
    check_shared_weights(model, targets)
    check_experts(model, targets, lora, config)
    _check_quantized(targets, config)
    weights = check_offload(model, targets, config)
    check_spill(targets, config)
    check_writable(initial_adapter_dir, "initial_adapter_dir folder")
    source = plan_source(model, loader, targets, config)
    onload = config.calibration.onload_device
    report = InitReport(mode=config.mode, source=source, covariance_cache=config.calibration.covariance_cache,
                        weights=weights, onload_device=str(onload) if onload is not None else None)
    return targets, report
