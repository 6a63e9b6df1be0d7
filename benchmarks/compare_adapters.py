"""Compare two saved adapters of the same model layer by layer on ``B·A`` (raw factors have arbitrary signs).

    python benchmarks/compare_adapters.py DIR_A DIR_B     # each a PEFT adapter directory (adapter_model.safetensors)

Prints the median and max over layers of ``max|B_a·A_a − B_b·A_b| / max|B_b·A_b|`` and the worst layer.
"""

import os
import statistics
import sys

from safetensors.torch import load_file


def compare(dir_a: str, dir_b: str) -> dict:
    a = load_file(os.path.join(dir_a, "adapter_model.safetensors"))
    b = load_file(os.path.join(dir_b, "adapter_model.safetensors"))
    if a.keys() != b.keys():
        raise SystemExit(f"the adapters hold different tensors ({len(a)} vs {len(b)})")
    errs = {}
    for k in a:
        if "lora_A" in k:
            kb = k.replace("lora_A", "lora_B")
            x, y = a[kb].double() @ a[k].double(), b[kb].double() @ b[k].double()
            errs[k.replace(".lora_A.weight", "")] = float((x - y).abs().max() / y.abs().max())
    worst = max(errs, key=errs.get)
    return {"layers": len(errs), "median": statistics.median(errs.values()), "max": errs[worst], "worst": worst}


if __name__ == "__main__":
    r = compare(sys.argv[1], sys.argv[2])
    print(f"{r['layers']} layers: B·A relative difference median {r['median']:.3g}, max {r['max']:.3g} ({r['worst']})")
