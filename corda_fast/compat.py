"""PEFT's own CorDA entry point, made fast: :func:`preprocess_corda` (PEFT's signature and contract) and
:func:`patch_peft` (code that calls PEFT's ``preprocess_corda`` through its usual import paths runs this one).

PEFT's contract: ``preprocess_corda(model, lora_config, run_model=...)`` leaves on every target module an ``eigens``
attribute (``U_WC`` ``(d_out, r)``, ``S_WC`` ``(r,)``, ``V_WC`` ``(d_in, r)`` = ``C_f⁻¹ V``), from which
``peft.get_peft_model(model, lora_config)`` with ``init_lora_weights="corda"`` builds ``A``, ``B`` and the residual.
Here the statistics come from corda_fast's calibration (``run_model`` may run padded batches of any size: each
forward's ``attention_mask`` is honoured and every sample normalised alone) and the decomposition from
corda_fast's.

``peft.CordaConfig`` fields: ``corda_method`` (the mode), ``cache_file`` (PEFT's eigens cache: read if it exists,
written otherwise, in PEFT's format), ``covariance_file`` (corda_fast's statistics cache at that path — a file PEFT
wrote there is refused by name), ``verbose`` (progress bars and per-layer logging), ``prune_temporary_fields``
(nothing temporary is ever left on a module, so it is satisfied either way) are honoured;
``use_float16_for_covariance`` is not: statistics accumulate in float32 (float16 sums of squares overflow and lose
the small components KPM adapts), and a warning says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Optional

import torch
from torch import nn

from .calibrate import collect_covariance
from .config import CordaConfig, CordaConfigError, LoraSpec
from .decompose import decompose
from .preflight import check_no_adapters
from .stats import CacheError
from .targets import resolve_targets

logger = logging.getLogger(__name__)


def _corda_config(lora_config) -> tuple[str, object]:
    peft_cc = getattr(lora_config, "corda_config", None)
    if peft_cc is None:
        raise CordaConfigError("preprocess_corda needs lora_config.corda_config (a peft.CordaConfig).")
    return getattr(peft_cc, "corda_method", None), peft_cc


def _load_eigens_cache(path: str, model: nn.Module, targets) -> None:
    from peft.tuners.lora.corda import CordaEigens

    try:
        cache = torch.load(path, map_location="cpu")
        for t in targets:
            t.module.eigens = CordaEigens(S_WC=cache[f"{t.name}.eigens.S_WC"], U_WC=cache[f"{t.name}.eigens.U_WC"],
                                          V_WC=cache[f"{t.name}.eigens.V_WC"])
    except Exception as exc:
        for t in targets:
            t.module.__dict__.pop("eigens", None)
        raise CacheError(f"CorDA cache_file '{path}' cannot be used for this model and lora_config "
                         f"({type(exc).__name__}: {exc}); delete it to recompute.") from exc


@torch.no_grad()
def preprocess_corda(model: nn.Module, lora_config, run_model: Optional[Callable[[], None]] = None,
                     hooked_model: Optional[nn.Module] = None) -> None:
    """PEFT's ``preprocess_corda``, computed by corda_fast: afterwards ``peft.get_peft_model(model, lora_config)``
    builds the CorDA model.

    Args:
        model: the model to adapt (its weights are read, never written here).
        lora_config: a ``peft.LoraConfig`` with ``init_lora_weights="corda"`` and ``corda_config`` set.
        run_model: a zero-argument callable that runs the model on calibration data (batches of any size; padding
            given by each forward's ``attention_mask`` is left out). May be ``None`` when ``cache_file`` exists.
        hooked_model: calibrate on this model instead (same module names), e.g. a copy on another device.
    """
    method, peft_cc = _corda_config(lora_config)
    check_no_adapters(model)
    lora = LoraSpec.from_peft(lora_config)
    targets = resolve_targets(model, lora)
    cache_file = getattr(peft_cc, "cache_file", None)
    if cache_file and os.path.isfile(cache_file) and os.path.getsize(cache_file) > 0:
        _load_eigens_cache(cache_file, model, targets)
        logger.info("loaded CorDA eigens of %d layers from %s", len(targets), cache_file)
        return
    if method not in ("ipm", "kpm"):
        raise CordaConfigError(f"CordaConfig.corda_method={method!r} is invalid: expected 'ipm' or 'kpm' (needed when "
                               "no cache_file exists).")
    if getattr(peft_cc, "use_float16_for_covariance", False):
        logger.warning("use_float16_for_covariance is not honoured: corda_fast accumulates statistics in float32 "
                       "(float16 sums of squares overflow and lose the small components KPM adapts).")
    verbose = bool(getattr(peft_cc, "verbose", False))
    cov_file = getattr(peft_cc, "covariance_file", None)
    config = CordaConfig(mode=method, show_progress=verbose)
    stats = _statistics(model, hooked_model, run_model, targets, lora, config, cov_file)
    factors = decompose(stats, targets, config, release=True)
    from peft.tuners.lora.corda import CordaEigens

    for t in targets:
        f = factors[t.name]
        root = (f.singular_values.double() / f.scaling).sqrt()
        t.module.eigens = CordaEigens(S_WC=f.singular_values.float(), U_WC=(f.B.double() / root).float(),
                                      V_WC=(f.A.double().T / root).float())
        if verbose:
            logger.info("%s: rank %d, damping %g, adapted σ %.4g..%.4g", t.name, t.rank, f.damping,
                        float(f.singular_values.min()), float(f.singular_values.max()))
    if cache_file:
        os.makedirs(os.path.dirname(os.path.abspath(cache_file)), exist_ok=True)
        torch.save({f"{t.name}.eigens.{k}": getattr(t.module.eigens, k) for t in targets
                    for k in ("S_WC", "U_WC", "V_WC")}, cache_file)


def _statistics(model, hooked_model, run_model, targets, lora, config, cov_file):
    """Statistics from ``covariance_file`` (corda_fast's cache format) or by running ``run_model``."""
    from .stats import CovarianceStats, read_cache_metadata

    if cov_file and os.path.isfile(cov_file) and os.path.getsize(cov_file) > 0:
        try:
            read_cache_metadata(cov_file)
        except CacheError as exc:
            raise CacheError(f"covariance_file '{cov_file}' is not a corda_fast statistics cache (PEFT's own "
                             "covariance files are not read): delete it or give another path.") from exc
        return CovarianceStats.load(cov_file, model=model, targets=targets, normalization=config.normalization)
    if run_model is None:
        raise ValueError("preprocess_corda needs run_model (or an existing cache_file / covariance_file).")
    hooked = hooked_model if hooked_model is not None else model
    hooked_targets = targets if hooked is model else resolve_targets(hooked, lora, check_rank=False)
    stats = collect_covariance(hooked, run_model, config, hooked_targets)
    if cov_file:
        stats.save(cov_file)
    return stats


_PATHS = ("peft.tuners.lora.corda", "peft.tuners.lora", "peft.tuners", "peft")


def patch_peft() -> Callable[[], None]:
    """Make PEFT's ``preprocess_corda`` (through ``peft.tuners.lora.corda`` and wherever PEFT re-exports it) run
    :func:`preprocess_corda`. Returns a zero-argument function that undoes the patch; see also :func:`patched_peft`."""
    import importlib

    originals = []
    for path in _PATHS:
        try:
            module = importlib.import_module(path)
        except ImportError:
            continue
        if hasattr(module, "preprocess_corda") and module.preprocess_corda is not preprocess_corda:
            originals.append((module, module.preprocess_corda))
            module.preprocess_corda = preprocess_corda

    def undo():
        for module, original in originals:
            module.preprocess_corda = original

    return undo


@contextlib.contextmanager
def patched_peft():
    """``with corda_fast.patched_peft(): ...`` — :func:`patch_peft` for the block."""
    undo = patch_peft()
    try:
        yield
    finally:
        undo()
