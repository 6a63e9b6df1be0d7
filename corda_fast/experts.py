"""Routed experts stored as 3-D parameters: their layouts, and each expert's view as a plain ``y = W x`` layer.

transformers' MoE families keep all experts of a layer in one module (``Qwen3MoeExperts``, ``MixtralExperts``,
``GptOssExperts``, ...) whose projections are 3-D parameters, described by the attributes transformers' experts
interface sets on the class: ``is_transposed`` (``(E, in, out)`` instead of ``(E, out, in)``), ``has_gate``
(``gate_up_proj`` — concatenated or interleaved gate/up — or a single ``up_proj``), ``has_bias``
(``<name>_bias`` of shape ``(E, out)``), and the module's own ``_apply_gate`` / ``act_fn``. PEFT adapts such a
parameter through ``LoraConfig(target_parameters=[...])`` with one ``ParamWrapper`` per parameter.

Here every expert of a targeted parameter is one :class:`~corda_fast.targets.Target` named
``<module>.<parameter>[e=<index>]``, so statistics, damping and decomposition treat it as the dense layer it is:
its ``W`` is ``param[e]`` (transposed when stored ``(in, out)``). The first projection (``gate_up_proj`` /
``up_proj``) reads the tokens the router sent to the expert; ``down_proj`` reads that expert's own intermediate
activations, recomputed here from the routed tokens with the module's own weights, bias and gate — so the statistics
are the same whichever experts implementation (eager loop, batched or grouped GEMM) the model runs. Nothing here
imports PEFT or calibration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

UP_NAMES = ("gate_up_proj", "up_proj")  # the first projection: reads the routed hidden states
DOWN_NAMES = ("down_proj",)  # the second: reads the expert's intermediate activations
_EXPERT_SUFFIX = re.compile(r"\[e=(\d+)\]$")


class ExpertsError(ValueError):
    """A ``target_parameters`` entry that names something corda_fast cannot adapt (with the reason)."""


@dataclass(frozen=True)
class ExpertParam:
    """One targeted 3-D expert parameter: ``key`` is PEFT's name for it (``model.layers.0.mlp.experts.down_proj``)."""

    key: str
    module_name: str
    module: nn.Module
    param_name: str
    role: str  # "up" (reads routed hidden states) | "down" (reads the intermediate activations)
    num_experts: int
    transposed: bool
    d_in: int
    d_out: int

    def expert_name(self, e: int) -> str:
        return f"{self.key}[e={e}]"


def is_experts_module(module: nn.Module) -> bool:
    """A module transformers' experts interface describes: layout attributes set and 3-D projections."""
    return (hasattr(module, "is_transposed") and hasattr(module, "has_gate") and hasattr(module, "num_experts")
            and isinstance(getattr(module, "down_proj", None), torch.Tensor))


def split_name(name: str) -> tuple[str, Optional[int]]:
    """``("model.layers.0.mlp.experts.down_proj", 3)`` for ``"...down_proj[e=3]"``; ``(name, None)`` otherwise."""
    m = _EXPERT_SUFFIX.search(name)
    return (name[: m.start()], int(m.group(1))) if m else (name, None)


def _matches(key: str, targets) -> bool:
    """PEFT's rule for ``target_parameters``: the full name, or a suffix after a dot."""
    return any(key == t or key.endswith("." + t) for t in targets)


def resolve_parameters(model: nn.Module, target_parameters, exclude=None) -> list[ExpertParam]:
    """The 3-D expert parameters ``target_parameters`` names on ``model`` (PEFT's matching: full name or dotted
    suffix), in model order. Raises :class:`ExpertsError` naming a matched parameter corda_fast cannot adapt (not
    a 3-D projection of a transformers experts module), or an entry that matches nothing."""
    found, refused, used = [], [], set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            if not _matches(key, target_parameters) or (exclude and _matches(key, exclude)):
                continue
            used.update(t for t in target_parameters if key == t or key.endswith("." + t))
            why = _refusal(module, param_name, param)
            if why:
                refused.append(f"'{key}' ({why})")
            else:
                found.append(_param(key, module_name, module, param_name, param))
    if refused:
        raise ExpertsError("target_parameters matches parameters corda_fast cannot adapt: " + "; ".join(refused[:5])
                           + ". CorDA needs each expert's inputs: target the 3-D gate_up_proj / up_proj / down_proj "
                             "of a transformers experts module.")
    unmatched = [t for t in target_parameters if t not in used]
    if unmatched:
        raise ExpertsError(f"target_parameters entries {unmatched} match no parameter of {type(model).__name__} "
                           "(PEFT's rule: a full parameter name or a suffix after a dot, e.g. "
                           "'mlp.experts.gate_up_proj').")
    return found


def _refusal(module: nn.Module, param_name: str, param: torch.Tensor) -> Optional[str]:
    if not is_experts_module(module):
        return f"a parameter of {type(module).__name__}, not of an experts module with transformers' layout attributes"
    if param_name not in UP_NAMES + DOWN_NAMES:
        return "not a projection (gate_up_proj / up_proj / down_proj)"
    if param.dim() != 3:
        return f"{param.dim()}-D, expected (experts, ·, ·)"
    if param_name in UP_NAMES and param_name != ("gate_up_proj" if module.has_gate else "up_proj"):
        return f"the module's has_gate={module.has_gate} says its first projection is not '{param_name}'"
    return None


def _param(key: str, module_name: str, module: nn.Module, param_name: str, param: torch.Tensor) -> ExpertParam:
    transposed = bool(module.is_transposed)
    e, a, b = param.shape
    d_in, d_out = (a, b) if transposed else (b, a)
    role = "up" if param_name in UP_NAMES else "down"
    return ExpertParam(key, module_name, module, param_name, role, int(e), transposed, int(d_in), int(d_out))


def expert_weight(module: nn.Module, param_name: str, e: int, transposed: bool) -> torch.Tensor:
    """Expert ``e``'s ``W`` as ``(d_out, d_in)`` (a view)."""
    w = getattr(module, param_name)[e]
    return w.t() if transposed else w


def first_projection(module: nn.Module) -> str:
    return "gate_up_proj" if module.has_gate else "up_proj"


def intermediate(module: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e``'s intermediate activations — the input of its ``down_proj`` — for its routed tokens ``x``
    (``(n, hidden)``): the first projection (+ bias), then the module's own gate (``_apply_gate``: concatenated or
    interleaved, clamped, ...) or, without a gate, its activation. The routing weight is applied after ``down_proj``
    in every transformers experts implementation, so it does not enter this input."""
    name = first_projection(module)
    w = expert_weight(module, name, e, bool(module.is_transposed))
    h = x @ w.t().to(x.dtype)
    if getattr(module, "has_bias", False):
        h = h + getattr(module, f"{name}_bias")[e].to(h.dtype)
    return module._apply_gate(h) if module.has_gate else module.act_fn(h)


def call_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden_states (tokens, hidden), expert index per token (tokens, top_k))`` of an experts module's call:
    ``forward(hidden_states, top_k_index, top_k_weights)`` (Qwen3-MoE, Mixtral, ...) or ``forward(hidden_states,
    router_indices, routing_weights)`` (gpt-oss), positional or by keyword."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
    if not torch.is_tensor(hidden) or not torch.is_tensor(index):
        raise ExpertsError("an experts module was called without (hidden_states, expert indices): cannot tell which "
                           "tokens each expert received.")
    return hidden, index
