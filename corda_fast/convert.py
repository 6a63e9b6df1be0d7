"""After training: the trained CorDA adapter as a plain LoRA for the ORIGINAL base, and the merged model.

A trained CorDA model is the residual base ``W_res = W − s·B₀·A₀`` plus the trained adapter ``s·B·A``. Relative to the
original weights the update is ``ΔW = s·(B·A − B₀·A₀)``, of rank up to ``2r``. :func:`convert` writes it as a LoRA
for the original base:

- ``exact`` (default): rank ``2r``, ``A' = [A; A₀]``, ``B' = [B, −B₀]`` — nothing lost;
- ``rank=k``: the best rank-``k`` approximation of ``ΔW`` per layer (Eckart–Young), or ``energy=e``: per layer the
  smallest rank keeping the share ``e`` of ``‖ΔW‖_F²``. Computed from the thin factors only: with
  ``ΔW = P·Q`` (``P = [B, −B₀]``, ``d_out × 2r``; ``Q = s·[A; A₀]``, ``2r × d_in``), thin QR of ``P`` and ``Qᵀ``
  and an SVD of the ``2r × 2r`` core give ``ΔW``'s singular triplets; no ``d_out × d_in`` matrix is formed.

:func:`merge` writes the full model ``W_res + s·B·A`` in the base's dtype, one safetensors shard at a time (the
residual base's own sharding and names), loadable with plain ``from_pretrained``.

Both work on files (no model is built): adapter folders as PEFT saves them, the ``corda_out/`` folder of
``python -m corda_fast init``, or a trainer's output folder (its final adapter, else its latest ``checkpoint-N``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Optional

import torch

from .targets import lora_scaling, pattern_key

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class ConvertError(ValueError):
    """An adapter or model folder that cannot be used, named with what was looked for."""


# ---------------------------------------------------------------------------------------------------- reading
def find_adapter(path: str, what: str, checkpoint: Optional[int] = None) -> str:
    """The folder holding the adapter ``path`` names: ``path`` itself; for ``corda_out/``, its ``initial_adapter/``
    (``what="initial"``); for a trainer's output folder (TRL, LLaMA-Factory, axolotl: ``checkpoint-N`` subfolders),
    its final adapter, else its latest checkpoint — or checkpoint ``checkpoint`` when given."""
    if not os.path.isdir(path):
        raise ConvertError(f"{what} adapter '{path}' does not exist or is not a folder.")
    if checkpoint is not None:
        sub = os.path.join(path, f"checkpoint-{checkpoint}")
        if not _is_adapter(sub):
            raise ConvertError(f"{what} adapter: '{sub}' holds no adapter (adapter_config.json + adapter_model.*).")
        return sub
    if _is_adapter(path):
        return path
    if what == "initial" and _is_adapter(os.path.join(path, "initial_adapter")):
        return os.path.join(path, "initial_adapter")
    steps = sorted((int(m.group(1)), d) for d in os.listdir(path) if (m := re.fullmatch(r"checkpoint-(\d+)", d))
                   and _is_adapter(os.path.join(path, d)))
    if steps:
        return os.path.join(path, steps[-1][1])
    raise ConvertError(f"{what} adapter: '{path}' holds no adapter (adapter_config.json + adapter_model.safetensors), "
                       "no initial_adapter/ and no checkpoint-N/ with one.")


def _is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json")) and any(
        os.path.isfile(os.path.join(path, f)) for f in ADAPTER_FILES)


@dataclass
class Adapter:
    """A LoRA adapter read from its folder: ``layers[name] = (A (r, d_in), B (d_out, r), scaling)`` in float64."""

    path: str
    config: dict
    layers: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32  # of the stored tensors


def read_adapter(path: str) -> Adapter:
    """Read the LoRA adapter in ``path`` (PEFT's format: ``<prefix>.<module>.lora_A.weight`` / ``lora_B.weight``)."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConvertError(f"'{path}' holds a {cfg.get('peft_type')} adapter, not a LoRA.")
    if cfg.get("target_parameters"):
        raise ConvertError(
            f"'{path}' adapts expert parameters (target_parameters={cfg['target_parameters'][:2]}...): PEFT's "
            "ParamWrapper stores all experts' factors in one interleaved pair, which convert / merge / eval do not "
            "read yet. Merge with PEFT instead: PeftModel.from_pretrained(<residual base model>, <adapter>)"
            ".merge_and_unload().")
    tensors = _read_tensors(path)
    adapter = Adapter(path, cfg)
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[: -len(".lora_A.weight")]
        b = tensors.get(name + ".lora_B.weight")
        if b is None:
            raise ConvertError(f"'{path}': {key} has no lora_B beside it.")
        module = re.sub(r"^base_model\.model\.", "", name)
        adapter.layers[module] = (a.double(), b.double(), _scaling(cfg, module, a.shape[0]))
        adapter.dtype = a.dtype
    if not adapter.layers:
        raise ConvertError(f"'{path}' holds no LoRA layer (no *.lora_A.weight tensor).")
    return adapter


def _read_tensors(path: str) -> dict:
    st = os.path.join(path, ADAPTER_FILES[0])
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st)
    return torch.load(os.path.join(path, ADAPTER_FILES[1]), map_location="cpu", weights_only=True)


def _scaling(cfg: dict, module: str, r: int) -> float:
    """PEFT's scaling of ``module``: ``alpha / r`` (``alpha / √r`` with rsLoRA), patterns applied."""
    key = pattern_key(cfg.get("alpha_pattern") or {}, module)
    alpha = float(cfg["alpha_pattern"][key] if key is not None else cfg.get("lora_alpha", r))
    return lora_scaling(alpha, r, bool(cfg.get("use_rslora")))


# ---------------------------------------------------------------------------------------------------- convert
def _orthonormal(p: torch.Tensor, qt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ``M = p @ qt.T`` (``p`` ``(m, k)``, ``qt`` ``(n, k)``): ``(U, S, V)`` with ``M = U diag(S) Vᵀ``,
    ``U`` ``(m, k)`` and ``V`` ``(n, k)`` orthonormal, from thin QRs and the SVD of a ``k × k`` core."""
    qp, rp = torch.linalg.qr(p)
    qq, rq = torch.linalg.qr(qt)
    u, s, vh = torch.linalg.svd(rp @ rq.mT)
    return qp @ u, s, qq @ vh.mT


def _fro_lowrank(p: torch.Tensor, q: torch.Tensor) -> float:
    """``‖p @ q‖_F`` without forming it (``p`` ``(m, k)``, ``q`` ``(k, n)``)."""
    return float(torch.linalg.matrix_norm(torch.linalg.qr(p)[1] @ torch.linalg.qr(q.mT)[1].mT))


def _layer_update(trained: tuple, initial: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, Q)`` with ``ΔW = P @ Q = s·B·A − s₀·B₀·A₀``: ``P = [B, −B₀]``, ``Q = [s·A; s₀·A₀]``."""
    (a, b, s), (a0, b0, s0) = trained, initial
    return torch.cat([b, -b0], 1), torch.cat([a * s, a0 * s0], 0)


def _keep(s: torch.Tensor, rank: Optional[int], energy: Optional[float]) -> int:
    """How many singular values to keep: ``rank`` (at most all), or the fewest holding ``energy`` of ``Σ σ²``."""
    if rank is not None:
        return max(1, min(rank, s.numel()))
    e = s.square().cumsum(0)
    if float(e[-1]) == 0.0:
        return 1
    return max(1, min(int((e / e[-1] < energy - 1e-12).sum()) + 1, s.numel()))


def convert_layer(trained: tuple, initial: tuple, rank: Optional[int] = None, energy: Optional[float] = None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One layer's plain-LoRA factors ``(A', B', relative error)`` with scaling 1: ``B'·A' ≈ ΔW``. Exact (rank
    ``2r``) when ``rank`` and ``energy`` are None; the error is ``‖B'A' − ΔW‖_F / ‖ΔW‖_F`` of the stored factors."""
    p, q = _layer_update(trained, initial)
    if rank is None and energy is None:
        a_new, b_new = q, p
    else:
        u, s, v = _orthonormal(p, q.mT)
        k = _keep(s, rank, energy)
        root = s[:k].sqrt()
        a_new, b_new = (v[:, :k] * root).mT, u[:, :k] * root
    a_new, b_new = a_new.to(dtype).contiguous(), b_new.to(dtype).contiguous()
    norm = _fro_lowrank(p, q)
    diff = _fro_lowrank(torch.cat([b_new.double(), -p], 1), torch.cat([a_new.double(), q], 0))
    return a_new, b_new, (diff / norm if norm > 0 else 0.0)


def convert(initial_adapter: str, trained: str, out_dir: str, rank: Optional[int] = None,
            energy: Optional[float] = None, base_model: Optional[str] = None,
            checkpoint: Optional[int] = None) -> dict:
    """Write the trained CorDA adapter as a plain LoRA for the original base into ``out_dir`` (see the module
    docstring). ``initial_adapter``: the initial adapter folder or ``corda_out/``; ``trained``: a PEFT adapter folder
    or a trainer's output folder (``checkpoint``: which ``checkpoint-N``). ``rank`` / ``energy``: compress (at most
    one; default: exact, rank ``2r``). ``base_model``: recorded as ``base_model_name_or_path`` (default: the
    original model the residual base was made from, when its config names it).

    Returns the report written to ``out_dir/convert_report.json``:
    ``{"layers": {name: {"rank", "relative_error"}}, "mode", "r", "max_relative_error", ...}``."""
    if rank is not None and energy is not None:
        raise ConvertError("give rank or energy, not both.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConvertError(f"rank={rank!r}: expected an int >= 1.")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ConvertError(f"energy={energy!r}: expected a share in (0, 1].")
    init = read_adapter(find_adapter(initial_adapter, "initial"))
    done = read_adapter(find_adapter(trained, "trained", checkpoint))
    _check_pair(init, done)
    dtype = done.dtype
    tensors, layers = {}, {}
    for name, layer in done.layers.items():
        a, b, err = convert_layer(layer, init.layers[name], rank, energy, dtype)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        layers[name] = {"rank": int(a.shape[0]), "relative_error": err}
    mode = "exact" if rank is None and energy is None else f"rank {rank}" if rank is not None else f"energy {energy}"
    config = _converted_config(done.config, layers, base_model or _original_base(init.config))
    _write_adapter(out_dir, config, tensors)
    report = {"mode": mode, "initial_adapter": init.path, "trained": done.path, "out": os.path.abspath(out_dir),
              "base_model_name_or_path": config["base_model_name_or_path"], "r": config["r"],
              "max_relative_error": max(v["relative_error"] for v in layers.values()), "layers": layers}
    with open(os.path.join(out_dir, "convert_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    logger.info("converted %d layers (%s) to %s: max relative error %.3g", len(layers), mode, out_dir,
                report["max_relative_error"])
    return report


def _check_pair(init: Adapter, done: Adapter) -> None:
    """The trained adapter continues the initial one: the same layers, the same shapes."""
    missing = sorted(set(done.layers) - set(init.layers))
    if missing:
        raise ConvertError(f"the trained adapter '{done.path}' has layers the initial adapter '{init.path}' lacks, "
                           f"e.g. {missing[:3]}: they are not the same run's.")
    for name, (a, b, _) in done.layers.items():
        a0, b0, _ = init.layers[name]
        if a.shape[1] != a0.shape[1] or b.shape[0] != b0.shape[0]:
            raise ConvertError(f"layer '{name}': trained {tuple(b.shape[:1]) + tuple(a.shape[1:])} vs initial "
                               f"{tuple(b0.shape[:1]) + tuple(a0.shape[1:])} (d_out, d_in): not the same model.")


def _original_base(init_config: dict) -> Optional[str]:
    """The model the residual base was made from, as ``save_for_trainers`` recorded it beside the residual
    (``corda_fast_origin.json``), else as its ``config.json`` records it (``_name_or_path``), else None."""
    base = init_config.get("base_model_name_or_path")
    for file, key in (("corda_fast_origin.json", "original_model"), ("config.json", "_name_or_path")):
        try:
            with open(os.path.join(base, file)) as f:
                found = json.load(f).get(key)
        except (TypeError, OSError, ValueError):
            continue
        if found:
            return found
    return None


def _converted_config(trained: dict, layers: dict, base_model: Optional[str]) -> dict:
    """The trained adapter's config for the converted factors: scaling 1 everywhere (``lora_alpha = r`` and an
    ``alpha_pattern`` equal to the ``rank_pattern`` where ranks differ), no rsLoRA, plain LoRA init."""
    ranks = [v["rank"] for v in layers.values()]
    r = max(set(ranks), key=ranks.count)  # the commonest rank is the default, the others are patterns
    pattern = {re.escape(n): v["rank"] for n, v in layers.items() if v["rank"] != r}
    cfg = dict(trained)
    cfg.update(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), use_rslora=False,
               init_lora_weights=True, base_model_name_or_path=base_model)
    for key in ("corda_config", "eva_config", "loftq_config"):
        cfg.pop(key, None)
    return cfg


def _write_adapter(out_dir: str, config: dict, tensors: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, ADAPTER_FILES[0]))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def report_table(report: dict) -> str:
    """The conversion report as text: one line per layer (rank, relative error), then the worst error."""
    width = max(len(n) for n in report["layers"])
    lines = [f"{'layer':{width}s}  rank  relative error"]
    lines += [f"{n:{width}s}  {v['rank']:4d}  {v['relative_error']:.3e}" for n, v in report["layers"].items()]
    lines.append(f"{report['mode']}: {len(report['layers'])} layers, max relative error "
                 f"{report['max_relative_error']:.3e}; written to {report['out']}")
    if "logit_drift" in report:
        d = report["logit_drift"]
        lines.append(f"logit drift vs the trained model: max|Δlogit| {d['max_abs_logit_diff']:.3g} ({d['relative']:.2e} "
                     f"of max|logit|) on {d['tokens']} tokens")
    return "\n".join(lines)


@torch.no_grad()
def logit_drift(report: dict, batches: list[dict]) -> dict:
    """How far the converted adapter on the original model is from the trained model (the residual base with the
    trained adapter), on ``batches``: ``{"max_abs_logit_diff", "max_abs_logit", "relative", "tokens"}`` over real
    tokens. Needs both base models as local folders (the report names them)."""
    from .evaluate import load_trained

    with open(os.path.join(report["initial_adapter"], "adapter_config.json")) as f:
        residual = json.load(f).get("base_model_name_or_path")
    original = report["base_model_name_or_path"]
    for what, path in (("original model", original), ("residual base", residual)):
        if not path or not os.path.isdir(path):
            raise ConvertError(f"the logit drift needs the {what} as a local folder; found {path!r} (give --base-model).")
    converted = load_trained(report["out"], base=original)
    trained = load_trained(residual, adapter=report["trained"])
    diff = scale = 0.0
    tokens = 0
    for b in batches:
        keep = b["attention_mask"].bool()
        a = converted(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[keep].double()
        t = trained(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[keep].double()
        diff, scale = max(diff, float((a - t).abs().max())), max(scale, float(t.abs().max()))
        tokens += int(keep.sum())
    return {"max_abs_logit_diff": diff, "max_abs_logit": scale, "relative": diff / scale if scale else 0.0,
            "tokens": tokens}


# ---------------------------------------------------------------------------------------------------- merge
def merge(residual_base: str, adapter: str, out_dir: str, checkpoint: Optional[int] = None,
          max_shard_bytes: Optional[int] = None) -> dict:
    """Write ``W_res + s·B·A`` (the trained model as one plain transformers model, in the base's dtype) to
    ``out_dir``, every other file of the residual base (config, tokenizer) copied. ``adapter``: the trained adapter
    (a PEFT folder or a trainer's output folder).

    Shards: by default the residual base's own (file and tensor names kept), one at a time; with
    ``max_shard_bytes``, new shards of at most that size (plus one tensor) and a new index, reading only the tensors
    of the shard being written — the peak is then about twice ``max_shard_bytes`` whatever the input's sharding.
    Returns ``{"out", "layers", "shards"}``; the folder appears complete or not at all."""
    files = _model_shards(residual_base)
    lora = read_adapter(find_adapter(adapter, "trained", checkpoint))
    conv1d = bool(lora.config.get("fan_in_fan_out"))
    work = os.path.abspath(out_dir).rstrip(os.sep) + ".partial"
    shutil.rmtree(work, ignore_errors=True)
    skip = ["*.safetensors"] + (["model.safetensors.index.json"] if max_shard_bytes else [])
    shutil.copytree(residual_base, work, ignore=shutil.ignore_patterns(*skip))
    merged: set = set()
    try:
        plan = _plan_shards(residual_base, files, max_shard_bytes)
        for out_name, items in plan.items():
            _write_merged_shard(residual_base, items, os.path.join(work, out_name), lora, conv1d, merged)
        if max_shard_bytes:
            _write_index(work, plan)
        missing = sorted(set(lora.layers) - merged)
        if missing:
            raise ConvertError(f"the adapter's layers {missing[:3]} have no weight in '{residual_base}': not the "
                               "residual base this adapter was trained on.")
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    logger.info("merged %d layers into %d shard(s) in %s", len(merged), len(plan), out_dir)
    return {"out": os.path.abspath(out_dir), "layers": len(merged), "shards": list(plan)}


def _model_shards(folder: str) -> list[str]:
    """The safetensors files of a transformers model folder (its index's, or the single ``model.safetensors``)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return ["model.safetensors"]
    raise ConvertError(f"residual base '{folder}' holds no model.safetensors (nor an index of shards).")


def _plan_shards(folder: str, files: list[str], max_bytes: Optional[int]) -> dict[str, list[tuple[str, str]]]:
    """``{output shard: [(input file, tensor name)]}``: the input's own shards, or new ones of at most
    ``max_bytes`` each (tensors in the input's order; a tensor larger than that gets a shard of its own)."""
    from safetensors import safe_open

    if not max_bytes:
        out = {}
        for name in files:
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                out[name] = [(name, k) for k in f.keys()]
        return out
    groups, size = [[]], 0
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                n = math.prod(sl.get_shape()) * _DTYPE_BYTES.get(sl.get_dtype(), 4)
                if groups[-1] and size + n > max_bytes:
                    groups.append([])
                    size = 0
                groups[-1].append((name, key))
                size += n
    total = len(groups)
    return {f"model-{i + 1:05d}-of-{total:05d}.safetensors": g for i, g in enumerate(groups)}


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _write_index(folder: str, plan: dict) -> None:
    weight_map = {key: out for out, items in plan.items() for _, key in items}
    size = sum(os.path.getsize(os.path.join(folder, out)) for out in plan)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": size}, "weight_map": weight_map}, f, indent=2)


@torch.no_grad()
def _write_merged_shard(folder: str, items: list, dst: str, lora: Adapter, conv1d: bool, merged: set) -> None:
    """One output shard: its tensors read (each input file opened for them only), every weight the adapter adapts
    with ``s·B·A`` added (float64 arithmetic, stored in its dtype)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out, meta = {}, None
    by_file: dict[str, list[str]] = {}
    for name, key in items:
        by_file.setdefault(name, []).append(key)
    for name, keys in by_file.items():
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            meta = meta or f.metadata()
            for key in keys:
                w = f.get_tensor(key)
                module = key[: -len(".weight")] if key.endswith(".weight") else None
                if module in lora.layers:
                    a, b, s = lora.layers[module]
                    delta = s * (b @ a)
                    w = (w.double() + (delta.mT if conv1d else delta)).to(w.dtype)
                    merged.add(module)
                out[key] = w.contiguous()
    save_file(out, dst, metadata=meta or {"format": "pt"})
