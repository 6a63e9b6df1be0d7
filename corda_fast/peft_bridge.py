"""Writing CorDA factors into a real ``peft.PeftModel``, and converting the result to a plain LoRA.

The model is built with ``init_lora_weights=True`` (so its saved ``adapter_config.json`` never says ``"corda"`` and
loads with plain ``PeftModel.from_pretrained`` on a base that carries the residual weights), then each LoRA layer
receives ``A``, ``B`` and its base layer ``W_res = W − s·B·A``, computed from the factors *as they are stored* in the
adapter, so the model's output at initialisation equals the original's up to the rounding of ``W_res`` to the model
dtype.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Optional

import torch
from torch import nn

from . import offload, quant
from .config import CordaConfig, LoraSpec
from .decompose import LayerFactors
from .preflight import ModelSnapshot
from .spill import Spill
from .targets import Target

logger = logging.getLogger(__name__)


def peft_lora_config(targets: list[Target], lora: LoraSpec):
    """The ``peft.LoraConfig`` of the returned model: the user's LoRA settings on exactly the adapted layers, with
    ``init_lora_weights=True`` (the saved ``adapter_config.json`` never says ``"corda"``)."""
    from peft import LoraConfig

    params = sorted({t.param_key for t in targets if t.expert is not None})
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        use_rslora=lora.use_rslora,
        rank_pattern=dict(lora.rank_pattern),
        alpha_pattern=dict(lora.alpha_pattern),
        target_modules=[t.name for t in targets if t.expert is None],
        target_parameters=params or None,
        lora_dropout=lora.lora_dropout,
        fan_in_fan_out=any(t.is_conv1d for t in targets),
        init_lora_weights=True,
        task_type=lora.task_type,
    )


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


class _Undo:
    """What :func:`build_peft_model` changed on the user's model, to put back on failure."""

    def __init__(self, spill: Spill):
        self.described: dict = {}  # quantized layer -> its format
        self.swapped: dict = {}  # name -> original module, for quantized layers replaced by float ones ("keep")
        self.originals: dict = {}  # name -> the float weight tensor (overwritten in place; values kept in `spill`)
        self.params: dict = {}  # expert parameter key -> (experts module, parameter name, original data)
        self.quant_params: dict = {}  # name -> original quantized weight Parameter
        self.offloaded: list = []  # undo functions of residuals stored where an accelerate hook keeps the weight
        self.spill = spill  # the original values of the tensors overwritten in place
        self.peft_model = None

    def restore(self, model: nn.Module, adapted: list[Target]) -> None:
        for undo_one in reversed(self.offloaded):
            undo_one()
        for module, param_name, data in self.params.values():
            getattr(module, param_name).data = data
        for t in adapted:
            if t.name in self.originals:
                t.module.weight.data = self.originals[t.name]
            elif t.name in self.quant_params:
                t.module.weight = self.quant_params[t.name]
        self.spill.restore()  # the original values back into the same tensors
        if self.peft_model is not None:
            from .fused import unfuse

            # PEFT's unload() onloads each offloaded base layer and leaves its weights in a host dict (for a
            # disk-offloaded model: the whole model in memory): hide the offload hooks from it while it unwraps
            hooks = [h for m in model.modules() for h in [offload.offload_hook(m)] if h is not None]
            try:
                for h in hooks:
                    h.offload = False
                unfuse(self.peft_model)
                self.peft_model.unload()
            except Exception:  # pragma: no cover - best effort; weights are already restored
                logger.exception("could not unload the partially built PEFT model")
            finally:
                for h in hooks:
                    h.offload = True
        for name, module in self.swapped.items():
            _swap(model, name, module)


def _float_stand_ins(model: nn.Module, adapted: list[Target], keep: bool, undo: _Undo) -> None:
    """Record each quantized layer's format; with ``keep``, put a float layer holding ``W_q`` in its place (its
    residual is then written like any float layer's)."""
    for i, t in enumerate(adapted):
        if t.quant is None:
            continue
        undo.described[t.name] = quant.describe(t.module)
        if keep:
            new = quant.float_linear(t.module, quant.dequantize(t.module))
            undo.swapped[t.name] = _swap(model, t.name, new)
            adapted[i] = dataclasses.replace(t, module=new, quant=None)


def _write_layer(layer, t: Target, f: LayerFactors, adapter_name: str, config: CordaConfig, undo: _Undo,
                 quant_report: Optional[dict], store: Optional[offload.ResidualStore] = None) -> None:
    """Put ``A``, ``B`` into a PEFT LoRA layer and ``W_res = W − s·B·A`` (from the factors as stored) into its
    base layer, in the base weight's own format."""
    lora_a = layer.lora_A[adapter_name].weight
    lora_b = layer.lora_B[adapter_name].weight
    if tuple(lora_a.shape) != tuple(f.A.shape) or tuple(lora_b.shape) != tuple(f.B.shape):
        raise RuntimeError(
            f"layer '{t.name}': PEFT made LoRA shapes {tuple(lora_a.shape)}/{tuple(lora_b.shape)} but the "
            f"factors are {tuple(f.A.shape)}/{tuple(f.B.shape)} (rank_pattern mismatch)."
        )
    base = layer.get_base_layer()
    layer.train(base.training)  # the LoRA wrapper (and its dropout) takes the mode of the module it wraps
    device = f.A.device
    a = f.A.to(device=device, dtype=lora_a.dtype)
    b = f.B.to(device=device, dtype=lora_b.dtype)
    cdt = f.A.dtype  # residual in the decomposition precision, from the factors as stored
    held = t.quant is None and offload.is_offloaded(t.module)  # an accelerate hook keeps the weight (host / disk)
    if t.quant is not None:  # "requantize": dequantized here, one layer at a time
        w_mat = quant.dequantize(t.module).to(device=device, dtype=cdt)
    else:
        w = offload.read_tensor(t.module) if held else undo.originals[t.name]
        w_mat = (w.t() if t.is_conv1d else w).to(device=device, dtype=cdt)
    delta = (f.scaling * b.to(cdt)) @ a.to(cdt)
    w_res = w_mat - delta
    if lora_a.device.type != "meta":
        base_device = lora_a.device
    elif held:
        base_device = offload.execution_device(t.module) or torch.device("cpu")
    else:
        base_device = undo.quant_params.get(t.name, undo.originals.get(t.name)).device
    layer.lora_A[adapter_name].weight = nn.Parameter(a.to(base_device).contiguous(), requires_grad=lora_a.requires_grad)
    layer.lora_B[adapter_name].weight = nn.Parameter(b.to(base_device).contiguous(), requires_grad=lora_b.requires_grad)
    if t.quant is not None:  # "requantize": back into the layer's own format
        quant.store_residual(base, w_res, config.requantize_config)
    elif held:  # where the weight lives: the hook's host map, or a residual store of our own on disk
        w_res = (w_res.t() if t.is_conv1d else w_res).to(t.module.weight.dtype).contiguous()
        undo.offloaded.append(offload.store_residual(t.module, w_res, t.name, store, undo.spill))
        del w, w_mat, w_res
        offload.release_host_memory()
    else:  # in place: the original goes to the spill first (never two copies of the model)
        live = base.weight.data
        if t.name in undo.described:  # w_mat may share the live tensor's storage: the report needs W_q itself
            w_mat = w_mat.clone()
        undo.spill.keep(t.name, live)
        live.copy_(w_res.t() if t.is_conv1d else w_res)
    if t.name in undo.described and quant_report is not None:  # w_mat is W_q: the quantized weight, exactly
        quant_report[t.name] = {
            "quantization": undo.described[t.name],
            "residual": "requantized" if t.quant is not None else f"kept in {base.weight.dtype}",
            **quant.residual_error(base, w_mat, delta),
        }


def _param_wrapper(outer: nn.Module, param_name: str):
    """The (possibly nested) PEFT ``ParamWrapper`` adapting ``param_name``, from the module at the experts' name."""
    m = outer
    while hasattr(m, "parameter_name") and hasattr(m, "base_layer"):
        if m.parameter_name == param_name:
            return m
        m = m.base_layer
    raise RuntimeError(f"PEFT made no ParamWrapper for '{param_name}' under {type(outer).__name__}.")


def _write_experts(wrapper, ts: list[Target], factors: dict[str, LayerFactors], adapter_name: str,
                   undo: _Undo) -> None:
    """All experts of one 3-D parameter into its ``ParamWrapper``: ``lora_A`` ``(r·E, in)`` holds expert ``e``'s
    ``A`` in rows ``e·r … e·r + r``, ``lora_B`` ``(out, r·E)`` its ``B`` in columns ``j·E + e`` (PEFT's reshapes),
    and ``param[e] = W_e − s·B_e·A_e`` in the parameter's own layout (transposed when stored ``(E, in, out)``) and
    dtype, computed from the factors as stored."""
    t0 = ts[0]
    module, param_name = t0.module, t0.param_name
    fs = [factors[t.name] for t in sorted(ts, key=lambda t: t.expert)]
    lora_a = wrapper.lora_A[adapter_name].weight
    lora_b = wrapper.lora_B[adapter_name].weight
    a = torch.stack([f.A for f in fs])  # (E, r, in)
    b = torch.stack([f.B for f in fs])  # (E, out, r)
    n_exp, rank = a.shape[0], a.shape[1]
    if tuple(lora_a.shape) != (rank * n_exp, a.shape[2]) or tuple(lora_b.shape) != (b.shape[1], rank * n_exp):
        raise RuntimeError(f"'{t0.param_key}': PEFT made LoRA shapes {tuple(lora_a.shape)}/{tuple(lora_b.shape)} but "
                           f"the factors of its {n_exp} experts are rank {rank} ({a.shape[2]} in, {b.shape[1]} out).")
    base = wrapper.get_base_layer()
    wrapper.train(base.training)
    original = undo.params[t0.param_key][2]
    a_store = a.to(lora_a.dtype)
    b_store = b.to(lora_b.dtype)
    cdt = fs[0].A.dtype
    delta = fs[0].scaling * torch.bmm(b_store.to(cdt), a_store.to(cdt))  # (E, out, in)
    w = original.to(device=delta.device, dtype=cdt)
    w_res = w - (delta.transpose(1, 2) if t0.transposed else delta)
    device = original.device
    wrapper.lora_A[adapter_name].weight = nn.Parameter(a_store.reshape(n_exp * rank, -1).to(device).contiguous(),
                                                       requires_grad=lora_a.requires_grad)
    wrapper.lora_B[adapter_name].weight = nn.Parameter(b_store.permute(1, 2, 0).reshape(b.shape[1], -1).to(device)
                                                       .contiguous(), requires_grad=lora_b.requires_grad)
    live = getattr(module, param_name).data
    undo.spill.keep(t0.param_key, live)  # in place, the original kept in the spill
    live.copy_(w_res)


def _expert_groups(adapted: list[Target], factors: dict) -> dict[str, list[Target]]:
    """``{parameter key: its expert targets}``; every expert of an adapted parameter must have factors."""
    groups: dict[str, list[Target]] = {}
    for t in adapted:
        if t.expert is not None:
            groups.setdefault(t.param_key, []).append(t)
    for key, ts in groups.items():
        n_exp = int(ts[0].module.num_experts)
        if len(ts) != n_exp:
            raise RuntimeError(f"'{key}': factors for {len(ts)} of its {n_exp} experts; PEFT adapts all experts of a "
                               "parameter at once.")
    return groups


@torch.no_grad()
def build_peft_model(model: nn.Module, factors: dict[str, LayerFactors], targets: list[Target],
                     config: Optional[CordaConfig] = None, lora: Optional[LoraSpec] = None,
                     adapter_name: str = "default", quant_report: Optional[dict] = None):
    """Wrap ``model`` in a ``peft.PeftModel`` whose LoRA layers hold the CorDA factors.

    Args:
        model: the model the factors were computed on (its targeted base weights become ``W_res``).
        factors: ``{layer name: LayerFactors}`` from :func:`corda_fast.stages.decompose`.
        targets: the resolved targets; only those with factors are adapted.
        config: the :class:`CordaConfig` (``autocast_adapter_dtype``; ``quantized_residual`` / ``requantize_config``
            for quantized base layers).
        lora: the :class:`LoraSpec` the targets were resolved with (rank / alpha patterns, dropout, task type).
        quant_report: if given, filled with ``{layer name: {...}}`` for quantized base layers: the format, and
            :func:`corda_fast.quant.residual_error` of the stored residual.
    Returns:
        ``peft.PeftModel``. On any error the model is restored (adapters unloaded, weights, modules, modes and
        ``requires_grad`` as they were).
    """
    peft_model, rollback = build_with_undo(model, factors, targets, config, lora, adapter_name, quant_report)
    rollback.release()
    return peft_model


class Rollback:
    """Calling it puts the model back exactly as it was before the build; :meth:`release` (once the caller's
    own steps after the build have succeeded) drops the kept originals and removes the spill file."""

    def __init__(self, restore, spill: Spill):
        self._restore = restore
        self.spill = spill

    def __call__(self) -> None:
        try:
            self._restore()
        finally:
            self.spill.close()

    def release(self) -> None:
        self.spill.close()


@torch.no_grad()
def build_with_undo(model: nn.Module, factors: dict[str, LayerFactors], targets: list[Target],
                    config: Optional[CordaConfig] = None, lora: Optional[LoraSpec] = None,
                    adapter_name: str = "default", quant_report: Optional[dict] = None,
                    store: Optional[offload.ResidualStore] = None):
    """:func:`build_peft_model`, also returning a :class:`Rollback` that puts the model back exactly as it was
    (for a failure after the build: saving, fusing); call its ``release()`` once those steps succeeded. ``store``:
    where residuals of disk-offloaded layers go. Targeted weights are overwritten in place, each original first
    copied to ``config.spill`` (a temporary file by default), so the build never holds the weights twice."""
    from peft import get_peft_model

    config = config or CordaConfig()
    lora = lora or LoraSpec()
    adapted = [t for t in targets if t.name in factors]
    lora_config = peft_lora_config(adapted, lora)
    expert_groups = _expert_groups(adapted, factors)
    undo = _Undo(Spill(config.spill, config.spill_folder))
    snapshot = ModelSnapshot(model)

    def restore():
        undo.restore(model, adapted)
        snapshot.restore()

    try:
        if store is None:
            store = offload.residual_store(model, [(t.name, t.module) for t in adapted], config.residual_folder)
        _float_stand_ins(model, adapted, config.quantized_residual == "keep", undo)
        undo.originals = {t.name: t.module.weight.data for t in adapted if t.quant is None and t.expert is None}
        undo.quant_params = {t.name: t.module.weight for t in adapted if t.quant is not None}
        undo.params = {k: (ts[0].module, ts[0].param_name, getattr(ts[0].module, ts[0].param_name).data)
                       for k, ts in expert_groups.items()}
        # LoRA weights are created on the meta device (no random init to pay for and overwrite; the user's RNG
        # stream is not touched) and replaced below by the CorDA factors.
        undo.peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name,
                                         autocast_adapter_dtype=config.autocast_adapter_dtype, low_cpu_mem_usage=True)
        inner = undo.peft_model.base_model.model
        for t in adapted:
            if t.expert is None:
                _write_layer(inner.get_submodule(t.name), t, factors[t.name], adapter_name, config, undo,
                             quant_report, store)
        for key, ts in expert_groups.items():
            module_name = key.rpartition(".")[0]
            _write_experts(_param_wrapper(inner.get_submodule(module_name), ts[0].param_name), ts, factors,
                           adapter_name, undo)
        leftover = [n for n, p in undo.peft_model.named_parameters() if p.is_meta and "lora_" in n]
        if leftover:
            raise RuntimeError(f"LoRA weights without CorDA factors: {leftover[:5]}")
    except BaseException:
        Rollback(restore, undo.spill)()
        raise
    logger.debug("build: %d original(s) spilled (%.1f MiB on disk, %.1f MiB in memory)", len(undo.spill),
                 undo.spill.bytes_on_disk / 2**20, undo.spill.bytes_in_memory / 2**20)
    return undo.peft_model, Rollback(restore, undo.spill)


def save_initial_adapter(peft_model, path: str) -> None:
    """Save the adapter right after initialisation; needed later by :func:`save_as_lora`."""
    peft_model.save_pretrained(path)
    write_portable_config(path)


_KEEP_KEYS = ("peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules",
              "init_lora_weights")


def write_portable_config(path: str) -> dict:
    """Rewrite ``path/adapter_config.json`` without the fields that are unset (``None``, their default): a PEFT
    release that predates a feature then reads the file without "unknown key" warnings (e.g. PEFT 0.18, pinned by
    LLaMA-Factory, lacks five of today's), and every release reads the same adapter (a missing field takes its
    default). Returns the written config."""
    from peft import LoraConfig

    defaults = {f.name: f.default for f in dataclasses.fields(LoraConfig) if f.default is not dataclasses.MISSING}
    file = os.path.join(path, "adapter_config.json")
    with open(file) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") not in (None, "LORA"):
        return cfg
    cfg = {k: v for k, v in cfg.items() if k in _KEEP_KEYS or not (v is None and k in defaults and defaults[k] is None)}
    with open(file, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return cfg


def save_as_lora(peft_model, out_dir: str, initial_adapter_dir: str) -> dict:
    """Save a trained CorDA model as a *plain LoRA* adapter for the ORIGINAL base weights — **at twice the rank**.

    The trained model is ``W_res + s·B·A`` with ``W_res = W − s·B₀·A₀``, so relative to the original ``W`` the change
    is ``ΔW = s·(B·A − B₀·A₀)``: the difference of two rank-``r`` products, which in general has rank ``2r`` and no
    rank-``r`` LoRA can hold exactly. It is written as a rank-``2r`` LoRA (``A' = [A; A₀]``, ``B' = [B, −B₀]``;
    PEFT's ``path_initial_model_for_weight_conversion``): ``r`` and ``lora_alpha`` double (with rsLoRA, alpha grows
    by √2 so the scale stays), and so do ``rank_pattern``/``alpha_pattern`` values. Nothing is lost; the file is twice
    as large. To keep rank ``r``, ship the residual base with the trained adapter instead.

    ``initial_adapter_dir`` must hold the adapter saved before training (by :func:`corda_fast.save_for_trainers`,
    :func:`save_initial_adapter` or ``init_adapters(..., initial_adapter_dir=...)``). Not available with
    ``use_rslora`` combined with rank/alpha patterns (PEFT limitation).

    Returns the written adapter's ``{"path", "r", "lora_alpha", "trained_r"}``; the doubling is also logged.
    """
    if not os.path.isdir(initial_adapter_dir):
        raise FileNotFoundError(
            f"initial adapter '{initial_adapter_dir}' not found: save it right after init_adapters "
            "(initial_adapter_dir=...) before training."
        )
    trained_r = next(iter(peft_model.peft_config.values())).r
    peft_model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=initial_adapter_dir)
    with open(os.path.join(out_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    logger.warning("save_as_lora: wrote a plain LoRA of rank %d (lora_alpha %s) to %s — twice the trained rank %d, "
                   "because ΔW = s·(B·A − B₀·A₀) needs both the trained and the initial factors to be exact on the "
                   "original weights.", cfg["r"], cfg["lora_alpha"], out_dir, trained_r)
    return {"path": out_dir, "r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "trained_r": trained_r}


def residual_state_dict(peft_model) -> dict:
    """State dict of the base model carrying the residual weights ``W_res`` (LoRA tensors left out, PEFT's
    ``base_layer.`` prefix removed), for ``base.save_pretrained(dir, state_dict=...)``."""
    sd = {}
    for key, value in peft_model.base_model.model.state_dict().items():
        if "lora_" in key:
            continue
        sd[_unwrapped(key)] = value
    return sd


def _unwrapped(name: str) -> str:
    """A state-dict name without PEFT's ``base_layer`` levels (nested ``ParamWrapper``s stack several)."""
    while ".base_layer." in name:
        name = name.replace(".base_layer.", ".")
    return name


def _residual_name(name: str) -> Optional[str]:
    """The checkpoint name of a PEFT-wrapped base model's state-dict entry (``None``: a LoRA tensor, left out)."""
    return None if "lora_" in name else _unwrapped(name)


def save_residual_base(peft_model, path: str) -> None:
    """Save the base model with ``W_res`` in place of the targeted weights (a transformers model directory), so
    ``PeftModel.from_pretrained(AutoModel.from_pretrained(path), adapter_dir)`` restores the initialised model.

    A model accelerate dispatched (``device_map``; weights offloaded to host memory or disk) is written block by
    block (:func:`save_residual_base_by_block`) without materialising it."""
    base = peft_model.base_model.model
    if offload.is_dispatched(base):
        save_residual_base_by_block(peft_model, path)
        return
    if not hasattr(base, "save_pretrained"):
        os.makedirs(path, exist_ok=True)
        torch.save(residual_state_dict(peft_model), os.path.join(path, "residual_base.pt"))
        return
    if getattr(base, "hf_quantizer", None) is not None:
        # transformers serialises quantized weights itself (4-bit codes + quant state) and ignores a given
        # state_dict: save the model with its LoRA wrappers swapped out for their base layers for the moment
        from peft.tuners.lora.layer import LoraLayer

        wrapped = [(n, m) for n, m in base.named_modules() if isinstance(m, LoraLayer)]
        try:
            for name, module in wrapped:
                _swap(base, name, module.get_base_layer())
            base.save_pretrained(path)
        finally:
            for name, module in wrapped:
                _swap(base, name, module)
        return
    base.save_pretrained(path, state_dict=residual_state_dict(peft_model))


def _block_of(name: str) -> str:
    """The shard a tensor goes to: its block (``model.layers.3``), or ``""`` for tensors outside every block."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ""


def save_residual_base_by_block(peft_model, path: str) -> None:
    """Write the residual base as safetensors shards, one per block (tensors outside the blocks in shards of their
    own), with ``model.safetensors.index.json``, ``config.json`` and the generation config: a folder plain
    ``from_pretrained`` loads. Tensors are read one block at a time from wherever they live (device, host memory,
    the offload folder, the residual store), so memory holds one block's tensors, never the model."""
    from safetensors.torch import save_file

    base = peft_model.base_model.model
    os.makedirs(path, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    shard: dict[str, torch.Tensor] = {}
    current = None
    files: list[str] = []

    def flush():
        nonlocal shard, total
        if shard:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
            files.append(fname)
            for k, v in shard.items():
                weight_map[k] = fname
                total += v.numel() * v.element_size()
        shard = {}
        offload.release_host_memory()

    for name, load in offload.iter_state(base, _residual_name):
        block = _block_of(name)
        if block != current:
            flush()
            current = block
        shard[name] = load().detach().to("cpu").contiguous()
    flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    if getattr(base, "config", None) is not None and hasattr(base.config, "save_pretrained"):
        base.config.save_pretrained(path)
    gen = getattr(base, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        gen.save_pretrained(path)
    logger.info("residual base written block by block to %s (%d shards, %.1f MiB)", path, len(files), total / 2**20)
