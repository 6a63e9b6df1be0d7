"""corda_fast — fast, trustworthy CorDA (context-oriented decomposition adaptation) for PEFT models.

Public API (re-exports only)::

    peft_model = corda_fast.init_adapters(model, loader, mode="kpm", rank=16)
"""

from . import distributed
from ._version import __version__
from .api import InitReport, init_adapters
from .calibrate import CalibrationError, collect_candidates, collect_covariance
from .compat import patch_peft, patched_peft, preprocess_corda
from .config import CalibrationConfig, CordaConfig, CordaConfigError, DampingConfig, LoraSpec, PlusConfig
from .data import calibration_batches, pad_batches
from .decompose import DampingError, LayerFactors, decompose, find_damping
from .export import TrainerArtifacts, save_for_trainers
from .fused import FusedLoraLinear, FuseReport, fuse, fused_lora_linear, unfuse
from .peft_bridge import build_peft_model, residual_state_dict, save_as_lora, save_initial_adapter, save_residual_base
from .stats import CacheError, CovarianceStats, model_fingerprint
from .targets import Target, TargetError, resolve_targets

__all__ = [
    "__version__",
    "init_adapters",
    "InitReport",
    "preprocess_corda",
    "patch_peft",
    "patched_peft",
    "CordaConfig",
    "DampingConfig",
    "CalibrationConfig",
    "PlusConfig",
    "LoraSpec",
    "CordaConfigError",
    "collect_covariance",
    "collect_candidates",
    "pad_batches",
    "calibration_batches",
    "CovarianceStats",
    "model_fingerprint",
    "decompose",
    "find_damping",
    "LayerFactors",
    "build_peft_model",
    "save_initial_adapter",
    "save_as_lora",
    "save_residual_base",
    "save_for_trainers",
    "TrainerArtifacts",
    "residual_state_dict",
    "resolve_targets",
    "Target",
    "fuse",
    "unfuse",
    "fused_lora_linear",
    "FusedLoraLinear",
    "FuseReport",
    "distributed",
    "TargetError",
    "CalibrationError",
    "CacheError",
    "DampingError",
]
