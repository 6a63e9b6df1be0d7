"""corda_fast — fast, trustworthy CorDA (context-oriented decomposition adaptation) for PEFT models.

Public API (re-exports only)::

    peft_model = corda_fast.init_adapters(model, loader, mode="kpm", rank=16)

The pipeline's stages one by one (calibration, decomposition, building) are in :mod:`corda_fast.stages`.
"""

from . import distributed, stages
from ._version import __version__
from .api import InitReport, init_adapters
from .calibrate import CalibrationError
from .compat import patch_peft, patched_peft, preprocess_corda
from .config import CalibrationConfig, CordaConfig, CordaConfigError, DampingConfig, LoraSpec, PlusConfig
from .data import calibration_batches, pad_batches
from .decompose import DampingError
from .export import save_for_trainers
from .fused import fuse, unfuse
from .memory_plan import MemoryPlan, plan_memory
from .peft_bridge import save_as_lora, save_initial_adapter, save_residual_base
from .stats import CacheError
from .targets import TargetError

__all__ = [
    "__version__",
    "init_adapters",
    "InitReport",
    "CordaConfig",
    "CalibrationConfig",
    "DampingConfig",
    "PlusConfig",
    "LoraSpec",
    "calibration_batches",
    "pad_batches",
    "preprocess_corda",
    "patch_peft",
    "patched_peft",
    "save_initial_adapter",
    "save_residual_base",
    "save_as_lora",
    "save_for_trainers",
    "fuse",
    "unfuse",
    "plan_memory",
    "MemoryPlan",
    "CordaConfigError",
    "CalibrationError",
    "CacheError",
    "DampingError",
    "TargetError",
    "stages",
    "distributed",
]
