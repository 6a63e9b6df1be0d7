"""CorDA on a routed-MoE model's experts: a tiny random Qwen3-MoE (or Mixtral / gpt-oss) built from its config,
adapted on attention and on every expert of ``mlp.experts.gate_up_proj`` / ``down_proj``, saved, and reloaded with
plain PEFT.

    python examples/moe_experts.py                      # Qwen3-MoE, 8 experts, ~10 s on a CPU
    python examples/moe_experts.py --family gpt_oss --route-all-experts
"""

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import texts  # noqa: E402


def tiny(family: str, experts: int):
    from transformers import (
        GptOssConfig,
        GptOssForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                  max_position_embeddings=256, num_experts_per_tok=2)
    if family == "qwen3_moe":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, head_dim=16, intermediate_size=96, moe_intermediate_size=48,
                                                  num_experts=experts))
    if family == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**common, intermediate_size=48, num_local_experts=experts))
    return GptOssForCausalLM(GptOssConfig(**common, head_dim=16, intermediate_size=48, num_local_experts=experts,
                                          layer_types=["full_attention", "sliding_attention"], sliding_window=32))


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("--family", choices=["qwen3_moe", "mixtral", "gpt_oss"], default="qwen3_moe")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--route-all-experts", action="store_true")
    args = p.parse_args()

    from peft import LoraConfig, PeftModel

    import corda_fast

    torch.manual_seed(0)
    model = tiny(args.family, args.experts).eval()
    # calibration: word ids of offline text (a tiny random model has no tokenizer of its own)
    words = " ".join(texts(16)).split()
    vocab = {w: i % 300 for i, w in enumerate(dict.fromkeys(words))}
    ids = torch.tensor([vocab[w] for w in words[: 16 * 64]]).reshape(16, 64)
    loader = [ids[i:i + 4] for i in range(0, 16, 4)]
    probe = ids[:2, :32]
    with torch.no_grad():
        before = model(probe).logits

    lora = LoraConfig(r=args.rank, target_modules=["q_proj", "v_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    corda = corda_fast.CordaConfig(mode="kpm", calibration=corda_fast.CalibrationConfig(
        route_all_experts=args.route_all_experts), show_progress=False)
    peft_model, report = corda_fast.init_adapters(model, loader, lora_config=lora, corda_config=corda,
                                                  return_report=True)
    print(report.summary())
    with torch.no_grad():
        drift = float((peft_model(probe).logits - before).abs().max() / before.abs().max())
    print(f"drift at init {drift:.2e}")
    with tempfile.TemporaryDirectory() as tmp:
        corda_fast.save_residual_base(peft_model, os.path.join(tmp, "base"))
        peft_model.save_pretrained(os.path.join(tmp, "adapter"))
        reloaded = PeftModel.from_pretrained(type(model).from_pretrained(os.path.join(tmp, "base")).eval(),
                                             os.path.join(tmp, "adapter"))
        with torch.no_grad():
            again = float((reloaded(probe).logits - before).abs().max() / before.abs().max())
    print(f"reloaded with plain PEFT: drift {again:.2e}; adapted parameters "
          f"{sorted(peft_model.peft_config['default'].target_parameters)}")


if __name__ == "__main__":
    main()
