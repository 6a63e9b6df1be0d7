"""The pipeline's stages, one by one, for callers that run them separately (benchmarks, custom pipelines, tests):
calibrate → (CorDA++ selection) → decompose → build. ``corda_fast.init_adapters`` runs them all; most users need
nothing here.

::

    stats = stages.collect_covariance(model, loader, config, stages.resolve_targets(model, lora))
    factors = stages.decompose(stats, targets, config)
    peft_model = stages.build_peft_model(model, factors, targets, config, lora)
"""

from .calibrate import collect_candidates, collect_covariance
from .decompose import LayerFactors, decompose, find_damping
from .export import TrainerArtifacts
from .fingerprint import model_fingerprint
from .fused import FusedLoraLinear, FuseReport, fused_lora_linear
from .peft_bridge import build_peft_model, residual_state_dict
from .stats import CovarianceStats
from .targets import Target, resolve_targets

__all__ = ["collect_covariance", "collect_candidates", "CovarianceStats", "model_fingerprint", "resolve_targets",
           "Target", "decompose", "find_damping", "LayerFactors", "build_peft_model", "residual_state_dict",
           "fused_lora_linear", "FusedLoraLinear", "FuseReport", "TrainerArtifacts"]
