"""Every knob of corda_fast in one validated dataclass.

Defaults reproduce PEFT's ``preprocess_corda`` + ``init_lora_weights="corda"`` so that a user switching
from PEFT gets the same adapters (see ``shared/reference/corda_spec.md`` §3-4 and DESIGN.md §3).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

MODES = ("ipm", "kpm")
NORMALIZATIONS = ("peft", "absmax", "none")
PRECISIONS = ("float32", "float64")
SVD_METHODS = ("auto", "gram", "svd")
UNUSED_TARGET_POLICIES = ("error", "skip")
METHODS = ("corda", "corda++")
PLUS_SELECTION_SUMS = ("all", "adapter")
PLUS_SCORE_AT = ("next", "current")
PLUS_ALPHA = ("scaling", "alpha")


class CordaConfigError(ValueError):
    """Raised when a :class:`CordaConfig` field has a value outside its allowed set."""


def _fail(field_name: str, value, allowed: str) -> None:
    raise CordaConfigError(f"CordaConfig.{field_name}={value!r} is invalid: expected {allowed}.")


@dataclass
class CordaConfig:
    """Configuration of a CorDA initialisation.

    Args:
        mode: ``"ipm"`` (instruction-previewed: adapt the ``rank`` *largest* components of ``W·C``; calibrate on
            the task) or ``"kpm"`` (knowledge-preserved: adapt the ``rank`` *smallest*; calibrate on the knowledge
            to keep). PEFT's default is ``"ipm"``.
        rank: LoRA rank ``r`` of every adapted layer, unless ``rank_pattern`` says otherwise.
        lora_alpha: LoRA alpha; ``None`` means ``alpha = rank`` (scaling 1, as in the CorDA examples).
        use_rslora: scaling ``alpha / sqrt(r)`` instead of ``alpha / r``.
        rank_pattern: ``{module name or regex suffix: rank}``, PEFT semantics.
        alpha_pattern: ``{module name or regex suffix: alpha}``, PEFT semantics.
        target_modules: ``None`` or ``"all-linear"`` (every ``nn.Linear`` / ``Conv1D`` except the output head),
            a regex (full match on the module name), or a list of names / name suffixes (PEFT semantics).
        exclude_modules: names / suffixes (or a regex) never adapted, applied after ``target_modules``.
        lora_dropout: dropout of the returned LoRA layers (training only; does not affect initialisation).
        normalization: per-sample rescaling of activations before ``XᵀX``:
            ``"peft"`` divides each sample by ``|max(X)|`` — the absolute value of the *signed* maximum, PEFT's
            quirk, kept for parity; ``"absmax"`` divides by ``max|X|``; ``"none"`` keeps raw activations.
            The covariance is the mean over samples in every case.
        covariance_precision: accumulation dtype of the statistics (``"float32"`` as PEFT, or ``"float64"``).
        decompose_precision: dtype of the returned factors and of the residual ``W − s·B·A``; with
            ``svd_method="svd"`` also of ``W·C_f``, its SVD and the solve for ``V̂`` (``"float32"`` is PEFT's
            arithmetic; ``"float64"`` is needed there when the smallest components (KPM) of an ill-conditioned
            ``W·C_f`` must be accurate beyond ~1e-3). The damping search always uses float32, as PEFT, so every
            precision picks the same damping.
        svd_method: ``"gram"`` — float64 eigendecomposition of the Gram matrix of ``W·C_f`` on its smaller side,
            mapping back only the ``r`` kept singular vectors: faster than a float32 SVD on CPU for rectangular
            layers (on par for square ones) and more accurate
            (error ≈ ε64·σ_max²/σ against ε32·σ_max), falling back to the SVD for kept σ below 1e-8·σ_max where
            that stops being true; ``"svd"`` — the full thin SVD in ``decompose_precision``, PEFT's algorithm;
            ``"auto"`` (default) — ``"gram"`` for float32, ``"svd"`` for float64 (the most accurate option).
        damping_start / damping_tol / damping_max_iter: ``C_f = C + λ·mean(diag C)·I`` with ``λ`` from
            ``damping_start`` doubling until ``‖C_f C_f⁻¹ − I‖_F < damping_tol``; an error after
            ``damping_max_iter`` doublings (PEFT loops forever).
        share_inputs: layers that read the same input tensor (q/k/v, gate/up) share one statistic, detected at
            run time.
        max_batches: stop calibration after this many loader batches (``None``: the whole loader).
        unused_targets: ``"error"`` (default) if a targeted layer never ran during calibration, or ``"skip"``
            to leave such layers out of the adapter (with a warning).
        autocast_adapter_dtype: as PEFT's ``get_peft_model``: keep 16-bit models' adapters in float32. The
            residual is computed from the factors *as stored*, so the model is unchanged at init up to the
            rounding of the residual to the model dtype.
        show_progress: tqdm progress bars for calibration and decomposition.
        distributed: data-parallel calibration over a ``torch.distributed`` process group
            (:mod:`corda_fast.distributed`): ``"auto"`` (default) when a default group with more than one rank is
            initialised, ``True`` to require one, ``False`` to ignore it. Each rank calibrates on its own batches;
            statistics are summed over ranks, decompositions are spread over them and every rank ends with the
            same model.
        quantized_residual: for quantized base layers (bitsandbytes 4-bit, torchao; :mod:`corda_fast.quant`), which
            are dequantized one at a time for ``W·C``: ``"requantize"`` (default; QLoRA + CorDA) stores the residual
            back in the layer's own format — the per-layer error this introduces is in the report; ``"keep"``
            replaces the layer by a plain ``nn.Linear`` holding the residual in the compute dtype (exact at init).
        requantize_config: the torchao config (e.g. ``Int8WeightOnlyConfig()``) to re-quantize torchao residuals
            with (a torchao weight does not record it); bitsandbytes layers need none.

    CorDA++ (``method="corda++"``; ``shared/reference/corda_spec.md`` §5, :mod:`corda_fast.plus`):

    Args:
        method: ``"corda"`` (uniform rank, one statistic per input) or ``"corda++"`` (dynamic covariance
            selection among ``candidates`` statistics collected in the same forward pass, then dynamic rank
            allocation under ``budget``).
        candidates: number of candidate statistics per layer; calibration batch ``i`` feeds candidate
            ``i mod candidates`` (so the loader needs at least that many batches). 1 disables selection.
        budget: total adapter parameters ``Σ (d_in + d_out)·r_l``; ``None`` = the count of the uniform ``rank``
            (and ``rank_pattern``) on the same layers.
        min_rank / max_rank: per-layer bounds of the allocated rank (``max_rank`` is also capped by
            ``min(d_in, d_out)``; ``None`` = no further cap).
        plus_normalize: score candidates and layers on covariances scaled to unit mean diagonal (``π`` is not
            scale-invariant, ``π(cC) = π(C)/√c``; a documented deviation that also guarantees ``π > 1``).
        plus_selection_sum: the selection score's sum over ``"all"`` components (as transcribed) or the
            ``rank`` smallest (``"adapter"``).
        plus_score_at: the allocation score of a layer at rank ``r`` uses the ``"next"`` component (``r+1``-th
            smallest, the one an increment would adapt) or the ``"current"`` one (``r``-th smallest, literal
            transcription).
        plus_alpha: ``"scaling"`` keeps every layer's LoRA scaling at the uniform configuration's (``alpha_l =
            s·r_l``, or ``s·√r_l`` with rsLoRA); ``"alpha"`` keeps ``lora_alpha`` (PEFT's plain ``rank_pattern``).
    """

    mode: str = "ipm"
    rank: int = 8
    lora_alpha: Optional[float] = None
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    target_modules: Union[None, str, Sequence[str]] = None
    exclude_modules: Union[None, str, Sequence[str]] = None
    lora_dropout: float = 0.0
    normalization: str = "peft"
    covariance_precision: str = "float32"
    decompose_precision: str = "float32"
    svd_method: str = "auto"
    damping_start: float = 0.01
    damping_tol: float = 0.05
    damping_max_iter: int = 40
    share_inputs: bool = True
    max_batches: Optional[int] = None
    unused_targets: str = "error"
    autocast_adapter_dtype: bool = True
    show_progress: bool = True
    distributed: Union[bool, str] = "auto"
    quantized_residual: str = "requantize"
    requantize_config: Any = None
    method: str = "corda"
    candidates: int = 4
    budget: Optional[int] = None
    min_rank: int = 1
    max_rank: Optional[int] = None
    plus_normalize: bool = True
    plus_selection_sum: str = "all"
    plus_score_at: str = "next"
    plus_alpha: str = "scaling"

    def __post_init__(self):
        if self.mode not in MODES:
            _fail("mode", self.mode, f"one of {MODES}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            _fail("rank", self.rank, "an int >= 1")
        if self.lora_alpha is not None and (
            isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0
        ):
            _fail("lora_alpha", self.lora_alpha, "None or a number > 0")
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                _fail(name, pattern, "a dict {module name: value}")
            for key, val in pattern.items():
                ok = isinstance(val, (int, float)) and not isinstance(val, bool) and val > 0
                if name == "rank_pattern":
                    ok = ok and isinstance(val, int)
                if not isinstance(key, str) or not ok:
                    _fail(name, pattern, "a dict {str: positive " + ("int" if name == "rank_pattern" else "number") + "}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) and v for v in value):
                setattr(self, name, list(value))
                continue
            _fail(name, value, 'None, "all-linear", a regex string, or a non-empty list of module names')
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            _fail("lora_dropout", self.lora_dropout, "a float in [0, 1)")
        if self.normalization not in NORMALIZATIONS:
            _fail("normalization", self.normalization, f"one of {NORMALIZATIONS}")
        for name in ("covariance_precision", "decompose_precision"):
            value = getattr(self, name)
            if isinstance(value, torch.dtype):
                value = str(value).replace("torch.", "")
                setattr(self, name, value)
            if value not in PRECISIONS:
                _fail(name, value, f"one of {PRECISIONS}")
        if self.svd_method not in SVD_METHODS:
            _fail("svd_method", self.svd_method, f"one of {SVD_METHODS}")
        if not isinstance(self.damping_start, (int, float)) or not self.damping_start > 0:
            _fail("damping_start", self.damping_start, "a number > 0")
        if not isinstance(self.damping_tol, (int, float)) or not self.damping_tol > 0:
            _fail("damping_tol", self.damping_tol, "a number > 0")
        if isinstance(self.damping_max_iter, bool) or not isinstance(self.damping_max_iter, int) or self.damping_max_iter < 1:
            _fail("damping_max_iter", self.damping_max_iter, "an int >= 1")
        if self.max_batches is not None and (
            isinstance(self.max_batches, bool) or not isinstance(self.max_batches, int) or self.max_batches < 1
        ):
            _fail("max_batches", self.max_batches, "None or an int >= 1")
        if self.unused_targets not in UNUSED_TARGET_POLICIES:
            _fail("unused_targets", self.unused_targets, f"one of {UNUSED_TARGET_POLICIES}")
        if self.quantized_residual not in ("requantize", "keep"):
            _fail("quantized_residual", self.quantized_residual, "'requantize' or 'keep'")
        if self.distributed not in (True, False, "auto"):
            _fail("distributed", self.distributed, "True, False or 'auto'")
        if self.method not in METHODS:
            _fail("method", self.method, f"one of {METHODS}")
        for name, allowed in (("plus_selection_sum", PLUS_SELECTION_SUMS), ("plus_score_at", PLUS_SCORE_AT),
                              ("plus_alpha", PLUS_ALPHA)):
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), f"one of {allowed}")
        for name, optional in (("candidates", False), ("min_rank", False), ("max_rank", True), ("budget", True)):
            value = getattr(self, name)
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(name, value, ("None or " if optional else "") + "an int >= 1")
        if self.max_rank is not None and self.max_rank < self.min_rank:
            _fail("max_rank", self.max_rank, f"None or an int >= min_rank ({self.min_rank})")
        for name in ("use_rslora", "share_inputs", "autocast_adapter_dtype", "show_progress", "plus_normalize"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")

    # ------------------------------------------------------------------ derived values
    @property
    def alpha(self) -> float:
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def covariance_dtype(self) -> torch.dtype:
        return getattr(torch, self.covariance_precision)

    @property
    def decompose_dtype(self) -> torch.dtype:
        return getattr(torch, self.decompose_precision)

    @property
    def resolved_svd_method(self) -> str:
        if self.svd_method != "auto":
            return self.svd_method
        return "gram" if self.decompose_precision == "float32" else "svd"

    def replace(self, **changes) -> "CordaConfig":
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)
