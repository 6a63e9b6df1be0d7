"""Bit-identity across a refactor: the adapters (A, B and the base weight of every adapted layer) of 24 fixed
configurations, with the configuration API of the checkout on PYTHONPATH (the flat one before 0.2, the nested one
since), saved for comparison with ``--compare``.

    git worktree add /tmp/old 386906d
    PYTHONPATH=/tmp/old:/tmp/old/tests python benchmarks/capture_adapters.py /tmp/old.pt
    PYTHONPATH=.:tests python benchmarks/capture_adapters.py /tmp/new.pt
    PYTHONPATH=.:tests python benchmarks/capture_adapters.py --compare /tmp/old.pt /tmp/new.pt  # "... 0 differ"
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
import torch

import corda_fast

from helpers import padded_batches, random_samples, tiny_bert, tiny_gpt2, tiny_llama

NEW = hasattr(corda_fast, "PlusConfig")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

def call(model, batches, cfg):
    cfg = dict(cfg)
    if not NEW:
        return corda_fast.init_adapters(model, batches, show_progress=False, **cfg)
    from corda_fast import CordaConfig, PlusConfig
    kw = {}
    for k in ("mode", "rank", "lora_alpha", "target_modules", "streaming", "covariance_cache"):
        if k in cfg:
            kw[k] = cfg.pop(k)
    corda = {"show_progress": False}
    if cfg.pop("method", "corda") == "corda++":
        plus = {}
        for k in ("candidates", "budget", "min_rank", "max_rank"):
            if k in cfg:
                plus[k] = cfg.pop(k)
        corda["plus"] = PlusConfig(**plus)
    if "decompose_precision" in cfg:
        corda["precision"] = cfg.pop("decompose_precision")
        cfg.pop("covariance_precision", None)
    for k in ("svd_method", "normalization"):
        if k in cfg:
            corda[k] = cfg.pop(k)
    lora = {}
    for k in ("rank_pattern", "use_rslora"):
        if k in cfg:
            lora[k] = cfg.pop(k)
    assert not cfg, cfg
    if lora:
        from peft import LoraConfig
        lora = LoraConfig(r=kw.pop("rank"), lora_alpha=kw.pop("lora_alpha"), target_modules=kw.pop("target_modules"), **lora)
        return corda_fast.init_adapters(model, batches, lora_config=lora, corda_config=CordaConfig(**corda), **kw)
    return corda_fast.init_adapters(model, batches, corda_config=CordaConfig(**corda), **kw)

def grab(pm):
    out = {}
    for n, m in pm.base_model.model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            out[n] = (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone(),
                      m.get_base_layer().weight.detach().clone())
    return out

CASES = {}
for seed in (0, 1, 2):
    for mode in ("kpm", "ipm"):
        for svd in ("gram", "svd"):
            CASES[f"parity_{mode}_{seed}_{svd}"] = ("llama", seed, 5, dict(mode=mode, rank=8, lora_alpha=16,
                                                                           target_modules=TARGETS, svd_method=svd))
        CASES[f"parity64_{mode}_{seed}"] = ("llama", seed, 5, dict(mode=mode, rank=8, lora_alpha=16, target_modules=TARGETS,
                                                     covariance_precision="float64", decompose_precision="float64"))
CASES["gpt2_kpm"] = ("gpt2", 0, 4, dict(mode="kpm", rank=4))
CASES["bert_ipm_absmax"] = ("bert", 0, 4, dict(mode="ipm", rank=4, normalization="absmax"))
CASES["llama_plus_kpm"] = ("llama", 0, 2, dict(mode="kpm", rank=6, method="corda++", candidates=3))
CASES["llama_plus_ipm_budget"] = ("llama", 1, 2, dict(mode="ipm", rank=6, method="corda++", candidates=2,
                                                      budget=30000, min_rank=2))
CASES["llama_stream"] = ("llama", 0, 3, dict(mode="kpm", rank=4, streaming=True))
CASES["llama_pattern_rslora"] = ("llama", 0, 3, dict(mode="ipm", rank=4, lora_alpha=8, target_modules=TARGETS,
                                                     rank_pattern={"q_proj": 6}, use_rslora=True))

def compare(old_path, new_path):
    old, new = torch.load(old_path), torch.load(new_path)
    assert old.keys() == new.keys(), old.keys() ^ new.keys()
    n = bad = 0
    for case in old:
        for layer, ts in old[case].items():
            for what, a, b in zip("ABW", ts, new[case][layer]):
                n += 1
                if not (a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)):
                    bad += 1
                    print("DIFF", case, layer, what)
    print(f"{len(old)} cases, {n} tensors compared, {bad} differ")


if sys.argv[1] == "--compare":
    compare(sys.argv[2], sys.argv[3])
    sys.exit(0)
res = {}
for name, (arch, seed, bs, cfg) in CASES.items():
    model = {"llama": lambda: tiny_llama(hidden=128, layers=2, seed=seed), "gpt2": lambda: tiny_gpt2(seed),
             "bert": lambda: tiny_bert(seed)}[arch]()
    samples = random_samples(12, lo=6, hi=48, seed=10 + seed)
    batches = padded_batches(samples, bs, side="left")
    if arch == "bert":
        for b in batches:
            b.pop("labels")
    torch.manual_seed(0)
    res[name] = grab(call(model, batches, cfg))
torch.save(res, sys.argv[1])
print("captured", len(res), "cases", "new" if NEW else "old")
