"""Artifacts any trainer loads as-is: a residual base model and an initial adapter, plus ready-made configs.

A CorDA model is a base whose targeted weights are ``W_res = W − s·B·A`` plus a LoRA adapter holding ``A`` and ``B``.
Trainers that know nothing of CorDA train it when given exactly that pair: the base as "the model", the adapter as
"an existing adapter to keep training". :func:`save_for_trainers` writes

- ``residual_base/``: the full model with ``W_res`` (a transformers folder, tokenizer included, and
  ``corda_fast_origin.json`` naming the original model);
- ``initial_adapter/``: the adapter at initialisation, ``init_lora_weights: true`` and ``base_model_name_or_path``
  pointing at ``residual_base/`` (so ``AutoPeftModelForCausalLM.from_pretrained(initial_adapter)`` finds its base);
- ``llamafactory.yaml`` (``llamafactory-cli train``), ``axolotl.yaml`` (``axolotl train``) and ``train_trl.py``
  (``trl.SFTTrainer`` on the loaded model, no ``peft_config``), each naming the folders above.

The initial adapter is also what :func:`corda_fast.save_as_lora` needs after training to express the result as a
plain LoRA for the *original* weights (at twice the rank).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from typing import Optional

from .peft_bridge import save_residual_base, write_portable_config

logger = logging.getLogger(__name__)

RESIDUAL_BASE = "residual_base"
INITIAL_ADAPTER = "initial_adapter"
LLAMAFACTORY = "llamafactory.yaml"
AXOLOTL = "axolotl.yaml"
TRL_SCRIPT = "train_trl.py"
ORIGIN = "corda_fast_origin.json"  # in residual_base/: the model the residual was made from
_WRITTEN = (RESIDUAL_BASE, INITIAL_ADAPTER, LLAMAFACTORY, AXOLOTL, TRL_SCRIPT)


@dataclasses.dataclass
class TrainerArtifacts:
    """Where :func:`save_for_trainers` wrote each artifact (paths as they are to be used) and the adapter's LoRA
    settings the configs repeat."""

    residual_base: str
    initial_adapter: str
    llamafactory: str
    axolotl: str
    trl_script: str
    r: int
    lora_alpha: float
    target_modules: list[str]

    def usage(self) -> list[str]:
        """One line per trainer on how to use what was written."""
        return [
            f"PEFT        : PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{self.residual_base}'), "
            f"'{self.initial_adapter}', is_trainable=True)",
            f"TRL         : python {self.trl_script} --data your.jsonl  (SFTTrainer on that model, no peft_config)",
            f"LLaMA-Factory: llamafactory-cli train {self.llamafactory}  (set dataset/template first)",
            f"axolotl     : axolotl train {self.axolotl}  (set datasets first)",
        ]


def _number(x: float):
    """An alpha as YAML shows it best: an int when it is one."""
    return int(x) if float(x).is_integer() else float(x)


def _module_kinds(target_modules) -> list[str]:
    """The last name parts of the adapted modules (``model.layers.0.self_attn.q_proj`` → ``q_proj``)."""
    if isinstance(target_modules, str):
        return [target_modules]
    return sorted({str(t).split(".")[-1] for t in target_modules})


def _yaml(value) -> str:
    """A scalar or list as YAML (JSON is valid YAML; strings quoted)."""
    return json.dumps(value)


def llamafactory_yaml(a: TrainerArtifacts) -> str:
    """``llamafactory.yaml``: LoRA SFT that resumes training the CorDA adapter on the residual base."""
    return f"""\
# LLaMA-Factory: llamafactory-cli train {LLAMAFACTORY}
# The base is corda_fast's residual model (W_res = W - s*B*A) and the adapter starts at CorDA's A, B: LLaMA-Factory
# loads the adapter trainable (create_new_adapter: false) and trains it. The adapter's own adapter_config.json
# governs rank, alpha and targets; the lora_* lines below repeat them for reference.
### model
model_name_or_path: {_yaml(a.residual_base)}
adapter_name_or_path: {_yaml(a.initial_adapter)}

### method
stage: sft
do_train: true
finetuning_type: lora
create_new_adapter: false
lora_rank: {a.r}
lora_alpha: {_yaml(_number(a.lora_alpha))}
lora_target: {_yaml(",".join(_module_kinds(a.target_modules)))}
# pissa_convert: true would, at the end, also save output_dir/pissa_converted: the same adapter as a plain LoRA
# for the ORIGINAL model, of rank {2 * a.r} (twice the rank: it must hold both the trained and the initial adapter).

### dataset (yours)
dataset: identity
template: default
cutoff_len: 1024

### output
output_dir: saves/corda
logging_steps: 10
save_steps: 500

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 2.0e-5
num_train_epochs: 1.0
lr_scheduler_type: cosine
"""


def axolotl_yaml(a: TrainerArtifacts, rank_pattern: dict, alpha_pattern: dict) -> str:
    """``axolotl.yaml``: LoRA training that loads the CorDA adapter (``lora_model_dir``) onto the residual base.
    Only keys axolotl's schema reads are written; per-layer ranks and alphas are in the adapter's own config."""
    patterns = ""
    if rank_pattern or alpha_pattern:
        patterns = (f"# Per-layer ranks / alphas ({len(rank_pattern)} rank_pattern, {len(alpha_pattern)} alpha_pattern "
                    "entries) are set by initial_adapter/adapter_config.json,\n# which lora_model_dir loads; axolotl "
                    "has no key for them, and lora_r / lora_alpha above are the uniform defaults.\n")
    return f"""\
# axolotl: axolotl train {AXOLOTL}
# base_model is corda_fast's residual model (W_res = W - s*B*A); lora_model_dir loads the CorDA adapter trainable,
# so axolotl trains it instead of a fresh LoRA. Do NOT set peft_init_lora_weights: corda -- the adapter is already
# initialised, and PEFT's own CorDA init needs a preprocessing step axolotl does not run. The adapter's
# adapter_config.json (in lora_model_dir) sets rank, alpha and targets; the lora_* lines repeat them.
#
# On a machine without a GPU: axolotl turns on fp16 and its fused LoRA kernels by itself, and both fail on CPU.
# Uncomment these lines there (on a GPU leave them out, or set bf16: true):
# fp16: false
# bf16: false
# lora_mlp_kernel: false
# lora_qkv_kernel: false
# lora_o_kernel: false
base_model: {_yaml(a.residual_base)}
adapter: lora
lora_model_dir: {_yaml(a.initial_adapter)}
lora_r: {a.r}
lora_alpha: {_yaml(_number(a.lora_alpha))}
lora_dropout: 0.0
lora_target_modules: {_yaml(_module_kinds(a.target_modules))}
{patterns}
# your data
datasets:
  - path: your/dataset
    type: alpaca
sequence_len: 1024

micro_batch_size: 1
gradient_accumulation_steps: 8
num_epochs: 1
optimizer: adamw_torch
lr_scheduler: cosine
learning_rate: 2.0e-5
output_dir: ./outputs/corda
"""


def trl_script(a: TrainerArtifacts) -> str:
    """``train_trl.py``: ``trl.SFTTrainer`` on the loaded CorDA model (no ``peft_config``: the model is already one)."""
    return f'''\
"""Train the CorDA adapter with TRL: python {TRL_SCRIPT} --data train.jsonl [--max-steps N] [--output-dir DIR]
    [--learning-rate LR] [--batch-size B] [--gradient-accumulation-steps G] [--logging-steps N] [--save-steps N]

The data: any file `datasets` reads with a "text" or a "messages" column. Written by corda_fast."""
import argparse

import torch
from datasets import load_dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

RESIDUAL_BASE = {a.residual_base!r}
INITIAL_ADAPTER = {a.initial_adapter!r}

p = argparse.ArgumentParser()
p.add_argument("--data", required=True)
p.add_argument("--max-steps", type=int, default=-1)
p.add_argument("--output-dir", default="corda_sft")
p.add_argument("--max-length", type=int, default=1024)
p.add_argument("--learning-rate", type=float, default=2e-5)
p.add_argument("--batch-size", type=int, default=1, help="per device")
p.add_argument("--gradient-accumulation-steps", type=int, default=8)
p.add_argument("--logging-steps", type=int, default=10)
p.add_argument("--save-steps", type=int, default=500)
args = p.parse_args()

tokenizer = AutoTokenizer.from_pretrained(RESIDUAL_BASE)
base = AutoModelForCausalLM.from_pretrained(RESIDUAL_BASE)
model = PeftModel.from_pretrained(base, INITIAL_ADAPTER, is_trainable=True)  # the CorDA adapter, trainable
data = load_dataset("json" if args.data.endswith((".json", ".jsonl")) else "text", data_files=args.data)["train"]
config = SFTConfig(output_dir=args.output_dir, max_steps=args.max_steps, max_length=args.max_length,
                   per_device_train_batch_size=args.batch_size,
                   gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
                   logging_steps=args.logging_steps, save_steps=args.save_steps,
                   report_to="none", use_cpu=not torch.cuda.is_available(),
                   bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer).train()
model.save_pretrained(args.output_dir)  # the trained adapter, for the residual base
'''


def _check_out(out_dir: str, overwrite: bool) -> None:
    taken = [n for n in _WRITTEN if os.path.exists(os.path.join(out_dir, n))]
    if taken and not overwrite:
        raise FileExistsError(f"save_for_trainers: '{out_dir}' already holds {taken}; pass overwrite=True to "
                              "replace them, or choose another folder.")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"save_for_trainers: '{out_dir}' exists and is not a folder.")


def _save_initial_adapter(peft_model, path: str, base_path: str, adapter_name: str) -> dict:
    """Save the adapter with ``base_model_name_or_path`` = ``base_path`` (the model's config is left as it was)."""
    cfg = peft_model.peft_config[adapter_name]
    before = cfg.base_model_name_or_path
    cfg.base_model_name_or_path = base_path
    try:
        peft_model.save_pretrained(path, selected_adapters=[adapter_name], save_embedding_layers=False)
    finally:
        cfg.base_model_name_or_path = before
    if adapter_name != "default":  # PEFT saves a non-default adapter in a subfolder of its name
        sub = os.path.join(path, adapter_name)
        for f in os.listdir(sub):
            os.replace(os.path.join(sub, f), os.path.join(path, f))
        os.rmdir(sub)
    return write_portable_config(path)


def _write(peft_model, out_dir: str, final: str, tokenizer, adapter_name: str) -> TrainerArtifacts:
    base_dir = os.path.join(out_dir, RESIDUAL_BASE)
    save_residual_base(peft_model, base_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(base_dir)
    with open(os.path.join(base_dir, ORIGIN), "w") as f:  # what `convert` names as the converted adapter's base
        json.dump({"original_model": peft_model.peft_config[adapter_name].base_model_name_or_path or None,
                   "residual": "W_res = W - s*B0*A0 on the adapted layers (corda_fast)"}, f, indent=1)
    final_base = os.path.join(final, RESIDUAL_BASE)
    cfg = _save_initial_adapter(peft_model, os.path.join(out_dir, INITIAL_ADAPTER), final_base, adapter_name)
    art = TrainerArtifacts(residual_base=final_base, initial_adapter=os.path.join(final, INITIAL_ADAPTER),
                           llamafactory=os.path.join(final, LLAMAFACTORY), axolotl=os.path.join(final, AXOLOTL),
                           trl_script=os.path.join(final, TRL_SCRIPT), r=int(cfg["r"]),
                           lora_alpha=float(cfg["lora_alpha"]), target_modules=list(cfg["target_modules"]))
    texts = {LLAMAFACTORY: llamafactory_yaml(art),
             AXOLOTL: axolotl_yaml(art, cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}),
             TRL_SCRIPT: trl_script(art)}
    for name, text in texts.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    return art


def save_for_trainers(peft_model, out_dir: str, tokenizer=None, *, adapter_name: str = "default",
                      final_dir: Optional[str] = None, overwrite: bool = False) -> TrainerArtifacts:
    """Write the residual base, the initial adapter and trainer configs (see the module docstring) into ``out_dir``.

    Call it right after :func:`corda_fast.init_adapters`, before any training (the adapter saved is the initial one).

    Args:
        peft_model: the ``peft.PeftModel`` returned by ``init_adapters``.
        out_dir: folder to write into (created if needed).
        tokenizer: saved into ``residual_base/`` so trainers find it beside the model (recommended).
        adapter_name: the adapter to save.
        final_dir: where ``out_dir`` will live when used, if it is to be moved after writing: paths inside the
            configs point there (default: ``out_dir``). Paths are absolute.
        overwrite: replace artifacts of an earlier call in ``out_dir``.
    """
    _check_out(out_dir, overwrite)
    if adapter_name not in getattr(peft_model, "peft_config", {}):
        raise ValueError(f"save_for_trainers: the model has no adapter {adapter_name!r} "
                         f"(has {sorted(getattr(peft_model, 'peft_config', {}))}).")
    final = os.path.abspath(final_dir or out_dir)
    os.makedirs(out_dir, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".corda_partial_", dir=out_dir)  # nothing in out_dir changes until all is written
    try:
        art = _write(peft_model, stage, final, tokenizer, adapter_name)
        for name in _WRITTEN:
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
            os.replace(os.path.join(stage, name), path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    logger.info("trainer artifacts in %s: %s", out_dir, ", ".join(_WRITTEN))
    return art
