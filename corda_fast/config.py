"""Configuration: LoRA's knobs in PEFT's shape (:class:`LoraSpec`, read from a ``peft.LoraConfig``) beside CorDA's own
knobs, grouped (:class:`CordaConfig` with :class:`DampingConfig`, :class:`CalibrationConfig` and, for CorDA++,
:class:`PlusConfig`).

Every dataclass validates itself on construction; an invalid value raises :class:`CordaConfigError` naming the field
(``CordaConfig.plus.budget``...) and the allowed values. This module imports nothing of PEFT: a ``peft.LoraConfig``
is read by attribute.

Defaults reproduce PEFT's ``preprocess_corda`` + ``init_lora_weights="corda"``, so a user switching from PEFT gets
the same adapters.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

MODES = ("ipm", "kpm")
NORMALIZATIONS = ("peft", "absmax", "none")
PRECISIONS = ("float32", "float64")
SVD_METHODS = ("auto", "gram", "svd")
UNUSED_TARGET_POLICIES = ("error", "skip")
QUANTIZED_RESIDUALS = ("requantize", "keep")
SPILL_MODES = ("auto", "disk", "host", "memory")
PLUS_ALPHA = ("scaling", "alpha")


class CordaConfigError(ValueError):
    """A configuration field has a value outside its allowed set."""


def _fail(where: str, value, allowed: str) -> None:
    raise CordaConfigError(f"{where}={value!r} is invalid: expected {allowed}.")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_int(owner: str, name: str, value, minimum: int = 1, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not _is_int(value) or value < minimum:
        _fail(f"{owner}.{name}", value, ("None or " if optional else "") + f"an int >= {minimum}")


def _check_choice(owner: str, name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        _fail(f"{owner}.{name}", value, f"one of {allowed}")


def _check_bool(owner: str, name: str, value) -> None:
    if not isinstance(value, bool):
        _fail(f"{owner}.{name}", value, "True or False")


class _Replace:
    def replace(self, **changes):
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------------- LoRA
# peft.LoraConfig fields that corda_fast reads (same names, same meaning).
LORA_FIELDS = ("r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "use_rslora",
               "lora_dropout", "task_type", "target_parameters")
# peft.LoraConfig fields that may differ from their defaults without changing what CorDA computes.
_LORA_HARMLESS = {"init_lora_weights", "corda_config", "inference_mode", "peft_type", "base_model_name_or_path",
                  "revision", "fan_in_fan_out", "auto_mapping", "peft_version", "runtime_config", "modules_to_save",
                  "eva_config", "loftq_config", "layer_replication", "megatron_config", "megatron_core"}
_INIT_OK = (True, "corda")


@dataclass
class LoraSpec(_Replace):
    """The LoRA side of an initialisation, with ``peft.LoraConfig``'s field names and semantics.

    Args:
        r: rank of every adapted layer, unless ``rank_pattern`` says otherwise.
        lora_alpha: alpha; ``None`` means ``alpha = r`` (scaling 1, as in the CorDA examples). A ``peft.LoraConfig``
            always carries a number, which is honoured as is.
        target_modules: ``None`` or ``"all-linear"`` (every ``nn.Linear`` / transformers ``Conv1D`` except the output
            head), a regex (full match on the module name), or a list of names / name suffixes.
        exclude_modules: names / suffixes (or a regex) never adapted, applied after ``target_modules``.
        rank_pattern / alpha_pattern: ``{module name or regex suffix: value}``.
        use_rslora: scaling ``alpha / sqrt(r)`` instead of ``alpha / r``.
        lora_dropout: dropout of the returned LoRA layers (training only; does not affect initialisation).
        task_type: PEFT task type of the returned model (e.g. ``"CAUSAL_LM"``).
        target_parameters: names / dotted suffixes of 3-D expert parameters (``"mlp.experts.gate_up_proj"``,
            ``"mlp.experts.down_proj"``) adapted through PEFT's ``ParamWrapper``, one CorDA decomposition per expert.
            Given alone (``target_modules=None``) no module is adapted, as in PEFT; ``target_modules=[]`` says so too.
    """

    r: int = 8
    lora_alpha: Optional[float] = None
    target_modules: Union[None, str, Sequence[str]] = None
    exclude_modules: Union[None, str, Sequence[str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False
    lora_dropout: float = 0.0
    task_type: Optional[str] = None
    target_parameters: Optional[Sequence[str]] = None

    def __post_init__(self):
        own = "LoraConfig"
        _check_int(own, "r", self.r)
        if self.lora_alpha is not None and (not _is_number(self.lora_alpha) or self.lora_alpha <= 0):
            _fail(f"{own}.lora_alpha", self.lora_alpha, "None or a number > 0")
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                _fail(f"{own}.{name}", pattern, "a dict {module name: value}")
            for key, val in pattern.items():
                ok = _is_number(val) and val > 0 and (name == "alpha_pattern" or _is_int(val))
                if not isinstance(key, str) or not ok:
                    _fail(f"{own}.{name}", pattern,
                          "a dict {str: positive " + ("int" if name == "rank_pattern" else "number") + "}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) and v for v in value) and (
                    value or (name == "target_modules" and self.target_parameters)):
                setattr(self, name, sorted(value) if isinstance(value, set) else list(value))
                continue
            _fail(f"{own}.{name}", value, 'None, "all-linear", a regex string, or a non-empty list of module names'
                  + (" ([] with target_parameters)" if name == "target_modules" else ""))
        value = self.target_parameters
        if value is not None:
            if isinstance(value, str) or not isinstance(value, (list, tuple, set)) or not value or not all(
                    isinstance(v, str) and v for v in value):
                _fail(f"{own}.target_parameters", value, "None or a non-empty list of parameter names / suffixes")
            self.target_parameters = sorted(value) if isinstance(value, set) else list(value)
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            _fail(f"{own}.lora_dropout", self.lora_dropout, "a float in [0, 1)")
        _check_bool(own, "use_rslora", self.use_rslora)
        if self.task_type is not None:
            self.task_type = str(getattr(self.task_type, "value", self.task_type))

    @property
    def alpha(self) -> float:
        """``lora_alpha``, or ``r`` when it is ``None``."""
        return float(self.lora_alpha if self.lora_alpha is not None else self.r)

    @classmethod
    def from_peft(cls, lora_config) -> "LoraSpec":
        """The spec of a ``peft.LoraConfig``. Raises :class:`CordaConfigError` naming every LoRA option that CorDA
        cannot honour (DoRA, LoRA bias, other initialisations, layer subsets, ...) when it differs from PEFT's
        default."""
        try:
            default = type(lora_config)()
        except Exception as exc:  # pragma: no cover - a LoraConfig always builds with defaults
            raise CordaConfigError(f"lora_config of type {type(lora_config).__name__} is not a peft.LoraConfig") from exc
        unsupported = []
        for f in dataclasses.fields(lora_config):
            name = f.name
            if name in LORA_FIELDS or name in _LORA_HARMLESS:
                continue
            value, base = getattr(lora_config, name), getattr(default, name)
            if value != base:
                unsupported.append(f"{name}={value!r}")
        init = getattr(lora_config, "init_lora_weights", True)
        if init not in _INIT_OK:
            unsupported.append(f"init_lora_weights={init!r}")
        if unsupported:
            raise CordaConfigError(
                "lora_config sets LoRA option(s) that a CorDA initialisation cannot honour: " + ", ".join(unsupported)
                + ". CorDA writes plain LoRA factors into nn.Linear / Conv1D layers from their own weights; drop "
                "these options (or use PEFT without corda_fast for them).")
        target = lora_config.target_modules
        return cls(r=lora_config.r, lora_alpha=lora_config.lora_alpha,
                   target_modules=sorted(target) if isinstance(target, set) else target,
                   exclude_modules=(sorted(lora_config.exclude_modules)
                                    if isinstance(lora_config.exclude_modules, set) else lora_config.exclude_modules),
                   rank_pattern=dict(lora_config.rank_pattern or {}), alpha_pattern=dict(lora_config.alpha_pattern or {}),
                   use_rslora=bool(lora_config.use_rslora), lora_dropout=float(lora_config.lora_dropout),
                   task_type=lora_config.task_type, target_parameters=(
                       sorted(lora_config.target_parameters) if lora_config.target_parameters else None))


# ---------------------------------------------------------------------------------------------------- CorDA
@dataclass
class DampingConfig(_Replace):
    """``C_f = C + λ·mean(diag C)·I`` with ``λ`` from ``start`` doubling until ``‖C_f C_f⁻¹ − I‖_F < tol``; an error
    after ``max_iter`` doublings (PEFT loops forever)."""

    start: float = 0.01
    tol: float = 0.05
    max_iter: int = 40

    def __post_init__(self):
        for name in ("start", "tol"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                _fail(f"DampingConfig.{name}", value, "a number > 0")
        _check_int("DampingConfig", "max_iter", self.max_iter)


@dataclass
class PlusConfig(_Replace):
    """CorDA++: dynamic covariance selection among ``candidates`` statistics per layer, then dynamic rank allocation
    under a parameter ``budget``. Candidates and layers are scored on covariances scaled to unit mean diagonal (the
    compactness ``π`` is not scale-invariant: ``π(cC) = π(C)/√c``).

    Args:
        candidates: candidate statistics per layer; calibration batch ``i`` feeds candidate ``i mod candidates`` (so
            the loader needs at least that many batches). 1 (the default, chosen by the ablation in
            docs/corda_plus.md) disables selection: the allocation runs on CorDA's statistic of all the data; more
            candidates trade task learning for retention in KPM and did not change IPM's convergence.
        budget: total adapter parameters ``Σ (d_in + d_out)·r_l``; ``None`` = the count of the uniform rank (and
            ``rank_pattern``) on the same layers.
        min_rank / max_rank: per-layer bounds of the allocated rank (``max_rank`` is also capped by
            ``min(d_in, d_out)``).
        max_rank_factor: a per-layer cap as a multiple of the layer's uniform rank (``None``: no such cap).
        alpha: ``"scaling"`` keeps every layer's LoRA scaling at the uniform configuration's (``alpha_l = s·r_l``,
            or ``s·√r_l`` with rsLoRA); ``"alpha"`` keeps ``lora_alpha`` (PEFT's plain ``rank_pattern``).
    """

    candidates: int = 1
    budget: Optional[int] = None
    min_rank: int = 1
    max_rank: Optional[int] = None
    max_rank_factor: Optional[float] = None
    alpha: str = "scaling"

    def __post_init__(self):
        own = "PlusConfig"
        _check_int(own, "candidates", self.candidates)
        _check_int(own, "budget", self.budget, optional=True)
        _check_int(own, "min_rank", self.min_rank)
        _check_int(own, "max_rank", self.max_rank, optional=True)
        if self.max_rank is not None and self.max_rank < self.min_rank:
            _fail(f"{own}.max_rank", self.max_rank, f"None or an int >= min_rank ({self.min_rank})")
        if self.max_rank_factor is not None and not (_is_number(self.max_rank_factor) and self.max_rank_factor >= 1):
            _fail(f"{own}.max_rank_factor", self.max_rank_factor, "None or a number >= 1")
        _check_choice(own, "alpha", self.alpha, PLUS_ALPHA)


@dataclass
class CalibrationConfig(_Replace):
    """Where the statistics come from and how they are collected.

    Args:
        covariance_cache: path of a safetensors statistics cache: loaded (validated against the model — weights and
            configuration —, the targets and the normalisation) if it exists, written after calibration otherwise. One
            calibration serves any rank/mode. A loader passed with an existing cache must yield the data the cache
            was made from (checked by fingerprint); pass ``loader=None`` to use the cache as it is.
        overwrite_cache: recalibrate on the loader and overwrite an existing ``covariance_cache``.
        streaming: ``True`` calibrates and decomposes one transformer block at a time (peak statistic memory = one
            block; same result); ``"auto"`` does so when the statistics could exceed a quarter of the free memory of
            the model's device; ``False`` calibrates the whole model in one pass.
        cache_device: with streaming, where the cached block inputs live (default: the model's device — the host
            when onloading).
        onload_device: with streaming, sequential onloading: the model stays where it is (host memory) and each
            block is moved to this device (e.g. ``"cuda:0"``) for its calibration and decomposition, then moved back;
            device memory holds one block's weights, its statistics and (unless ``cache_device`` says otherwise,
            they stay on the host) its cached inputs. ``None``: blocks run where they are.
        distributed: data-parallel calibration over a ``torch.distributed`` process group: ``"auto"`` when a
            default group with more than one rank is initialised, ``True`` to require one, ``False`` to ignore it.
        max_batches: stop calibration after this many loader batches (``None``: the whole loader).
        use_label_mask: when a batch carries ``labels``, tokens whose label is -100 (e.g. the prompt of an
            instruction sample) are left out of the statistics but still run through the model, which sees the whole
            context (PEFT's EVA uses the same name and default). ``False`` ignores labels.
        share_inputs: layers that read the same input tensor (q/k/v, gate/up) share one statistic (detected at run
            time).
        unused_targets: ``"error"`` if a targeted layer never ran during calibration, or ``"skip"`` to leave such
            layers out of the adapter (with a warning). (An expert the router never chose is not "unused": its
            experts module ran; it is reported in ``InitReport.low_data`` and initialised from its weight alone.)
        route_all_experts: for targeted expert parameters (``LoraConfig.target_parameters``), compute every expert's
            statistics from every real token instead of the tokens the router sent to it (the model's output is
            unchanged: only the statistics see the extra tokens). Each expert's first projection then reads the
            layer's whole input — one statistic shared by all experts — and its ``down_proj`` that expert's
            activations on every token.
    """

    covariance_cache: Optional[str] = None
    overwrite_cache: bool = False
    streaming: Union[bool, str] = False
    cache_device: Any = None
    onload_device: Any = None
    distributed: Union[bool, str] = "auto"
    max_batches: Optional[int] = None
    use_label_mask: bool = True
    share_inputs: bool = True
    unused_targets: str = "error"
    route_all_experts: bool = False

    def __post_init__(self):
        own = "CalibrationConfig"
        if self.covariance_cache is not None and not isinstance(self.covariance_cache, (str, bytes)) \
                and not hasattr(self.covariance_cache, "__fspath__"):
            _fail(f"{own}.covariance_cache", self.covariance_cache, "None or a file path")
        if self.covariance_cache is not None:
            self.covariance_cache = str(self.covariance_cache)
        _check_bool(own, "overwrite_cache", self.overwrite_cache)
        if self.streaming not in (True, False, "auto"):
            _fail(f"{own}.streaming", self.streaming, "True, False or 'auto'")
        for name in ("cache_device", "onload_device"):
            if getattr(self, name) is not None:
                try:
                    torch.device(getattr(self, name))
                except (RuntimeError, TypeError):
                    _fail(f"{own}.{name}", getattr(self, name), "None or a torch device (e.g. 'cpu', 'cuda:0')")
        if self.distributed not in (True, False, "auto"):
            _fail(f"{own}.distributed", self.distributed, "True, False or 'auto'")
        _check_int(own, "max_batches", self.max_batches, optional=True)
        _check_bool(own, "use_label_mask", self.use_label_mask)
        _check_bool(own, "share_inputs", self.share_inputs)
        _check_choice(own, "unused_targets", self.unused_targets, UNUSED_TARGET_POLICIES)
        _check_bool(own, "route_all_experts", self.route_all_experts)


@dataclass
class CordaConfig(_Replace):
    """CorDA's own knobs (LoRA's are PEFT's: :class:`LoraSpec` / ``peft.LoraConfig``).

    Args:
        mode: ``"ipm"`` (instruction-previewed: adapt the ``r`` *largest* components of ``W·C``; calibrate on the
            task) or ``"kpm"`` (knowledge-preserved: adapt the ``r`` *smallest*; calibrate on the knowledge to
            keep). PEFT's default is ``"ipm"``.
        normalization: per-sample rescaling of activations before ``XᵀX``: ``"peft"`` divides each sample by
            ``|max(X)|`` — the absolute value of the *signed* maximum, PEFT's quirk, kept for parity; ``"absmax"``
            divides by ``max|X|``; ``"none"`` keeps raw activations. The covariance is the mean over samples.
        precision: ``"float32"`` (PEFT's arithmetic) or ``"float64"``: the accumulation dtype of the statistics, the
            dtype of the factors and of the residual ``W − s·B·A``, and with ``svd_method="svd"`` of ``W·C_f``, its
            SVD and the solve for ``V̂`` (float64 is needed when the smallest components (KPM) of an ill-conditioned
            ``W·C_f`` must be accurate beyond ~1e-3). The damping search always runs in float32, as PEFT's.
        svd_method: ``"gram"`` — float64 eigendecomposition of the Gram matrix of ``W·C_f`` on its smaller side,
            mapping back only the ``r`` kept singular vectors (faster than a float32 SVD on CPU for rectangular
            layers, more accurate: error ≈ ε64·σ_max²/σ against ε32·σ_max; falls back to the SVD for kept σ below
            1e-8·σ_max); ``"svd"`` — the thin SVD in ``precision``, PEFT's algorithm; ``"auto"`` — ``"gram"`` for
            float32, ``"svd"`` for float64.
        damping: :class:`DampingConfig`.
        calibration: :class:`CalibrationConfig` (cache, streaming, distributed, batches, input sharing).
        plus: :class:`PlusConfig` for CorDA++, or ``None`` for CorDA (uniform rank, one statistic per input).
        quantized_residual: for quantized base layers (bitsandbytes 4-bit, torchao), dequantized one at a time for
            ``W·C``: ``"requantize"`` stores the residual back in the layer's own format (the per-layer error is in
            the report); ``"keep"`` replaces the layer by a plain ``nn.Linear`` holding the residual (exact at init).
        requantize_config: the torchao config (e.g. ``Int8WeightOnlyConfig()``) to re-quantize torchao residuals with
            (a torchao weight does not record it); bitsandbytes layers need none.
        residual_folder: for a model accelerate offloads to disk, where the residuals of disk-offloaded layers are
            written (a new subfolder per call; the model reads them from there, so keep it while the model lives).
            Default: a subfolder of the model's own offload folder. The checkpoint's files are never written.
        spill: where the build keeps each targeted weight's original while it writes the residual in place (for an
            exact rollback if anything fails): ``"auto"`` (a temporary file for weights in host memory, host memory
            for weights on an accelerator), ``"disk"``, ``"host"``, or ``"memory"`` (a copy beside each weight: the
            targeted weights held twice until the build ends). Originals are dropped once the call succeeds.
        spill_folder: the folder of the temporary file (default: the system's temporary folder).
        autocast_adapter_dtype: as PEFT's ``get_peft_model``: keep 16-bit models' adapters in float32.
        show_progress: tqdm progress bars.
    """

    mode: str = "ipm"
    normalization: str = "peft"
    precision: str = "float32"
    svd_method: str = "auto"
    damping: DampingConfig = field(default_factory=DampingConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    plus: Optional[PlusConfig] = None
    quantized_residual: str = "requantize"
    requantize_config: Any = None
    residual_folder: Optional[str] = None
    spill: str = "auto"
    spill_folder: Optional[str] = None
    autocast_adapter_dtype: bool = True
    show_progress: bool = True

    def __post_init__(self):
        own = "CordaConfig"
        _check_choice(own, "mode", self.mode, MODES)
        _check_choice(own, "normalization", self.normalization, NORMALIZATIONS)
        if isinstance(self.precision, torch.dtype):
            self.precision = str(self.precision).replace("torch.", "")
        _check_choice(own, "precision", self.precision, PRECISIONS)
        _check_choice(own, "svd_method", self.svd_method, SVD_METHODS)
        for name, cls in (("damping", DampingConfig), ("calibration", CalibrationConfig)):
            if not isinstance(getattr(self, name), cls):
                _fail(f"{own}.{name}", getattr(self, name), f"a {cls.__name__}")
        if self.plus is not None and not isinstance(self.plus, PlusConfig):
            _fail(f"{own}.plus", self.plus, "None or a PlusConfig")
        _check_choice(own, "quantized_residual", self.quantized_residual, QUANTIZED_RESIDUALS)
        if self.residual_folder is not None:
            if not isinstance(self.residual_folder, (str, os.PathLike)):
                _fail(f"{own}.residual_folder", self.residual_folder, "None or a folder path")
            self.residual_folder = os.fspath(self.residual_folder)
        _check_choice(own, "spill", self.spill, SPILL_MODES)
        if self.spill_folder is not None:
            if not isinstance(self.spill_folder, (str, os.PathLike)):
                _fail(f"{own}.spill_folder", self.spill_folder, "None or a folder path")
            self.spill_folder = os.fspath(self.spill_folder)
        _check_bool(own, "autocast_adapter_dtype", self.autocast_adapter_dtype)
        _check_bool(own, "show_progress", self.show_progress)

    @property
    def dtype(self) -> torch.dtype:
        """``torch.float32`` or ``torch.float64`` (:attr:`precision`)."""
        return getattr(torch, self.precision)

    @property
    def resolved_svd_method(self) -> str:
        if self.svd_method != "auto":
            return self.svd_method
        return "gram" if self.precision == "float32" else "svd"
