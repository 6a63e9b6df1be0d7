"""PEFT's own CorDA entry point, made fast: :func:`preprocess_corda` (PEFT's signature and contract) and
:func:`patch_peft` (code that calls PEFT's ``preprocess_corda`` through its usual import paths runs this one).

PEFT's contract: ``preprocess_corda(model, lora_config, run_model=...)`` leaves on every target module an ``eigens``
attribute (``U_WC`` ``(d_out, r)``, ``S_WC`` ``(r,)``, ``V_WC`` ``(d_in, r)`` = ``C_f⁻¹ V``), from which
``peft.get_peft_model(model, lora_config)`` with ``init_lora_weights="corda"`` builds ``A``, ``B`` and the residual;
with ``prune_temporary_fields=False`` also ``sample_count``, ``covariance_matrix`` ``(d_in, d_in)`` (the covariance:
sums divided by the sample count), ``corda_method`` and ``rank``. Here the statistics come from corda_fast's
calibration and the decomposition from corda_fast's. How ``run_model`` is counted: see :func:`collect_covariance`
(``run_model`` may run padded batches of token ids of any size — each forward's ``attention_mask`` is honoured and
every sample normalised alone; a forward on float inputs is one sample, as PEFT counts it).

``peft.CordaConfig`` fields: ``corda_method`` (the mode), ``cache_file`` (PEFT's eigens cache: read if it exists,
written otherwise, in PEFT's format), ``covariance_file`` (PEFT's covariance file: ``{layer name: covariance}``, read
if it exists, written otherwise in that format, so PEFT reads ours and we read PEFT's; corda_fast's own safetensors
statistics cache at that path is read too), ``verbose`` (progress bars and per-layer logging) and
``prune_temporary_fields`` are honoured; ``use_float16_for_covariance`` is not: statistics accumulate in float32
(float16 sums of squares overflow and lose the small components KPM adapts), and a warning says so.
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
from .fingerprint import model_fingerprint
from .preflight import check_no_adapters
from .stats import CacheError, CovarianceStats
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
            given by each forward's ``attention_mask`` is left out). May be ``None`` when ``cache_file`` or
            ``covariance_file`` exists.
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
    config = CordaConfig(mode=method, show_progress=verbose)
    stats = _statistics(model, hooked_model, run_model, targets, lora, config, getattr(peft_cc, "covariance_file", None))
    fields = None if getattr(peft_cc, "prune_temporary_fields", True) else _temporary_fields(stats, targets, method)
    factors = decompose(stats, targets, config, release=True)
    _set_eigens(targets, factors, verbose)
    for t in targets:  # PEFT's temporary fields, when it would leave them
        for k, v in (fields or {}).get(t.name, {}).items():
            setattr(t.module, k, v)
    if cache_file:
        os.makedirs(os.path.dirname(os.path.abspath(cache_file)), exist_ok=True)
        torch.save({f"{t.name}.eigens.{k}": getattr(t.module.eigens, k) for t in targets
                    for k in ("S_WC", "U_WC", "V_WC")}, cache_file)


def _set_eigens(targets, factors, verbose: bool) -> None:
    """PEFT's ``eigens`` of every target from its factors: ``U_WC = B/√(S/s)``, ``V_WC = Aᵀ/√(S/s)``."""
    from peft.tuners.lora.corda import CordaEigens

    for t in targets:
        f = factors[t.name]
        root = (f.singular_values.double() / f.scaling).sqrt()
        t.module.eigens = CordaEigens(S_WC=f.singular_values.float(), U_WC=(f.B.double() / root).float(),
                                      V_WC=(f.A.double().T / root).float())
        if verbose:
            logger.info("%s: rank %d, damping %g, adapted σ %.4g..%.4g", t.name, t.rank, f.damping,
                        float(f.singular_values.min()), float(f.singular_values.max()))


def _temporary_fields(stats: CovarianceStats, targets, method: str) -> dict[str, dict]:
    """What PEFT leaves on each target with ``prune_temporary_fields=False``: ``sample_count`` (samples the statistic
    counted; absent when it came from a covariance file, as in PEFT), ``covariance_matrix`` (float32, on the layer's
    device), ``corda_method`` and ``rank``. Taken before the decomposition releases the statistics."""
    out = {}
    keys = stats.layer_keys()
    covs = {k: stats.covariance(k, torch.float32) for k in {keys[t.name] for t in targets}}  # once per statistic
    for t in targets:
        key = keys[t.name]
        device = t.module.weight.device if t.module.weight.device.type != "meta" else torch.device("cpu")
        fields = {"covariance_matrix": covs[key].to(device), "corda_method": method, "rank": t.rank}
        if not stats.meta.get("from_peft_covariance_file"):
            fields["sample_count"] = stats.n_samples[key]
        out[t.name] = fields
    return out


def _statistics(model, hooked_model, run_model, targets, lora, config, cov_file) -> CovarianceStats:
    """Statistics from ``covariance_file`` (PEFT's format, or corda_fast's safetensors cache) or by running
    ``run_model`` (then written to ``covariance_file`` in PEFT's format, when one is named)."""
    if cov_file and os.path.isfile(cov_file) and os.path.getsize(cov_file) > 0:
        if _is_safetensors(cov_file):
            return CovarianceStats.load(cov_file, model_fingerprint(model), targets, config.normalization)
        return read_peft_covariance(cov_file, model, targets, config)
    if run_model is None:
        raise ValueError("preprocess_corda needs run_model (or an existing cache_file / covariance_file).")
    hooked = hooked_model if hooked_model is not None else model
    hooked_targets = targets if hooked is model else resolve_targets(hooked, lora, check_rank=False)
    stats = collect_covariance(hooked, run_model, config, hooked_targets)
    if cov_file:
        write_peft_covariance(stats, targets, cov_file)
    return stats


def _is_safetensors(path: str) -> bool:
    """Whether ``path`` starts like a safetensors file (an 8-byte header length, then a JSON header)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def write_peft_covariance(stats: CovarianceStats, targets, path: str) -> None:
    """Write PEFT's ``covariance_file``: ``torch.save({layer name: covariance (d_in, d_in) float32})``, the
    covariance being the sums divided by the sample count (layers sharing an input share one tensor)."""
    keys = stats.layer_keys()
    covs = {k: stats.covariance(k, torch.float32).cpu().contiguous() for k in {keys[t.name] for t in targets}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({t.name: covs[keys[t.name]] for t in targets}, path)
    logger.info("wrote the covariance of %d layers to %s (PEFT's covariance_file format)", len(targets), path)


def read_peft_covariance(path: str, model: nn.Module, targets, config: CordaConfig) -> CovarianceStats:
    """Statistics from PEFT's ``covariance_file`` (``{layer name: covariance}``): one statistic per distinct tensor
    (layers saved sharing one tensor share it), sample count 1 (the file holds covariances, not sums). Raises
    :class:`CacheError` naming the file and layer for a file that is not one, lacks a target or has a wrong shape."""
    try:
        covs = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CacheError(f"covariance_file '{path}' is neither PEFT's covariance file nor a corda_fast statistics "
                         f"cache ({type(exc).__name__}: {exc}); delete it or give another path.") from exc
    if not isinstance(covs, dict) or not all(torch.is_tensor(v) for v in covs.values()):
        raise CacheError(f"covariance_file '{path}' is not PEFT's covariance file ({{layer name: tensor}}).")
    sums, members, by_storage = {}, {}, {}
    for t in targets:
        c = covs.get(t.name)
        if c is None or tuple(c.shape) != (t.d_in, t.d_in):
            found = "no entry" if c is None else f"shape {tuple(c.shape)}"
            raise CacheError(f"covariance_file '{path}' has {found} for layer '{t.name}', which needs "
                             f"({t.d_in}, {t.d_in}): it was made for another model or target_modules.")
        key = by_storage.setdefault(c.untyped_storage().data_ptr(), t.name)
        if key == t.name:
            sums[key] = c.to(config.dtype)
            members[key] = []
        members[key].append(t.name)
    return CovarianceStats(sums=sums, n_samples={k: 1 for k in sums}, n_tokens={k: 0 for k in sums},
                           members=members, normalization=config.normalization,
                           model_fingerprint=model_fingerprint(model), meta={"from_peft_covariance_file": path})


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
