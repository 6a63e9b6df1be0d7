"""Which layers get an adapter, with what rank and scaling — resolved once, used by every stage.

Matching follows PEFT's ``LoraConfig.target_modules`` semantics exactly (a string is a regex that must match the
whole module name; a list matches a name equal to an entry or ending in ``"." + entry``), so the layers we calibrate
are the layers PEFT wraps. Rank / alpha patterns follow PEFT's rule too (:func:`pattern_key`; a test compares it with
PEFT's own). Nothing here imports PEFT.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D  # GPT-2 style linear, weight stored as (in, out)

from . import experts, offload, quant
from .config import LoraSpec

# Task heads the paper (and PEFT's "all-linear") leave out besides the LM output embedding.
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "pooler")


class TargetError(ValueError):
    """A target specification that does not fit the model (nothing matched, unsupported layer, rank too big)."""


@dataclass
class Target:
    """One adapted layer. ``d_out × d_in`` is the shape of ``W`` in ``y = W x`` (Conv1D weights are transposed)."""

    name: str
    module: nn.Module
    is_conv1d: bool
    d_in: int
    d_out: int
    rank: int
    alpha: float
    scaling: float
    quant: Optional[str] = None  # "bnb4" / "torchao" for a quantized base weight (corda_fast.quant)
    # one expert of a 3-D expert parameter (``name`` is ``<module>.<param_name>[e=<expert>]``; ``module`` the experts
    # module): corda_fast.experts
    expert: Optional[int] = None
    param_name: Optional[str] = None
    transposed: bool = False  # stored (experts, in, out)
    role: Optional[str] = None  # "up" | "down"

    @property
    def param_key(self) -> str:
        """PEFT's name of what is adapted: the module name, or for an expert its parameter's name (no ``[e=...]``)."""
        return experts.split_name(self.name)[0]

    def weight_matrix(self) -> torch.Tensor:
        """``W`` as ``(d_out, d_in)``: a view of a float weight, a dequantized copy of a quantized one."""
        if self.expert is not None:
            return experts.expert_weight(self.module, self.param_name, self.expert, self.transposed)
        if self.quant is not None:
            return quant.dequantize(self.module)
        w = offload.read_tensor(self.module)  # the module's own, or loaded from an accelerate hook (offloaded)
        return w.t() if self.is_conv1d else w


def _name_matches(name: str, spec: Union[str, Sequence[str]]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: ``alpha / r``, or ``alpha / √r`` with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def pattern_key(keys, name: str) -> Optional[str]:
    """The ``rank_pattern`` / ``alpha_pattern`` key that applies to module ``name``: the first key ``k`` such that
    ``name`` ends with ``k`` as a regex after a dot boundary (``(.*\\.)?(k)$``), PEFT's rule; ``None`` if none does."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _output_head_ids(model: nn.Module) -> set:
    ids = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except Exception:
            head = None
        if head is not None:
            ids.add(id(head))
    return ids


def resolve_targets(model: nn.Module, lora: Optional[LoraSpec] = None, check_rank: bool = True) -> list[Target]:
    """Resolve ``lora.target_modules`` on ``model`` into an ordered list of :class:`Target` (``lora`` defaults to
    :class:`LoraSpec` ``()``: every linear layer but the output head, rank 8).

    Raises :class:`TargetError` naming the offending layer when a matched module is not a ``nn.Linear`` /
    ``Conv1D``, when its weight is quantized, when nothing matches, or when a layer's rank exceeds
    ``min(d_in, d_out)`` (unless ``check_rank=False``: statistics do not depend on the rank).
    """
    config = lora if lora is not None else LoraSpec()
    spec = config.target_modules
    targets: list[Target] = []
    unsupported = []
    try:
        params = experts.resolve_parameters(model, config.target_parameters, config.exclude_modules) \
            if config.target_parameters else []
    except experts.ExpertsError as exc:
        raise TargetError(str(exc)) from None
    for name, module in _matched_modules(model, config):
        if not isinstance(module, (nn.Linear, Conv1D)):
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        targets.append(_target(name, module, config))
    if unsupported:
        raise TargetError(
            f"target_modules={spec!r} matches modules that are not nn.Linear or transformers Conv1D: "
            + ", ".join(unsupported[:10])
            + (" ..." if len(unsupported) > 10 else "")
            + ". Name the linear layers themselves (e.g. 'q_proj')."
        )
    targets += [t for p in params for t in _expert_targets(p, config)]
    if not targets:
        raise TargetError(
            f"target_modules={spec!r} matches no nn.Linear/Conv1D layer of {type(model).__name__}. "
            "Use 'all-linear', a list of layer names or suffixes (e.g. ['q_proj', 'v_proj']), or a full-match regex."
        )
    _check_targets(targets, check_rank)
    return targets


def _matched_modules(model: nn.Module, config: LoraSpec):
    """``(name, module)`` of every module ``target_modules`` / ``exclude_modules`` select (``all-linear``: every
    linear layer but the output head)."""
    spec = config.target_modules
    if spec is None and config.target_parameters:  # PEFT: target_parameters alone adapts no module
        return
    all_linear = spec is None or spec == "all-linear"
    heads = _output_head_ids(model) if all_linear else set()
    for name, module in model.named_modules():
        if not name:
            continue
        if all_linear:
            if not isinstance(module, (nn.Linear, Conv1D)):
                continue
            if id(module) in heads or any(name == h or name.startswith(h + ".") or name.endswith("." + h)
                                          for h in _HEAD_NAMES):
                continue
        elif not _name_matches(name, spec):
            continue
        if config.exclude_modules is not None and _name_matches(name, config.exclude_modules):
            continue
        yield name, module


def _target(name: str, module: nn.Module, config: LoraSpec) -> Target:
    """The :class:`Target` of one linear / Conv1D layer: shape (quantized weights too), rank, alpha, scaling."""
    is_conv1d = isinstance(module, Conv1D)
    try:
        qkind = quant.kind(module)
    except quant.UnsupportedQuantization as exc:
        raise TargetError(
            f"Layer '{name}' has quantized weights that corda_fast cannot dequantize: {exc}. Load the model in "
            "float32/bfloat16/float16 (or a supported quantization), initialise, then re-quantize the residual."
        ) from None
    if qkind is not None:
        d_out, d_in = quant.shape(module)
    else:
        w = module.weight
        d_out, d_in = (w.shape[1], w.shape[0]) if is_conv1d else (w.shape[0], w.shape[1])
    rank_key = pattern_key(config.rank_pattern, name)
    rank = int(config.rank_pattern[rank_key] if rank_key is not None else config.r)
    alpha_key = pattern_key(config.alpha_pattern, name)
    alpha = float(config.alpha_pattern[alpha_key] if alpha_key is not None else config.alpha)
    return Target(name, module, is_conv1d, int(d_in), int(d_out), rank, alpha,
                  lora_scaling(alpha, rank, config.use_rslora), qkind)


def _expert_targets(p: "experts.ExpertParam", config: LoraSpec) -> list[Target]:
    """One :class:`Target` per expert of a 3-D parameter; rank / alpha patterns apply to the parameter's name (one
    rank for all its experts: PEFT's ``ParamWrapper`` holds one)."""
    rank_key = pattern_key(config.rank_pattern, p.key)
    rank = int(config.rank_pattern[rank_key] if rank_key is not None else config.r)
    alpha_key = pattern_key(config.alpha_pattern, p.key)
    alpha = float(config.alpha_pattern[alpha_key] if alpha_key is not None else config.alpha)
    scaling = lora_scaling(alpha, rank, config.use_rslora)
    return [Target(p.expert_name(e), p.module, False, p.d_in, p.d_out, rank, alpha, scaling, expert=e,
                   param_name=p.param_name, transposed=p.transposed, role=p.role) for e in range(p.num_experts)]


def _check_targets(targets: list[Target], check_rank: bool) -> None:
    """Ranks that fit every layer, and one layer kind (PEFT has one ``fan_in_fan_out`` setting)."""
    too_big = [t for t in targets if check_rank and t.rank > min(t.d_in, t.d_out)]
    if too_big:
        t = too_big[0]
        raise TargetError(
            f"rank {t.rank} is too large for layer '{t.name}' ({t.d_out}x{t.d_in}): its max rank is "
            f"{min(t.d_in, t.d_out)}" + (f" ({len(too_big) - 1} more layers too)" if len(too_big) > 1 else "")
            + ". Lower `rank` (LoraConfig.r) or set a `rank_pattern` entry for it."
        )
    if len({t.is_conv1d for t in targets}) > 1:
        raise TargetError(
            "targets mix nn.Linear and Conv1D layers, which PEFT cannot express with one fan_in_fan_out setting: "
            f"e.g. '{next(t.name for t in targets if t.is_conv1d)}' and "
            f"'{next(t.name for t in targets if not t.is_conv1d)}'."
        )
