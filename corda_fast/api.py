"""``init_adapters``: calibrate → decompose → PEFT model, in one call."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from .calibrate import CovarianceStats, collect_covariance
from .config import CordaConfig
from .decompose import LayerFactors, decompose
from . import distributed
from .fused import fuse
from .peft_bridge import build_peft_model, save_initial_adapter
from .targets import TargetError, resolve_targets

logger = logging.getLogger(__name__)


@dataclass
class InitReport:
    """What :func:`init_adapters` did: per-layer rank / damping / adapted spectrum, and wall time per stage."""

    mode: str
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
    plus: Any = None  # CorDA++: the plus.PlusPlan (per-layer compactness, candidate, rank; .table(), .plot(path))

    def summary(self) -> str:
        damp = sorted({round(l["damping"], 6) for l in self.layers})
        ranks = sorted({l["rank"] for l in self.layers})
        lines = [
            f"CorDA-{self.mode.upper()}: {len(self.layers)} layers, rank(s) {ranks}, "
            f"{self.n_statistics} distinct input statistics ({self.statistics_mib:.1f} MiB"
            + (" at peak, streaming by block)" if self.streaming else ")"),
            f"calibration: {self.n_samples} samples, {self.n_tokens} tokens"
            + (f" (from cache {self.covariance_cache})" if self.cache_hit else ""),
            f"damping λ used: {damp}",
            "time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()),
        ]
        quantized = [l["quantized"] for l in self.layers if "quantized" in l]
        if quantized:
            lines.append(f"quantized base layers: {len(quantized)} ({quantized[0]['quantization']}), residual "
                         f"{quantized[0]['residual']}; ‖W_res_stored + s·B·A − W_q‖/‖W_q‖ max "
                         f"{max(q['model_vs_quantized'] for q in quantized):.3g}, residual quantization noise max "
                         f"{max(q['residual_quantization'] for q in quantized):.3g}")
        if self.plus is not None:
            chosen = [l.candidate for l in self.plus.layers]
            lines.insert(1, f"CorDA++: {len({*chosen})} of {len(self.plus.layers[0].scores)} candidates chosen, "
                            f"budget {self.plus.budget} → {self.plus.realised} adapter parameters")
        return "\n".join(lines)


def _statistics_may_not_fit(model: nn.Module, targets) -> bool:
    """Whether the float32 statistics (upper bound: one per target) exceed a quarter of the free memory of the
    model's device."""
    need = sum(t.d_in * t.d_in * 4 for t in targets)
    device = next(iter(model.parameters())).device
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return False
    return need > free / 4


def _decompose(stats, targets, config):
    """Decompose (releasing each statistic once used), spread over the ranks when calibration is distributed."""
    if distributed.is_active(config.distributed):
        return distributed.decompose_sharded(stats, targets, config, release=True)
    return decompose(stats, targets, config, release=True)


def init_adapters(
    model: nn.Module,
    loader: Any = None,
    *,
    mode: Optional[str] = None,
    rank: Optional[int] = None,
    lora_alpha: Optional[float] = None,
    target_modules: Union[None, str, list] = None,
    method: Optional[str] = None,
    budget: Optional[int] = None,
    candidates: Optional[int] = None,
    config: Optional[CordaConfig] = None,
    covariance_cache: Optional[str] = None,
    initial_adapter_dir: Optional[str] = None,
    task_type: Optional[str] = None,
    streaming: Union[bool, str] = False,
    cache_device=None,
    fused: bool = False,
    return_report: bool = False,
    **config_overrides,
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
        mode, rank, lora_alpha, target_modules, **config_overrides: shortcuts for :class:`CordaConfig` fields
            (applied on top of ``config``).
        method, budget, candidates: ``method="corda++"`` selects, per layer, the most compact of ``candidates``
            statistics (collected in the same forward pass from disjoint batches) and allocates per-layer ranks
            under ``budget`` adapter parameters (default: the uniform ``rank``'s count); the ranks go to PEFT as
            ``rank_pattern`` / ``alpha_pattern``, so the model saves and loads with plain PEFT. See
            :class:`CordaConfig` for ``min_rank``, ``max_rank`` and the ``plus_*`` options.
        covariance_cache: path of a safetensors statistics cache: loaded (and validated against this model,
            targets and normalisation) if it exists, written after calibration otherwise. One calibration serves
            any rank / mode.
        initial_adapter_dir: if given, the freshly initialised adapter is saved there (needed later by
            :func:`corda_fast.save_as_lora` to convert the trained adapter to a plain LoRA).
        task_type: PEFT task type of the returned model (e.g. ``"CAUSAL_LM"``).
        streaming: ``True`` calibrates and decomposes one transformer block at a time (peak statistic memory =
            one block; same result); ``"auto"`` does so when the statistics could exceed a quarter of the free
            memory of the model's device; ``False`` (default) calibrates the whole model in one pass.
        cache_device: with streaming, where the cached block inputs live (default: the model's device).
        fused: switch the returned model's LoRA layers to the fused training path (:func:`corda_fast.fuse`;
            state dict, saving and loading unchanged; :func:`corda_fast.unfuse` restores PEFT's layers).
        return_report: also return an :class:`InitReport`.
    Returns:
        ``peft.PeftModel`` (and the report if ``return_report``).
    """
    # torch.compile'd models: calibrate and wrap the original module in eager mode (hooks added to a compiled
    # graph would force recompiles); compile the returned PEFT model again if wanted.
    model = getattr(model, "_orig_mod", model)
    overrides = dict(config_overrides)
    for key, value in (("mode", mode), ("rank", rank), ("lora_alpha", lora_alpha), ("target_modules", target_modules),
                       ("method", method), ("budget", budget), ("candidates", candidates)):
        if value is not None:
            overrides[key] = value
    config = (config or CordaConfig()).replace(**overrides) if overrides else (config or CordaConfig())
    if config.show_progress and distributed.is_active(config.distributed) and distributed.rank_and_world()[0] != 0:
        config = config.replace(show_progress=False)  # one set of progress bars: rank 0's
    report = InitReport(mode=config.mode, covariance_cache=covariance_cache)

    t0 = time.perf_counter()
    targets = resolve_targets(model, config)
    torchao_layers = [t.name for t in targets if t.quant == "torchao"]
    if torchao_layers and config.quantized_residual == "requantize" and config.requantize_config is None:
        raise TargetError(
            f"{len(torchao_layers)} targeted layer(s) hold torchao-quantized weights (e.g. '{torchao_layers[0]}'), "
            "and a torchao weight does not record the config that made it: pass requantize_config=<that torchao "
            "config, e.g. Int8WeightOnlyConfig()> to re-quantize the residual, or quantized_residual='keep'.")
    cache_hit = covariance_cache is not None and os.path.isfile(covariance_cache)
    if streaming == "auto":
        streaming = config.method == "corda" and not cache_hit and _statistics_may_not_fit(model, targets)
    if streaming not in (True, False):
        raise ValueError(f"streaming={streaming!r}: expected True, False or 'auto'.")
    plus_plan = None
    if config.method == "corda++":
        if streaming:
            raise ValueError("method='corda++' needs every layer's spectrum before any rank is known: it cannot "
                             "stream block by block; use streaming=False.")
        if covariance_cache is not None:
            raise ValueError("method='corda++' does not read or write a covariance_cache (its statistics are "
                             "per candidate group); drop covariance_cache.")
        if loader is None:
            raise ValueError("init_adapters(method='corda++') needs a calibration `loader`.")
        from .calibrate import collect_candidates
        from .plus import plan

        cands = collect_candidates(model, loader, config.candidates, config, targets)
        report.seconds["calibrate"] = time.perf_counter() - t0
        report.n_statistics = sum(len(c.sums) for c in cands)
        report.statistics_mib = sum(c.nbytes() for c in cands) / 2**20
        report.n_samples = sum(max(c.n_samples.values()) for c in cands)
        report.n_tokens = sum(max(c.n_tokens.values()) for c in cands)
        t1 = time.perf_counter()
        plus_plan = plan(cands, targets, config)
        del cands
        report.seconds["select_allocate"] = time.perf_counter() - t1
        # every layer gets an explicit (escaped full-name) entry; user patterns were the uniform baseline
        config = config.replace(rank_pattern=plus_plan.rank_pattern, alpha_pattern=plus_plan.alpha_pattern)
        targets = resolve_targets(model, config)
        key_of = plus_plan.stats.layer_keys()
        t1 = time.perf_counter()
        factors = _decompose(plus_plan.stats, targets, config)
        plus_plan.stats = None  # released
        report.seconds["decompose"] = time.perf_counter() - t1
        report.plus = plus_plan
    elif streaming:
        if loader is None or (callable(loader) and not hasattr(loader, "__iter__")):
            raise ValueError("streaming=True needs an iterable calibration `loader` of batches.")
        if covariance_cache is not None:
            raise ValueError("streaming=True does not write or read a covariance_cache; use one or the other.")
        from .streaming import iter_block_statistics

        factors, key_of, peak, t_decompose = {}, {}, 0, 0.0
        for block_stats in iter_block_statistics(model, loader, config, targets, cache_device):
            peak = max(peak, block_stats.nbytes())
            report.n_statistics += len(block_stats.sums)
            report.n_samples = max(report.n_samples, max(block_stats.n_samples.values()))
            report.n_tokens = max(report.n_tokens, max(block_stats.n_tokens.values()))
            key_of.update(block_stats.layer_keys())
            t = time.perf_counter()
            factors.update(_decompose(block_stats, targets, config.replace(show_progress=False)))
            t_decompose += time.perf_counter() - t
        report.statistics_mib = peak / 2**20
        report.seconds["calibrate"] = time.perf_counter() - t0 - t_decompose
        report.seconds["decompose"] = t_decompose
    else:
        if cache_hit:
            stats = CovarianceStats.load(covariance_cache, model=model, targets=targets,
                                         normalization=config.normalization)
            report.cache_hit = True
            logger.info("loaded covariance statistics from %s", covariance_cache)
        else:
            if loader is None:
                raise ValueError("init_adapters needs a calibration `loader` (or an existing `covariance_cache`).")
            stats = collect_covariance(model, loader, config, targets)
            if covariance_cache is not None and distributed.rank_and_world()[0] == 0:  # identical on every rank
                stats.save(covariance_cache)
        report.seconds["calibrate"] = time.perf_counter() - t0
        report.n_statistics = len(stats.sums)
        report.statistics_mib = stats.nbytes() / 2**20
        report.n_samples = max(stats.n_samples.values())
        report.n_tokens = max(stats.n_tokens.values())
        key_of = stats.layer_keys()

        t1 = time.perf_counter()
        factors = _decompose(stats, targets, config)  # statistics freed as they are used
        del stats
        report.seconds["decompose"] = time.perf_counter() - t1
    report.streaming = bool(streaming)

    t2 = time.perf_counter()
    quant_report: dict = {}
    peft_model = build_peft_model(model, factors, targets, config, task_type=task_type, quant_report=quant_report)
    if initial_adapter_dir is not None:
        save_initial_adapter(peft_model, initial_adapter_dir)
    if fused:
        report.fused = len(fuse(peft_model).fused)
    report.seconds["build_peft"] = time.perf_counter() - t2
    report.seconds["total"] = time.perf_counter() - t0

    by_name = {t.name: t for t in targets}
    for name, f in factors.items():
        t = by_name[name]
        report.layers.append({
            "name": name, "shape": [t.d_out, t.d_in], "rank": t.rank, "scaling": t.scaling, "damping": f.damping,
            "shares_input_with": key_of[name],
            "sigma_adapted_max": float(f.singular_values.max()), "sigma_adapted_min": float(f.singular_values.min()),
            **({"quantized": quant_report[name]} if name in quant_report else {}),
        })
    if quant_report:
        worst = max(quant_report.items(), key=lambda kv: kv[1]["model_vs_quantized"])
        logger.info("quantized base: %d layers, residual %s; largest ‖W_res_stored + sBA − W_q‖/‖W_q‖ = %.3g (%s)",
                    len(quant_report), worst[1]["residual"], worst[1]["model_vs_quantized"], worst[0])
    logger.info("%s", report.summary())
    return (peft_model, report) if return_report else peft_model
