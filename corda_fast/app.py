"""The jobs the command line runs — ``init`` (and ``demo``, ``init`` on SmolLM2 with built-in text) and ``env`` —
callable from tests and scripts. ``cli.py`` only parses; this module loads the model, calibrates, writes the outputs,
measures the drift at initialisation and renders what is printed.

An ``init`` job: check the output folder, open the data, load the model (optionally dispatched by accelerate, or
in a torchrun process group), :func:`corda_fast.init_adapters`, the drift of the returned model's logits on held-out
text, then residual base + initial adapter + trainer configs + ``corda_report.json`` written beside ``--out`` and
moved into place in one rename (the folder appears complete, or not at all).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from typing import Any, Optional

from . import demo

logger = logging.getLogger(__name__)


def run(args) -> Optional[str]:
    """Run the parsed command; returns the text to print (``None`` on a non-zero rank of a distributed job)."""
    if args.command == "env":
        return json.dumps(run_env(), indent=1)
    if args.command == "plan":
        return run_plan(args)
    if args.command in ("convert", "merge", "eval"):
        return {"convert": run_convert, "merge": run_merge, "eval": run_eval}[args.command](args)
    if args.command == "demo":
        args.model, args.gguf_file, args.data = "smollm2", None, "builtin"
    _check_out(args.out, args.overwrite)
    try:
        result, report = run_init(args)
    except BaseException:
        if os.environ.get("RANK", "0") == "0":  # never leave a half-written output behind
            shutil.rmtree(_work_dir(args.out), ignore_errors=True)
        raise
    finally:
        if getattr(args, "distributed", False):
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    return None if report is None else render(result, report)


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
        onload_device=args.onload_device, distributed=distributed,
        route_all_experts=bool(getattr(args, "route_all_experts", False)))
    return corda_fast.CordaConfig(mode=args.mode, precision=args.precision, calibration=calibration, plus=plus,
                                  residual_folder=args.residual_folder, show_progress=not args.quiet)


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


def _check_model(model: str) -> None:
    """A ``--model`` path that is missing or not a folder, named before anything is loaded."""
    if model == "smollm2":
        return
    if not os.path.exists(model):
        raise ValueError(f"--model '{model}' does not exist (a local transformers model folder, or one holding a "
                         ".gguf file; models are not downloaded).")
    if not os.path.isdir(model):
        raise ValueError(f"--model '{model}' is a file, not a folder: give the folder that holds it.")


def _calibration_data(args, tok, source, rank: int, world: int, device):
    """``(calibration batches of this rank, batch the drift at init is measured on, on device)``. The built-in text
    gives random windows and a held-out batch (the demo); any other source goes through
    :func:`corda_fast.calibration_batches`, and the drift is measured on its first two samples."""
    import corda_fast

    if args.data == "builtin":
        batches, held = demo.make_batches(tok, [demo.builtin_text()], False, args.samples, args.seq_len,
                                          args.batch_size, args.seed, shard=(rank, world))
        return batches, {k: v.to(device) for k, v in held.items()}
    image_column = getattr(args, "image_column", None)
    if image_column is None and hasattr(tok, "image_processor"):  # a VLM calibrated on text alone
        tok = tok.tokenizer
    batches = corda_fast.calibration_batches(
        source, tok, split=args.split, text_column=args.text_column, messages_column=args.messages_column,
        prompt_column=args.prompt_column, response_column=args.response_column, num_samples=args.samples,
        max_seq_length=args.seq_len, batch_size=args.batch_size, concatenate=args.concatenate, seed=args.seed,
        mask=None if args.mask == "none" else args.mask, image_column=image_column)
    first = batches[0]
    held = {k: first[k][:2].to(device) for k in ("input_ids", "attention_mask")}
    return batches[rank::world], held


def _load(args, device: str):
    """``(model, tokenizer, model folder, device inputs go to, seconds)``."""
    t0 = time.perf_counter()
    model_dir = demo.materialize_smollm2(args.cache_dir) if args.model == "smollm2" else args.model
    model, tok = demo.load_model(model_dir, args.gguf_file, args.dtype, **_dispatch_kwargs(args))
    if args.device_map is None:
        model.to(device)
    else:  # accelerate placed the model: inputs go where its forward starts
        from .offload import model_execution_device

        device = model_execution_device(model)
    return model, tok, model_dir, device, time.perf_counter() - t0


def _lora_spec(args, model):
    import corda_fast

    targets = args.target_modules
    params = getattr(args, "target_parameters", None)
    if targets is None and params:
        targets = []  # PEFT: target_parameters alone adapts no module
    elif targets is None:
        names = {n.split(".")[-1] for n, _ in model.named_modules()}
        targets = [t for t in demo.LLAMA_TARGETS if t in names] or "all-linear"
    return corda_fast.LoraSpec(r=args.rank, lora_alpha=args.lora_alpha, target_modules=targets, task_type="CAUSAL_LM",
                               target_parameters=params)


def run_init(args) -> tuple[dict, Any]:
    """The ``init`` job: ``(result dict written as corda_report.json, InitReport)``; ``({"quiet_rank": r}, None)``
    on a non-zero rank of a distributed job (rank 0 writes)."""
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
    _check_model(args.model)
    if rank == 0:
        _memory_check(args, device)
    source = None
    if args.data != "builtin":  # the data is found and opened before the model is loaded
        from .data import load_source

        source = load_source(args.data, args.split)
    model, tok, model_dir, device, t_load = _load(args, device)
    batches, held = _calibration_data(args, tok, source, rank, world, device)
    before, scale = demo.output_logits(model, held)
    peft_model, report = corda_fast.init_adapters(
        model, batches, lora_config=_lora_spec(args, model), corda_config=_corda_config(args, dist), return_report=True)
    after, _ = demo.output_logits(peft_model, held)
    drift = float((after - before)[held["attention_mask"].bool()].abs().max())
    if rank != 0:  # every rank holds the same model; one writes it
        return {"quiet_rank": rank}, None
    report.seconds = {"load_model": t_load, **report.seconds}
    job = {"model": model_dir, "rank": args.rank, "method": args.method, "world": world,
           "drift": drift, "scale": scale}
    return _write_outputs(args, peft_model, tok, report, job, work), report


# ---------------------------------------------------------------------------------------------------- memory plan
def _plan_for(args, device: str):
    """``(plan_memory for these flags, the mode init will run)``, or ``(None, None)`` without a config.json."""
    import corda_fast

    from .memory_plan import mode_of

    model, gguf = args.model, getattr(args, "gguf_file", None)
    if model == "smollm2":  # the demo: the packaged GGUF file's shapes (converted once on its first run)
        model, gguf = demo.smollm2_package_dir(), demo.SMOLLM2_GGUF
        if model is None:
            return None, None
    elif os.path.isdir(model) and gguf is None and not os.path.isfile(os.path.join(model, "config.json")) and not any(
            f.endswith(".gguf") for f in os.listdir(model)):
        return None, None
    dispatched = getattr(args, "device_map", None) is not None
    onload = getattr(args, "onload_device", None) is not None
    on_gpu = str(device).startswith("cuda") or onload or dispatched
    targets = args.target_modules
    if targets is None:
        targets = None if getattr(args, "target_parameters", None) is None else []
    plus = args.method == "corda++"
    plan = corda_fast.plan_memory(
        model, gguf_file=gguf, samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size, rank=args.rank,
        target_modules=targets, target_parameters=getattr(args, "target_parameters", None),
        route_all_experts=getattr(args, "route_all_experts", False), precision=args.precision, dtype=args.dtype,
        candidates=(args.candidates or corda_fast.PlusConfig().candidates) if plus else 1,
        max_memory=args.max_memory, host_memory=getattr(args, "host_memory", None),
        device_memory=getattr(args, "device_memory", None) if on_gpu else 0)
    mode = mode_of(args.streaming == "on", plus, onload, dispatched)
    if args.streaming == "auto":  # streams when the statistics may not fit: plan the streaming run where one pass won't
        streamed = mode_of(True, plus, onload, dispatched)
        if not plan.modes[mode].fits and plan.modes[streamed].available:
            mode = streamed
    return plan, mode


def _memory_check(args, device: str) -> None:
    """Print the planned peak of the mode these flags run; refuse one that does not fit unless
    ``--ignore-memory-plan``."""
    try:
        plan, mode = _plan_for(args, device)
    except Exception as exc:  # a config transformers cannot build on the meta device: plan nothing, say so
        logger.warning("memory plan: not available for '%s' (%s: %s)", args.model, type(exc).__name__, exc)
        return
    if plan is None:
        logger.info("memory plan: skipped ('%s' has neither a config.json nor a .gguf file)", args.model)
        return
    logger.info("%s", plan.line(mode))
    if not plan.modes[mode].available:  # init_adapters' own checks refuse it, with the same reason
        return
    if not plan.modes[mode].fits:
        others = [m for m, e in plan.modes.items() if e.fits]
        msg = (f"{plan.line(mode)}. Modes that fit: {others or 'none'} (python -m corda_fast plan --model ... shows "
               "them all).")
        if not getattr(args, "ignore_memory_plan", False):
            raise MemoryError(msg + " Pass --ignore-memory-plan to run anyway.")
        logger.warning("%s Going on (--ignore-memory-plan).", msg)


def run_plan(args) -> str:
    """The ``plan`` job: every mode's predicted peaks for ``init`` with the same flags (``--json``: as JSON)."""
    plan, mode = _plan_for(args, "cuda" if args.device in ("cuda", "auto") else args.device)
    if plan is None:
        raise ValueError(f"model '{args.model}' has neither a config.json nor a .gguf file to plan from.")
    if args.json:
        return json.dumps({**plan.to_dict(), "init_mode": mode}, indent=1)
    m = plan.modes[mode]
    verdict = ("fits." if m.fits else f"does NOT fit ({m.why_not}).") if m.available else \
        f"cannot run ({m.why_not})."
    return plan.table() + f"\n\ninit with these flags runs '{mode}': " + verdict


def _write_outputs(args, peft_model, tok, report, job: dict, work: str) -> dict:
    """Residual base (tokenizer included), initial adapter, trainer configs, CorDA++ table / plot and the JSON
    report into ``work``, then ``work`` becomes ``--out`` (the paths written inside already name ``--out``)."""
    import corda_fast

    t1 = time.perf_counter()
    os.makedirs(work, exist_ok=True)
    artifacts = corda_fast.save_for_trainers(peft_model, work, tok, final_dir=args.out)
    report.seconds["save"] = time.perf_counter() - t1
    result = _result(args, report, job)
    result["trainers"] = {"llamafactory": artifacts.llamafactory, "axolotl": artifacts.axolotl,
                          "trl_script": artifacts.trl_script, "usage": artifacts.usage()}
    if report.plus is not None:
        result["plus"].update(_write_plus(report.plus, work, args.out))
    with open(os.path.join(work, "corda_report.json"), "w") as f:
        json.dump(result, f, indent=1)
    if os.path.isdir(args.out):  # empty, or --overwrite (checked before any work)
        shutil.rmtree(args.out)
    os.replace(work, args.out)  # the folder appears complete, or not at all
    return result


def _write_plus(plan, work: str, out: str) -> dict:
    """The CorDA++ table (and plot, when matplotlib is there): ``{"table": path[, "plot": path]}`` under ``out``."""
    with open(os.path.join(work, "corda_plus.md"), "w", encoding="utf-8") as f:
        f.write(plan.table() + "\n")
    paths = {"table": os.path.join(out, "corda_plus.md")}
    try:
        plan.plot(os.path.join(work, "corda_plus.png"))
        paths["plot"] = os.path.join(out, "corda_plus.png")
    except ImportError as exc:
        logger.warning("no CorDA++ plot: %s", exc)
    return paths


def _result(args, report, job: dict) -> dict:
    """The JSON report of ``init`` / ``demo``: the job's own fields, then :meth:`InitReport.to_dict` (paths as they
    will be once ``work`` becomes ``--out``)."""
    result = {"model": job["model"], "method": job["method"], "rank": job["rank"], **report.to_dict()}
    result["calibration"].update(seq_len=args.seq_len, batch_size=args.batch_size, data=args.data, ranks=job["world"])
    result["drift_at_init"] = {"max_abs_logit_diff": job["drift"], "max_abs_logit": job["scale"],
                               "relative": job["drift"] / job["scale"]}
    result["residual_base_dir"] = os.path.abspath(os.path.join(args.out, "residual_base"))
    result["initial_adapter_dir"] = os.path.abspath(os.path.join(args.out, "initial_adapter"))
    return result


def render(result: dict, report) -> str:
    """What ``init`` / ``demo`` print: a header, the report (:meth:`InitReport.summary`, the one renderer of it),
    then the drift at initialisation and where everything was written."""
    c = result["calibration"]
    drift = result["drift_at_init"]
    lines = [f"{'CorDA++' if report.plus is not None else 'CorDA'}-{report.mode.upper()} on {result['model']} "
             f"(data: {c['data']}, seq_len {c['seq_len']}, batch {c['batch_size']}"
             + (f", {c['ranks']} ranks)" if c["ranks"] > 1 else ")")]
    lines += ["  " + line for line in report.summary().splitlines()]
    if result.get("plus"):
        p = result["plus"]
        lines.append(f"  CorDA++ table: {p['table']}" + (f", plot {p['plot']}" if p.get("plot") else ""))
    lines += [
        f"  drift @init : max|Δlogit| = {drift['max_abs_logit_diff']:.3g} ({drift['relative']:.2e} of max|logit| on "
        "held-out text)",
        f"  residual    : {result['residual_base_dir']}  (the base model, W_res in place of W; tokenizer included)",
        f"  adapter     : {result['initial_adapter_dir']}  (CorDA's A, B; base_model_name_or_path = the residual)",
        f"  report      : {os.path.join(os.path.dirname(result['initial_adapter_dir']), 'corda_report.json')}",
    ]
    if result.get("trainers"):
        lines.append("  train with  :")
        lines += [f"    {line}" for line in result["trainers"]["usage"]]
    return "\n".join(lines)


def run_convert(args) -> str:
    """The ``convert`` job: the converted adapter and ``convert_report.json`` in ``--out``; returns the table."""
    from . import convert

    report = convert.convert(args.initial_adapter, args.trained, args.out, rank=args.rank, energy=args.energy,
                             base_model=args.base_model, checkpoint=args.checkpoint)
    if args.drift_data is not None:  # the converted adapter against the trained model, on held-out text
        from transformers import AutoTokenizer

        import corda_fast

        tok = AutoTokenizer.from_pretrained(report["base_model_name_or_path"])
        batches = corda_fast.calibration_batches(args.drift_data, tok, num_samples=args.drift_samples,
                                                 max_seq_length=256, batch_size=4, shuffle=False)
        report["logit_drift"] = convert.logit_drift(report, batches)
        with open(os.path.join(args.out, "convert_report.json"), "w") as f:
            json.dump(report, f, indent=1)
    return convert.report_table(report)


def run_merge(args) -> str:
    """The ``merge`` job: the merged model in ``--out``; returns one line saying what was written."""
    from . import convert

    base, adapter = args.residual_base, args.adapter
    if args.from_dir is not None:
        base = base or os.path.join(args.from_dir, "residual_base")
        adapter = adapter or os.path.join(args.from_dir, "initial_adapter")
    if base is None or adapter is None:
        raise ValueError("merge needs --residual-base and --adapter (or --from, init's output folder).")
    out = convert.merge(base, adapter, args.out, checkpoint=args.checkpoint, max_shard_bytes=args.max_shard_size)
    return (f"merged {out['layers']} adapted layers into {len(out['shards'])} shard(s): {out['out']} "
            "(load it with from_pretrained)")


def run_eval(args) -> str:
    """The ``eval`` job: the report as JSON at ``--out`` (and a plot beside it); returns the table."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import corda_fast

    from . import evaluate

    _check_model(args.base)
    tok = AutoTokenizer.from_pretrained(args.base)
    common = dict(num_samples=args.samples, max_seq_length=args.seq_len, batch_size=args.batch_size, shuffle=False)
    knowledge = corda_fast.calibration_batches(args.knowledge, tok, concatenate=True, **common)
    task = corda_fast.calibration_batches(args.task, tok, mask=None if args.task_mask == "none" else args.task_mask,
                                          **common)
    base = AutoModelForCausalLM.from_pretrained(args.base).eval()
    trained = evaluate.load_trained(args.trained, args.adapter, args.base)
    report = evaluate.evaluate(base, trained, knowledge, task, k=args.top_k, threshold=args.threshold)
    report.update(base=os.path.abspath(args.base), trained=os.path.abspath(args.trained), adapter=args.adapter,
                  knowledge_source=args.knowledge, task_source=args.task)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    try:
        evaluate.plot(report, os.path.splitext(args.out)[0] + ".png")
    except ImportError as exc:
        logger.warning("no plot: %s", exc)
    return evaluate.report_table(report) + f"\nreport: {os.path.abspath(args.out)}"


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
