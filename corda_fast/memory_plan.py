"""How much memory each way of running CorDA needs, before anything is loaded: :func:`plan_memory`.

The model is built from its ``config.json`` on the meta device (no weight is read), the targets are resolved as
``init_adapters`` would, and the peaks are summed from the sizes the code allocates:

==========  =====================================================================================================
term        what it is
==========  =====================================================================================================
``P``       the model's weights (and buffers) in the load dtype
``P_t``     the targeted weights (their originals go to the build's spill: a file for a model in host memory, host
            memory for a model on a GPU)
``W_b``     the largest block's weights; ``W_l`` the largest targeted layer's
``S``       every statistic (one per distinct input: q/k/v share one, gate/up one), ``d_in²`` each in the statistics
            precision; ``S_b`` the largest block's; CorDA++ holds ``candidates`` of each
``A``       streaming's cached block inputs: ``tokens · hidden`` in the model dtype
``D``       the decomposition's workspace: per statistic the damping search (``8·d²``: a float32 copy and its
            Cholesky or LU factors, plus blocks of the inverse), then the damped float64 covariance (``8·d²``, later
            its Cholesky factor in the same storage) beside one layer's Gram matrix (built from blocks of ``W·C``)
            with its eigen-solver, times the statistics decomposed at once (one per CPU core on the host, one on a
            GPU): the model's largest in one pass, one block's (``D_b``) in the modes that decompose a block at a
            time; CorDA++'s scoring holds the eigenvalue solver's copy of the damped covariance too (``D⁺``,
            ``D⁺_b``)
``X``       one batch's activations: a block's (streaming) or the whole forward's with the logits (one pass)
``O``       the runtime's own overhead (PEFT wrapping, allocator slack, thread pools): measured on the host, see
            ``HOST_OVERHEAD``
==========  =====================================================================================================

Modes: ``one_pass`` ``P + max(S + X, S_D) + O`` (``S_D``: the statistics still held beside the jobs running, at its
highest over the decomposition — narrowest statistics first, each dropped once its job has its damped copy; at most
``S + D``); ``streaming`` ``P + S_b + A + max(X_b, D_b) + O``; ``plus`` (CorDA++ in one pass) ``P + c·S + max(X, D⁺)
+ O``, plus ``B`` with one candidate (the scored eigenvectors kept for the decomposition, ``Σ min(d, 4r)·min(d_in,
d_out)·8``); ``plus_streaming`` ``P + c·S_b + A + max(X_b, D⁺_b) + O``; ``onloading`` host ``P + A + O``, device
``W_b + S_b + max(X_b, D_b)``; ``disk_offload`` host ``M + F + S_b + A + W_b + D_b + O_d`` (``M`` the weights
accelerate places in host memory — its own ``infer_auto_device_map`` on the meta model, under the host budget —,
``W_b`` the block it onloads whole, ``F`` the checkpoint pages read through while offloaded blocks run, ``O_d`` its
slack), disk ``P − M − G`` read from the checkpoint plus the targeted weights accelerate left on disk in the
residual store — that is streaming over a dispatched model; ``disk_offload_one_pass`` (``M + F + W_b + max(S + X,
S_D) + O_d``), ``disk_offload_plus`` and ``disk_offload_plus_streaming`` put the other runs' terms beside ``M + F +
W_b + O_d`` the same way. A mode the targets cannot run in is not planned (``ModeEstimate.available``): the
streaming modes when the targets lie in two lists of blocks (a vision-language model's tower and language model),
CorDA++ and disk offload with expert parameters (``target_parameters``). With a GPU the in-memory modes put the
model there (their peak is then device memory; the spill ``P_t`` goes to host memory).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch

from .ops.linalg import _COLS, _LU_COLS, _ROWS
from .plus import KEEP_FACTOR

MODES = ("one_pass", "streaming", "onloading", "disk_offload", "plus", "plus_streaming", "disk_offload_one_pass",
         "disk_offload_plus", "disk_offload_plus_streaming")
# Inputs read by sibling layers of one module: one statistic for the family (the calibration shares them).
_SHARED_FAMILIES = ({"q_proj", "k_proj", "v_proj"}, {"query", "key", "value"}, {"gate_proj", "up_proj"},
                    {"w1", "w3"}, {"q", "k", "v"})
# Host memory the runtime adds on top of the terms (PEFT's wrapping, allocator slack, the forward's temporaries),
# as a share of the model's weights plus a constant (0 in the last fit): fitted on the CPU benchmark (docs/offload.md,
# "planner").
HOST_OVERHEAD = (0.06, 0)
# Checkpoint pages a disk-offloaded run keeps resident, as a share of the weights read from disk, and its own slack
# (accelerate's hooks keep no model-sized state): fitted the same way.
DISK_PAGE_SHARE = 0.06
DISK_OVERHEAD = 0


@dataclass
class ModeEstimate:
    """One mode's predicted peaks (bytes) and whether they fit the machine. A mode these targets cannot run in
    (``available`` false: streaming over a vision-language model's two lists of blocks, CorDA++ or disk offload with
    expert parameters) has no peaks (``None``), does not fit, and ``why_not`` says why."""

    host_peak_bytes: Optional[int]
    device_peak_bytes: Optional[int]
    disk_bytes: Optional[int]
    fits: bool
    terms: dict = field(default_factory=dict)
    why_not: str = ""
    available: bool = True


@dataclass
class MemoryPlan:
    """:func:`plan_memory`'s answer: the sizes it summed and each mode's estimate."""

    model: str
    dtype: str
    params_bytes: int
    targeted_bytes: int
    blocks: int
    block_bytes: int
    statistics_bytes: int
    block_statistics_bytes: int
    inputs_bytes: int
    decomposition_bytes: int
    host_available: Optional[int]
    device_available: Optional[int]
    disk_available: Optional[int]
    modes: dict = field(default_factory=dict)
    block_decomposition_bytes: int = 0  # the jobs at once within one block (the streaming modes' D)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["modes"] = {k: asdict(v) for k, v in self.modes.items()}
        return out

    def line(self, mode: str) -> str:
        """``streaming: host 1.2 GiB, device 0 B, disk 0.4 GiB — fits`` (what ``init`` prints before it starts)."""
        m = self.modes[mode]
        if not m.available:
            return f"memory plan, {mode}: not planned — {m.why_not}"
        return (f"memory plan, {mode}: host {gib(m.host_peak_bytes)}, device {gib(m.device_peak_bytes)}, disk "
                f"{gib(m.disk_bytes)} (available: host {gib(self.host_available)}, device {gib(self.device_available)}"
                f", disk {gib(self.disk_available)}) — " + ("fits" if m.fits else f"does NOT fit: {m.why_not}"))

    def table(self) -> str:
        rows = [f"{self.model}: {gib(self.params_bytes)} of weights ({self.dtype}), {self.blocks} blocks, targeted "
                f"{gib(self.targeted_bytes)}; statistics {gib(self.statistics_bytes)} in all, "
                f"{gib(self.block_statistics_bytes)} per block; cached block inputs {gib(self.inputs_bytes)}; "
                f"decomposition jobs at once {gib(self.decomposition_bytes)} ({gib(self.block_decomposition_bytes)} "
                f"within a block)",
                f"available: host {gib(self.host_available)}, device {gib(self.device_available)}, disk "
                f"{gib(self.disk_available)}", "",
                f"{'mode':27s} {'host peak':>12s} {'device peak':>12s} {'disk':>10s}  fits"]
        for name, m in self.modes.items():
            if not m.available:
                rows.append(f"{name:27s} {'-':>12s} {'-':>12s} {'-':>10s}  n/a: {m.why_not}")
                continue
            rows.append(f"{name:27s} {gib(m.host_peak_bytes):>12s} {gib(m.device_peak_bytes):>12s} "
                        f"{gib(m.disk_bytes):>10s}  {'yes' if m.fits else 'no: ' + m.why_not}")
        return "\n".join(rows)


def gib(n: Optional[int]) -> str:
    if n is None:
        return "?"
    if n < 2**30:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 2**30:.1f} GiB"


# ---------------------------------------------------------------------------------------------------- the model
def _meta_model(config: Any):
    """The model of ``config`` on the meta device (a causal LM, else an image-text-to-text model, else the base)."""
    import transformers

    with torch.device("meta"):
        for auto in ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModel"):
            try:
                return getattr(transformers, auto).from_config(config)
            except (ValueError, KeyError):
                continue
    raise ValueError(f"no transformers model class builds the config of type {type(config).__name__}.")


def _load_config(model: Union[str, dict, Any], gguf_file: Optional[str] = None):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model, getattr(model, "_name_or_path", "") or type(model).__name__
    if isinstance(model, dict):
        cfg = dict(model)
        kind = cfg.pop("model_type")
        return AutoConfig.for_model(kind, **cfg), kind
    path = os.fspath(model)
    if os.path.isdir(path):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if gguf_file is None and not os.path.isfile(os.path.join(path, "config.json")):
            if len(ggufs) != 1:  # as init loads it: config.json first, else the folder's one .gguf file
                raise ValueError(f"model folder '{path}' has no config.json and "
                                 + (f"several .gguf files {ggufs}: name one (--gguf-file)." if ggufs else
                                    "no .gguf file to read the shapes from."))
            gguf_file = ggufs[0]
        if gguf_file is not None:  # the shapes are in the file's metadata; its weights load dequantized
            if not os.path.isfile(os.path.join(path, gguf_file)):
                raise ValueError(f"gguf_file '{gguf_file}' is not in model folder '{path}' (it holds {ggufs}).")
            return AutoConfig.from_pretrained(path, gguf_file=gguf_file), os.path.join(path, gguf_file)
        return AutoConfig.from_pretrained(path), path
    if os.path.isfile(path):
        with open(path) as f:
            return _load_config(json.load(f))[0], path
    raise ValueError(f"model '{path}' is neither a model folder, a config.json, nor a config.")


def _statistic_key(t, route_all: bool = False) -> str:
    """The statistic ``t`` reads, as calibration keys it: sibling q/k/v (gate/up, ...) of one module share one; an
    expert (``corda_fast.experts``) has its own, except that with ``route_all_experts`` every expert's first
    projection reads the layer's whole input (one statistic for the parameter)."""
    if t.expert is not None:
        return f"{t.param_key}[all]" if route_all and t.role == "up" else t.name
    parent, _, leaf = t.name.rpartition(".")
    family = next((min(f) for f in _SHARED_FAMILIES if leaf in f), None)
    return f"{parent}.{family}:{t.d_in}" if family is not None else t.name


def _statistic_sizes(targets: list, route_all: bool = False) -> dict[str, int]:
    """``{statistic key: d_in}`` (:func:`_statistic_key`)."""
    return {_statistic_key(t, route_all): t.d_in for t in targets}


def _block_index(name: str, prefix: str) -> Optional[int]:
    if not name.startswith(prefix + "."):
        return None
    head = name[len(prefix) + 1:].split(".")[0]
    return int(head) if head.isdigit() else None


def _layer_work(d_out: int, d_in: int) -> int:
    """One layer's part of a decomposition (``decompose._group_factors``, ``ops.gram_matrix``): the Gram matrix beside
    one block of ``W·C_f`` (all of it up to ``_COLS`` columns when the Gram is ``M·Mᵀ``; ``_ROWS`` rows for ``MᵀM``)
    and a float64 row block of ``W``, then the Gram, its eigenvectors in its storage and the eigen-solver's workspace
    (``2n²``)."""
    n = min(d_out, d_in)
    w_rows = 8 * _ROWS * d_in
    block = 8 * d_out * (d_in if d_in <= _COLS else _COLS) if d_out <= d_in else 8 * _ROWS * d_in
    return max(8 * n * n + block + w_rows, 3 * 8 * n * n)


def _search(d: int) -> int:
    """The damping search on a ``d``-wide statistic (``ops.find_damping``): the float32 copy, its Cholesky (or, in the
    exact test, LU) factors, and the inverse — whole up to ``_LU_COLS`` columns (its product then takes the LU
    factors' storage), else one block of it beside one block of its product."""
    return 12 * d * d if d <= _LU_COLS else 8 * d * d + 2 * 4 * d * _LU_COLS


def _jobs(targets: list, plus: bool, route_all: bool = False) -> dict[str, int]:
    """``{statistic key: bytes one job on it holds at its peak}``: the damping search (:func:`_search`), then the
    damped float64 covariance (``8·d²``) beside its largest layer's work (CorDA++'s scoring: beside the eigenvalue
    solver's copy, ``8·d²``, too). The job's end adds nothing to ``8·d²`` but the kept vectors: the covariance is
    factored in its own storage and solved through without a copy (``ops.cholesky_in_place``,
    ``ops.cholesky_solve_lower``)."""
    layers: dict[str, list] = {}
    for t in targets:
        layers.setdefault(_statistic_key(t, route_all), []).append(t)
    out = {}
    for key, ts in layers.items():
        d = ts[0].d_in
        work = max(_layer_work(t.d_out, t.d_in) for t in ts)
        out[key] = max(_search(d), 8 * d * d + (max(work, 8 * d * d) if plus else work))
    return out


def _one_pass_decomposition(targets: list, parallel: int, prec: int, route_all: bool = False) -> int:
    """The statistics still held plus the jobs running, at its highest over one pass's decomposition: the jobs run
    narrowest statistic first (``decompose._decompose_torch``), ``parallel`` at once, and each drops its statistic
    once its damped copy is made. When job ``i`` starts, statistics ``i`` onwards are held beside jobs
    ``i − parallel + 1 … i``. At most ``S + D``: the widest jobs run once the narrow statistics are gone."""
    layers = _statistic_sizes(targets, route_all)
    jobs = _jobs(targets, False, route_all)
    order = sorted(layers, key=lambda k: layers[k])  # stable: target order among equal widths, as decompose
    held = sum(prec * d * d for d in layers.values())
    peak, p = 0, max(1, parallel)
    for i, key in enumerate(order):
        running = sum(jobs[k] for k in order[max(0, i - p + 1):i + 1])
        peak = max(peak, held + running)
        held -= prec * layers[key] * layers[key]
    return peak


def _decomposition(targets: list, parallel: int, prefix: Optional[str] = None, plus: bool = False,
                   route_all: bool = False) -> int:
    """``D``: the largest jobs' workspaces (:func:`_jobs`), as many as run at once (one per CPU core on the host, one
    on a GPU). With the blocks' ``prefix`` (streaming, onloading, disk offload: one block's statistics are decomposed
    at a time) the jobs at once are a block's: its largest ones, in the block where they sum highest."""
    if not targets:
        return 0
    jobs = _jobs(targets, plus, route_all)
    groups: dict = {}
    for key, cost in jobs.items():
        groups.setdefault(_block_index(key, prefix) if prefix is not None else None, []).append(cost)
    return max(sum(sorted(costs, reverse=True)[:max(1, parallel)]) for costs in groups.values())


@dataclass
class _Sizes:
    P: int
    P_t: int
    L: int
    W_b: int
    W_l: int
    S: int
    S_b: int
    A: int
    D: int
    D_plus: int  # CorDA++'s scoring jobs, the largest ones at once
    D_b: int  # D and D_plus within one block (the streaming modes)
    D_plus_b: int
    X: int
    X_b: int
    SD: int  # one pass's decomposition: the statistics still held beside the jobs running, at its highest
    B: int  # CorDA++ with one candidate, in one pass: every layer's scored eigenvectors, kept for the decomposition
    no_blocks: str = ""  # why the targets are not in one list of blocks (the streaming modes cannot run), or ""


def _sizes(model, targets: list, *, elt: int, prec: int, tokens: int, batch_tokens: int, parallel: int,
           route_all: bool = False) -> _Sizes:
    from .calibrate import CalibrationError
    from .streaming import find_blocks

    P = sum(p.numel() * elt for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    P_t = sum(t.d_in * t.d_out * elt for t in targets)
    W_l = max((t.d_in * t.d_out * elt for t in targets), default=0)
    try:
        prefix, blocks = find_blocks(model, targets)
        no_blocks = ""
    except CalibrationError as exc:  # e.g. a vision tower's and a language model's blocks: nothing to stream
        msg = str(exc)  # the table's line: where streaming walks and that some targets lie outside it
        head = msg.split(";")[0]
        prefix, blocks, no_blocks = None, [], msg if head == msg else (
            f"{head}, and some targets lie outside it: stream one list's targets alone, or calibrate in one pass")
    W_b = max((sum(p.numel() for p in b.parameters()) * elt for b in blocks), default=0)
    stats = _statistic_sizes(targets, route_all)
    per_block: dict = {}
    for key, d in stats.items():
        per_block.setdefault(_block_index(key, prefix) if prefix is not None else None, []).append(d)
    S = sum(d * d * prec for d in stats.values())
    S_b = max((sum(d * d * prec for d in ds) for ds in per_block.values()), default=0) if prefix is not None else 0
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(getattr(cfg, "hidden_size", 0) or max((t.d_in for t in targets), default=0))
    inter = int(getattr(cfg, "intermediate_size", 0) or 4 * hidden)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    A = tokens * hidden * elt
    X_b = batch_tokens * (4 * hidden + 3 * inter) * elt
    X = X_b + batch_tokens * vocab * 4 + 2 * batch_tokens * hidden * 4
    D = _decomposition(targets, parallel, route_all=route_all)
    D_plus = _decomposition(targets, parallel, plus=True, route_all=route_all)
    D_b = _decomposition(targets, parallel, prefix, route_all=route_all) if prefix is not None else 0
    D_plus_b = _decomposition(targets, parallel, prefix, plus=True, route_all=route_all) if prefix is not None else 0
    SD = _one_pass_decomposition(targets, parallel, prec, route_all)
    B = sum(min(t.d_in, t.d_out, KEEP_FACTOR * t.rank) * min(t.d_in, t.d_out) * 8 for t in targets)
    return _Sizes(P, P_t, len(blocks), W_b, W_l, S, S_b, A, D, D_plus, D_b, D_plus_b, X, X_b, SD, B, no_blocks)


# ---------------------------------------------------------------------------------------------------- the machine
def host_available() -> Optional[int]:
    """Memory the host can give now (``MemAvailable``), or ``None`` where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_available() -> Optional[int]:
    """Free memory of the current CUDA device, or ``None`` without one."""
    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    return None


_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "tb": 10**12, "b": 1}


def parse_size(value) -> int:
    """Bytes from an int, or a string like ``2GB`` / ``500MiB`` / ``64 GiB`` (KB, MB, GB, TB are powers of 1000;
    KiB ... TiB of 1024) or a plain number of bytes (accelerate's ``max_memory`` values, the CLI's sizes)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    t = str(value).strip().lower().replace(" ", "")
    number = next((t[: -len(u)] for u in _UNITS if t.endswith(u)), t)
    factor = next((f for u, f in _UNITS.items() if t.endswith(u)), 1)
    if not number.replace(".", "", 1).isdigit():
        raise ValueError(f"{value!r}: expected a size, e.g. 2GB, 500MiB or a number of bytes")
    return int(float(number) * factor)


# ---------------------------------------------------------------------------------------------------- the plan
def plan_memory(model: Union[str, dict, Any], *, samples: int = 256, seq_len: int = 2048, batch_size: int = 8,
                rank: int = 8, target_modules: Union[None, str, list] = None,
                target_parameters: Optional[list] = None, route_all_experts: bool = False, precision: str = "float32",
                dtype: Optional[str] = None, candidates: int = 1, max_memory: Optional[dict] = None,
                host_memory: Optional[int] = None, device_memory: Optional[int] = None,
                disk_memory: Optional[int] = None, threads: Optional[int] = None,
                gguf_file: Optional[str] = None) -> MemoryPlan:
    """Predicted peak host memory, device memory and disk of each mode, from the model's config alone.

    Args:
        model: a model folder (its ``config.json``, else its one ``.gguf`` file's metadata), a ``config.json``
            path, a transformers config, or a dict with ``model_type``.
        samples, seq_len, batch_size: the calibration (``samples · seq_len`` tokens).
        rank, target_modules: as ``init_adapters`` (default targets: every linear layer but the head).
        target_parameters, route_all_experts: routed experts stored as 3-D parameters (``LoraConfig``'s and
            ``CalibrationConfig``'s options): one statistic and decomposition per expert, or with
            ``route_all_experts`` one statistic for all experts' first projection.
        precision: the statistics' precision; dtype: the load dtype (default: the config's, else float32).
        candidates: CorDA++'s candidate statistics per layer (the ``plus`` modes).
        max_memory: accelerate's limits for ``disk_offload`` (``{"cpu": "64GiB", 0: "20GiB"}``; default: host a
            quarter of the weights, no GPU share).
        host_memory, device_memory, disk_memory: what is available (default: found on this machine; no device
            when no GPU is found).
        threads: statistics decomposed at once on the host (default ``torch.get_num_threads()``).
        gguf_file: the ``.gguf`` file of ``model``'s folder to read the shapes from (init's ``--gguf-file``); its
            weights count in ``dtype`` (they load dequantized).
    Returns:
        :class:`MemoryPlan`; ``.table()`` for people, ``.to_dict()`` for programs.
    """
    from .config import LoraSpec
    from .targets import resolve_targets

    config, name = _load_config(model, gguf_file)
    dtype = dtype or str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    dtype = dtype.replace("torch.", "")
    elt = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    prec = 8 if precision == "float64" else 4
    meta = _meta_model(config)
    targets = resolve_targets(meta, LoraSpec(r=rank, target_modules=target_modules,
                                             target_parameters=target_parameters or None))
    device = device_memory if device_memory is not None else device_available()
    on_gpu = bool(device)
    parallel = 1 if on_gpu else (threads or torch.get_num_threads())
    z = _sizes(meta, targets, elt=elt, prec=prec, tokens=samples * seq_len, batch_tokens=batch_size * seq_len,
               parallel=parallel, route_all=route_all_experts)
    host = host_memory if host_memory is not None else host_available()
    disk = disk_memory if disk_memory is not None else _disk_free()
    plan = MemoryPlan(name if isinstance(name, str) else str(name), dtype, z.P, z.P_t, z.L, z.W_b, z.S, z.S_b, z.A,
                      z.D, host, device, disk, block_decomposition_bytes=z.D_b)
    plan.modes = _modes(z, candidates, on_gpu, max_memory, host, device, disk,
                        _unavailable(z, any(t.expert is not None for t in targets)),
                        _placement(meta, targets, max_memory, z.P, dtype, elt))
    return plan


def _unavailable(z: _Sizes, expert_targets: bool) -> dict[str, str]:
    """``{mode: why}`` for the modes these targets cannot run in (``init_adapters`` refuses them the same way)."""
    out = {}
    if z.no_blocks:
        out.update({m: z.no_blocks for m in MODES if m.endswith("streaming") or m in ("onloading", "disk_offload")})
    if expert_targets:
        plus = "CorDA++ is refused with target_parameters (a rank per expert; PEFT's ParamWrapper holds one)"
        out.update({m: plus for m in MODES if "plus" in m})
        out.update({m: "expert parameters in a model accelerate dispatched are refused (their residuals are not "
                       "written through offload hooks): stream or onload instead"
                    for m in MODES if m.startswith("disk_offload") and "plus" not in m})
    return out


def _placement(meta, targets: list, max_memory: Optional[dict], P: int, dtype: str, elt: int) -> Optional[tuple]:
    """``(M, G, P_t on disk)``: the bytes accelerate's ``device_map="auto"`` puts in host memory and on the GPUs
    under ``max_memory`` (host default: a quarter of the weights) and the targeted weights it leaves on disk —
    accelerate's own ``infer_auto_device_map`` on the meta model, whole modules as it places them (a budget is an
    upper bound: a module that does not fit goes to the next device). ``None`` where accelerate cannot say."""
    try:
        from accelerate import infer_auto_device_map

        budget = {("cpu" if str(k) == "cpu" else int(k)): parse_size(v) for k, v in (max_memory or {}).items()}
        budget.setdefault("cpu", P // 4)
        device_map = infer_auto_device_map(meta, max_memory=budget, dtype=getattr(torch, dtype),
                                           no_split_module_classes=getattr(meta, "_no_split_modules", None) or [])
    except Exception:  # an architecture accelerate cannot map: the budgets are the estimate
        return None

    def where(name: str):
        parts = name.split(".")
        for i in range(len(parts), -1, -1):
            prefix = ".".join(parts[:i])
            if prefix in device_map:
                return device_map[prefix]
        return "disk"

    on: dict = {}
    seen = set()
    for name, p in meta.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            dev = where(name)
            on[dev] = on.get(dev, 0) + p.numel() * elt
    gpus = sum(v for k, v in on.items() if isinstance(k, int))
    targeted_on_disk = sum(t.d_in * t.d_out * elt for t in targets if where(t.param_key) == "disk")
    return on.get("cpu", 0), gpus, targeted_on_disk


def _overhead(P: int) -> int:
    return int(HOST_OVERHEAD[0] * P + HOST_OVERHEAD[1])


def _modes(z: _Sizes, c: int, on_gpu: bool, max_memory: Optional[dict], host, device, disk,
           unavailable: Optional[dict] = None, placement: Optional[tuple] = None) -> dict:
    O = _overhead(z.P)
    in_memory = {
        "one_pass": z.P + max(z.S + z.X, z.SD),
        "streaming": z.P + z.S_b + z.A + max(z.X_b, z.D_b),
        "plus": z.P + c * z.S + (z.B if c == 1 else 0) + max(z.X, z.D_plus),
        "plus_streaming": z.P + c * z.S_b + z.A + max(z.X_b, z.D_plus_b),
    }
    out = {}
    for mode, peak in in_memory.items():
        if on_gpu:  # the model on the device; the spill (originals) in host memory
            out[mode] = (O + z.P_t, peak, 0)
        else:  # the model in host memory; the spill on disk
            out[mode] = (peak + O, 0, z.P_t)
    out["onloading"] = (z.P + z.A + O, z.W_b + z.S_b + max(z.X_b, z.D_b), 0) if on_gpu else \
        (z.P + z.A + z.S_b + max(z.X_b, z.D_b) + O, 0, z.P_t)
    if placement is not None:  # where accelerate will put each module
        M, G, residuals = placement
        from_disk = max(0, z.P - M - G)
    else:  # the budgets, filled
        mm = {str(k): parse_size(v) for k, v in (max_memory or {}).items()}
        M = min(mm.get("cpu", z.P // 4), z.P)
        G = sum(v for k, v in mm.items() if k.isdigit())
        from_disk = max(0, z.P - M - G)
        residuals = int(z.P_t * from_disk / z.P) if z.P else 0
    F = int(DISK_PAGE_SHARE * from_disk)
    # a dispatched model: each run's own statistics and decomposition beside the onloaded weights of one block (the
    # module accelerate moves whole; one layer's where the targets are in no list of blocks)
    onloaded = max(z.W_b, z.W_l)
    work = {"disk_offload": z.S_b + z.A + z.D_b,
            "disk_offload_one_pass": max(z.S + z.X, z.SD),
            "disk_offload_plus": c * z.S + (z.B if c == 1 else 0) + max(z.X, z.D_plus),
            "disk_offload_plus_streaming": c * z.S_b + z.A + z.D_plus_b}
    for mode, w in work.items():
        streams = mode in ("disk_offload", "disk_offload_plus_streaming")
        if on_gpu and G:
            out[mode] = (M + F + DISK_OVERHEAD, G + onloaded + w + (z.X_b if streams else 0), residuals)
        else:
            out[mode] = (M + F + onloaded + w + DISK_OVERHEAD, 0, residuals)
    estimates = {}
    for mode in MODES:
        if mode in (unavailable or {}):
            estimates[mode] = ModeEstimate(None, None, None, False, {"O": O}, unavailable[mode], available=False)
            continue
        h, d, k = (int(x) for x in out[mode])
        why = []
        if host is not None and h > host:
            why.append(f"host needs {gib(h)} of {gib(host)}")
        if d and (device is None or d > device):
            why.append(f"device needs {gib(d)} of {gib(device)}")
        if disk is not None and k > disk:
            why.append(f"disk needs {gib(k)} of {gib(disk)}")
        terms = {"O": O, **({"M": M, "G": G, "F": F} if mode.startswith("disk_offload") else {})}
        estimates[mode] = ModeEstimate(h, d, k, not why, terms, "; ".join(why))
    return estimates


def _disk_free() -> Optional[int]:
    import shutil
    import tempfile

    try:
        return int(shutil.disk_usage(tempfile.gettempdir()).free)
    except OSError:
        return None


def mode_of(streaming: Any, plus: bool, onload: bool, dispatched: bool) -> str:
    """The :data:`MODES` entry a run with these settings uses."""
    if dispatched:  # accelerate's device_map: calibrated block by block (streaming) or in one pass through its hooks
        if plus:
            return "disk_offload_plus_streaming" if streaming is True else "disk_offload_plus"
        return "disk_offload" if streaming is True else "disk_offload_one_pass"
    if onload:
        return "onloading"
    if plus:
        return "plus_streaming" if streaming is True else "plus"
    return "streaming" if streaming is True else "one_pass"
