"""PEFT's own CorDA example, run by corda_fast.

The flow below is PEFT's documented one (`preprocess_corda` with a `run_model` callable, then `get_peft_model`).
`--how patch` adds one line, `corda_fast.patch_peft()`, so PEFT's `preprocess_corda` runs corda_fast's
implementation; `--how direct` imports `preprocess_corda` from corda_fast instead; `--how peft` runs PEFT's own for
comparison. Prints the time and the model's output drift at initialisation.

    python examples/peft_dropin.py --how patch
    python examples/peft_dropin.py --how peft        # PEFT's implementation, same flow
"""

import time

import torch

from _common import load, parser, targets, texts

args_p = parser(__doc__)
args_p.add_argument("--how", choices=["patch", "direct", "peft"], default="patch")
args_p.add_argument("--mode", choices=["kpm", "ipm"], default="ipm")
args = args_p.parse_args()

model, tokenizer = load(args.model)
sampled_dataset = [tokenizer(t, return_tensors="pt", truncation=True, max_length=args.seq_len)["input_ids"]
                   for t in texts(args.samples)]
probe = sampled_dataset[0]
with torch.no_grad():
    before = model(probe).logits

if args.how == "patch":
    import corda_fast

    corda_fast.patch_peft()  # the one added line: PEFT's preprocess_corda now runs corda_fast's

# ---- PEFT's documented CorDA flow, unchanged ----
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.config import CordaConfig  # noqa: E402

if args.how == "direct":
    from corda_fast import preprocess_corda
else:
    from peft.tuners.lora.corda import preprocess_corda


@torch.no_grad()
def run_model():
    for input_ids in sampled_dataset:
        model(input_ids.to(model.device))


corda_config = CordaConfig(corda_method=args.mode)
lora_config = LoraConfig(init_lora_weights="corda", corda_config=corda_config, r=args.rank, lora_alpha=args.rank,
                         target_modules=targets(model))
t0 = time.perf_counter()
preprocess_corda(model, lora_config, run_model=run_model)
peft_model = get_peft_model(model, lora_config)
seconds = time.perf_counter() - t0
# ---- end of PEFT's flow ----

with torch.no_grad():
    after = peft_model(probe).logits
drift = float((after - before).abs().max() / before.abs().max())
print(f"{args.how}: CorDA-{args.mode.upper()} r={args.rank} on {len(sampled_dataset)} samples: {seconds:.1f} s; "
      f"output drift at init {drift:.1e} of max|logit|; "
      f"trainable parameters {sum(p.numel() for p in peft_model.parameters() if p.requires_grad)}")
