"""CorDA on a vision-language model: a tiny random LLaVA built from its config with a processor made offline,
calibrated on image + conversation rows (the response tokens only), adapted in the vision tower, the projector and
the language model.

    python examples/vlm_llava.py        # ~10 s on a CPU
"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import texts  # noqa: E402


def tiny_llava():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    specials = ["<image>", "[END]", "user:", "assistant:"]
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(specials)}}
    for w in " ".join(texts(40)).split():
        if len(vocab) < 300:
            vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                  additional_special_tokens=specials)
    chat = ("{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %} [END] {% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28},
                                                                  crop_size={"height": 28, "width": 28}),
                               tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                               image_token="<image>", num_additional_image_tokens=1, chat_template=chat)
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                     num_attention_heads=4, image_size=28, patch_size=14),
                      text_config=LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=300),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    return LlavaForConditionalGeneration(cfg).eval(), processor


def main():
    from PIL import Image

    import corda_fast

    model, processor = tiny_llava()
    rng = np.random.default_rng(0)
    words = " ".join(texts(40)).split()
    rows = [{"image": Image.fromarray((rng.random((48, 56, 3)) * 255).astype("uint8")),
             "messages": [{"role": "user", "content": " ".join(words[i * 12:i * 12 + 6])},
                          {"role": "assistant", "content": " ".join(words[i * 12 + 6:i * 12 + 12])}]}
             for i in range(8)]
    batches = corda_fast.calibration_batches(rows, processor, image_column="image", messages_column="messages",
                                             mask="response", num_samples=8, batch_size=4)
    probe = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        before = model(**probe).logits
    targets = ["q_proj", "v_proj", "fc1", "linear_1", "linear_2", "down_proj"]  # vision tower, projector, language
    peft_model, report = corda_fast.init_adapters(model, batches, target_modules=targets, rank=4, mode="kpm",
                                                  return_report=True,
                                                  corda_config=corda_fast.CordaConfig(show_progress=False))
    print(report.summary())
    with torch.no_grad():
        drift = float((peft_model(**probe).logits - before).abs().max() / before.abs().max())
    print(f"drift at init {drift:.2e}; batch keys {sorted(probe)}")


if __name__ == "__main__":
    main()
