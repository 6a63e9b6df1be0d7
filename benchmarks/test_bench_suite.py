"""pytest-benchmark suite: each op and the end-to-end initialisation side by side with PEFT's ways of doing it.

Smoke mode (default, what CI runs with ``--benchmark-disable``: every case once, tiny shapes, seconds) checks the
suite still runs. Full mode times realistic CPU shapes (SmolLM2-135M-sized layers, a 4-block random Llama):

    CORDA_FAST_BENCH=full python -m pytest benchmarks/test_bench_suite.py --benchmark-enable \\
        --benchmark-json benchmarks/results/suite_cpu.json
    python benchmarks/report.py            # README table + benchmarks/results/suite_cpu.png

Groups (``benchmark.group``), each with a baseline the ratios are taken against: ``xtx`` (statistic accumulation:
triangle vs full GEMM), ``damping`` (native batch vs torch loop), ``decompose`` (native batch vs torch loop vs the
PEFT-style loop), ``allocate`` (CorDA++ heap allocation), ``init`` (corda_fast vs PEFT CorDA / LoRA / PiSSA
initialisation of a whole model), ``train_step`` (one optimizer step of the resulting PEFT models). Every row's
``extra_info`` records the shapes and the environment (device, versions, commit).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

import corda_fast  # noqa: E402
from corda_fast import ops  # noqa: E402
from corda_fast.ops import decompose_layer, find_damping  # noqa: E402

HAVE_NATIVE = ops.available()["native"]

FULL = os.environ.get("CORDA_FAST_BENCH") == "full"
D = 1536 if FULL else 48
LAYER_SHAPES = [(576, 576), (1536, 576), (576, 1536)] if FULL else [(24, 24), (40, 24), (24, 40)]
PER_SHAPE = 4 if FULL else 2
RANK = 16 if FULL else 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_ENV = {}


@pytest.fixture
def bench(benchmark):
    if not _ENV:
        from common import environment

        _ENV.update(environment())
    benchmark.extra_info.update({"mode": "full" if FULL else "smoke", "extension": ops.extension_status(), **_ENV})
    return benchmark


def spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * d, d, generator=g) * torch.logspace(0, -3, d)
    return x.T @ x / (2 * d)


# ------------------------------------------------------------------------------------------------------ ops
@pytest.mark.parametrize("variant", ["full_addmm", "triangle"])
def test_xtx(bench, variant):
    bench.group = "xtx"
    bench.extra_info.update(shape=[2048, D], baseline="full_addmm")
    x = torch.randn(2048, D)
    scale = torch.rand(2048)
    acc = torch.zeros(D, D)
    if variant == "triangle":
        bench(ops.xtx_accumulate, acc, x, scale, "torch")
    else:
        bench(lambda: acc.addmm_((x * scale[:, None]).T, x * scale[:, None]))
    assert torch.isfinite(acc).all() and bool((acc.diagonal() > 0).all())  # the timed code accumulated


@pytest.mark.parametrize("variant", ["torch_loop", "native_batch"])
def test_damping(bench, variant):
    if variant == "native_batch" and not HAVE_NATIVE:
        pytest.skip("native extension not built")
    bench.group = "damping"
    d = LAYER_SHAPES[0][1]
    covs = torch.stack([spd(d, s) for s in range(3 * PER_SHAPE)]).double()
    bench.extra_info.update(shape=list(covs.shape), baseline="torch_loop")
    probes = torch.randn(d, 16, generator=torch.Generator().manual_seed(0))
    if variant == "native_batch":
        lam = bench(lambda: ops.damped_cholesky(covs, probes, 0.01, 0.05, 40, kernel="native")[2])
        assert lam.tolist() == [find_damping(c) for c in covs]
    else:
        bench(lambda: [torch.linalg.cholesky(c + torch.eye(d, dtype=c.dtype) * c.diagonal().mean() * find_damping(c))
                       for c in covs])


def _layers():
    out = []
    for i, (d_out, d_in) in enumerate(LAYER_SHAPES):
        for j in range(PER_SHAPE):
            c = spd(d_in, 10 * i + j).double()
            cf = c + torch.eye(d_in, dtype=torch.float64) * c.diagonal().mean() * 0.01
            out.append((torch.randn(d_out, d_in, dtype=torch.float64) / d_in ** 0.5, cf, torch.linalg.cholesky(cf)))
    return out


@pytest.mark.parametrize("variant", ["peft_loop", "torch_loop", "native_batch"])
@pytest.mark.slow
def test_decompose(bench, variant):
    if variant == "native_batch" and not HAVE_NATIVE:
        pytest.skip("native extension not built")
    bench.group = "decompose"
    layers = _layers()
    bench.extra_info.update(shapes=[list(s) for s in LAYER_SHAPES], per_shape=PER_SHAPE, rank=RANK, mode="kpm",
                            baseline="peft_loop")

    def peft_loop():  # PEFT's arithmetic: float32, explicit inverse, full SVD, full V̂
        out = []
        for w, cf, _ in layers:
            cf32 = cf.float()
            inv = torch.linalg.inv(cf32)
            u, s, vh = torch.linalg.svd(w.float() @ cf32, full_matrices=False)
            out.append((vh @ inv).T[:, -RANK:])
        return out

    def torch_loop():
        return [decompose_layer(w, chol, cf, RANK, "kpm", 1.0, "gram")[0] for w, cf, chol in layers]

    def native_batch():
        groups, out = {}, []
        for w, cf, chol in layers:
            groups.setdefault(tuple(w.shape), []).append((w, cf, chol))
        for items in groups.values():
            w, cf, chol = (torch.stack(t) for t in zip(*items))
            a = ops.batched_decompose(w, cf, chol, torch.ones(len(items), dtype=torch.float64), RANK, False, "gram",
                                      kernel="native")[0]
            out.extend(a.unbind(0))
        return out

    factors = bench({"peft_loop": peft_loop, "torch_loop": torch_loop, "native_batch": native_batch}[variant])
    # one (r-column) factor per layer, finite: the timed code did the work
    assert len(factors) == len(layers) and all(RANK in f.shape and torch.isfinite(f).all() for f in factors)


def test_allocate(bench):
    from corda_fast.plus import LayerSpectrum, allocate_ranks

    bench.group = "allocate"
    n_layers, n = (224, 1024) if FULL else (20, 32)
    g = torch.Generator().manual_seed(0)
    layers = [LayerSpectrum(f"l{i}", torch.sort(torch.rand(n, generator=g, dtype=torch.float64), descending=True).values,
                            1.0 + i % 5, n, n) for i in range(n_layers)]
    budget = sum(2 * n * 16 for _ in layers)
    bench.extra_info.update(layers=n_layers, spectrum=n, budget=budget, baseline="allocate")
    ranks = bench(allocate_ranks, layers, budget)
    assert sum(2 * n * r for r in ranks.values()) <= budget


# ------------------------------------------------------------------------------------------------------ end to end
def _model():
    from helpers import tiny_llama

    return tiny_llama(hidden=256 if FULL else 64, layers=4 if FULL else 2, vocab=1000)


def _batches(n, seq):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 1000, (1, seq), generator=g) for _ in range(n)]


N_SAMPLES, SEQ = (32, 128) if FULL else (4, 16)


def _init(variant, model, batches):
    from peft import LoraConfig, get_peft_model

    if variant == "corda_fast":
        return corda_fast.init_adapters(model, [torch.cat(batches)], mode="kpm", rank=RANK, target_modules=TARGETS,
                                        corda_config=corda_fast.CordaConfig(show_progress=False))
    if variant == "peft_corda":
        from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights="corda",
                         corda_config=PeftCordaConfig(corda_method="kpm"))

        def run_model():
            for b in batches:
                model(input_ids=b)

        preprocess_corda(model, cfg, run_model=run_model)
        return get_peft_model(model, cfg)
    init = True if variant == "peft_lora" else "pissa_niter_4"
    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights=init))


@pytest.mark.parametrize("variant", ["peft_corda", "corda_fast", "peft_lora", "peft_pissa"])
@pytest.mark.slow
def test_init(bench, variant):
    bench.group = "init"
    base = _model()
    batches = _batches(N_SAMPLES, SEQ)
    bench.extra_info.update(model="random llama", samples=N_SAMPLES, seq_len=SEQ, rank=RANK, baseline="peft_corda")
    out = bench.pedantic(_init, setup=lambda: ((variant, copy.deepcopy(base), batches), {}),
                         rounds=3 if FULL else 1, iterations=1)
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():  # every initialisation leaves the model's function unchanged
        assert torch.allclose(out(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["peft_lora", "corda_fast", "corda_fast_fused"])
@pytest.mark.slow
def test_train_step(bench, variant):
    bench.group = "train_step"
    model = _init(variant.replace("_fused", ""), _model(), _batches(N_SAMPLES, SEQ))
    if variant.endswith("_fused"):
        corda_fast.fuse(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 1000, (4, SEQ))
    bench.extra_info.update(batch=list(ids.shape), rank=RANK, baseline="peft_lora")

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()

    assert torch.isfinite(torch.tensor(bench(step)))
