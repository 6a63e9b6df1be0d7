"""CorDA adapters trained with TRL's SFTTrainer.

`corda_fast.init_adapters` returns a ready `peft.PeftModel`; `SFTTrainer(model=peft_model, ...)` trains it as it is
(no `peft_config`: the model already is one). Before training, `save_for_trainers` keeps the initial adapter (and
the residual base); after training, `save_as_lora` turns the result into a plain LoRA for the original model —
at twice the rank (see its docstring).

    python examples/trl_sft.py --max-steps 5
"""

import os

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import corda_fast

from _common import load, parser, targets, texts

p = parser(__doc__)
p.add_argument("--max-steps", type=int, default=5)
p.add_argument("--out", default="corda_trl_example")
args = p.parse_args()

model, tokenizer = load(args.model)
calibration = corda_fast.calibration_batches(texts(args.samples), tokenizer, max_seq_length=args.seq_len,
                                             num_samples=args.samples, batch_size=4)
peft_model = corda_fast.init_adapters(model, calibration, mode="ipm", rank=args.rank, target_modules=targets(model))
saved = corda_fast.save_for_trainers(peft_model, args.out, tokenizer, overwrite=True)

train = Dataset.from_dict({"text": texts(4 * args.max_steps, words=60)})
config = SFTConfig(output_dir=os.path.join(args.out, "sft"), max_steps=args.max_steps, per_device_train_batch_size=2,
                   max_length=args.seq_len, learning_rate=1e-4, logging_steps=1, report_to="none",
                   save_strategy="no", use_cpu=not torch.cuda.is_available())
trainer = SFTTrainer(model=peft_model, args=config, train_dataset=train, processing_class=tokenizer)
trainer.train()
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print(f"SFT losses: {[round(x, 3) for x in losses]}")

peft_model.save_pretrained(os.path.join(args.out, "trained_adapter"))  # for the residual base
info = corda_fast.save_as_lora(peft_model, os.path.join(args.out, "plain_lora"), saved.initial_adapter)
print(f"trained adapter (rank {info['trained_r']}) for the residual base: {os.path.join(args.out, 'trained_adapter')}")
print(f"plain LoRA (rank {info['r']}) for the original model: {info['path']}")
