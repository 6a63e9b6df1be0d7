"""Vision-language models on tiny random LLaVA- and Qwen2-VL-shaped models with processors built offline: image +
text batches, statistics on the real multimodal sequence (Qwen2-VL's 3-D positions kept), masks, the vision tower
and projector as targets, identity at init, streaming, save / reload with plain PEFT."""

import copy

import numpy as np
import pytest
import torch

import corda_fast
from corda_fast import calibration_batches
from corda_fast.stages import collect_covariance

from helpers import Setup, init, rel

LANGUAGE = r".*language_model.*\.(q_proj|v_proj|down_proj)"


def word_tokenizer(extra):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from corda_fast import demo

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: 2 + i for i, w in enumerate(extra)}}
    for w in demo.builtin_text().split()[:4000]:
        if len(vocab) < 300:
            vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                   additional_special_tokens=list(extra))


CHAT = ("{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ image }} {% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %} [END] {% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


def tiny_llava(seed=0, dtype=torch.float32):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = word_tokenizer(["<image>", "[END]", "user:", "assistant:"])
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28},
                                                                  crop_size={"height": 28, "width": 28}),
                               tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                               image_token="<image>", num_additional_image_tokens=1,
                               chat_template=CHAT.replace("{{ image }}", "<image>"))
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                     num_attention_heads=4, image_size=28, patch_size=14),
                      text_config=LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=300),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    return LlavaForConditionalGeneration(cfg).to(dtype).eval(), processor


def tiny_qwen2_vl(seed=0, dtype=torch.float32):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor

    tok = word_tokenizer(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>", "[END]", "user:",
                          "assistant:"])
    # the real processor; its video half needs torchvision, which has no build for this CPU torch: skip its check
    Qwen2VLProcessor.check_argument_for_proper_class = lambda self, name, arg: None
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28 * 4,
                                                                       max_pixels=28 * 28 * 16),
                                 tokenizer=tok, video_processor=None,
                                 chat_template=CHAT.replace("{{ image }}",
                                                            "<|vision_start|><|image_pad|><|vision_end|>"))
    ids = tok.convert_tokens_to_ids
    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    return Qwen2VLForConditionalGeneration(cfg).to(dtype).eval(), processor


MAKERS = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl}


def rows(n=6, seed=0):
    from PIL import Image

    from corda_fast import demo

    rng = np.random.default_rng(seed)
    words = demo.builtin_text().split()
    out = []
    for i in range(n):
        side = int(rng.integers(30, 60))
        image = Image.fromarray((rng.random((side, side + 8, 3)) * 255).astype("uint8"))
        start = int(rng.integers(0, 2000))
        out.append({"image": image, "messages": [
            {"role": "user", "content": " ".join(words[start:start + int(rng.integers(3, 9))])},
            {"role": "assistant", "content": " ".join(words[start + 20:start + 20 + int(rng.integers(3, 9))])}]})
    return out


def vlm_batches(processor, **kw):
    return calibration_batches(rows(), processor, image_column="image", messages_column="messages", num_samples=6,
                               batch_size=3, shuffle=False, **kw)


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()


# ---------------------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_batches_carry_images_and_masks_exclude_what_they_should(kind):
    model, processor = MAKERS[kind]()
    batches = vlm_batches(processor)
    image_id = corda_fast.multimodal.image_token_id(processor)
    b = batches[0]
    assert "pixel_values" in b and (kind == "llava" or "image_grid_thw" in b)
    assert bool((b["input_ids"] == image_id).any())
    assert not bool((b["labels"][b["input_ids"] == image_id] != -100).any())  # image tokens out by default
    assert not bool((b["labels"][b["attention_mask"] == 0] != -100).any())
    setup = Setup(target_modules=["language_model.layers.0.self_attn.q_proj"])
    stats = collect_covariance(model, batches, *setup.stage)
    key = stats.key_of("model.language_model.layers.0.self_attn.q_proj")
    kept = sum(int((x["labels"] != -100).sum()) for x in batches)
    assert stats.n_tokens[key] == kept
    response = vlm_batches(processor, mask="response")
    n_response = sum(int((x["labels"] != -100).sum()) for x in response)
    assert 0 < n_response < kept
    with_images = vlm_batches(processor, include_image_tokens=True)
    assert sum(int((x["labels"] != -100).sum()) for x in with_images) > kept


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_images_change_the_language_statistics(kind):
    model, processor = MAKERS[kind]()
    batches = vlm_batches(processor)
    setup = Setup(target_modules=["language_model.layers.1.self_attn.q_proj"], normalization="none")
    with_images = collect_covariance(model, batches, *setup.stage)
    # the same text tokens without the images (image tokens dropped from each row)
    image_id = corda_fast.multimodal.image_token_id(processor)
    text_only = []
    for b in batches:
        keep = b["input_ids"] != image_id
        seqs = [b["input_ids"][r][keep[r] & (b["attention_mask"][r] != 0)] for r in range(b["input_ids"].shape[0])]
        text_only += corda_fast.pad_batches(seqs, len(seqs), pad_id=0)
    without = collect_covariance(model, text_only, *setup.stage)
    k = "model.language_model.layers.1.self_attn.q_proj"
    assert with_images.n_tokens[with_images.key_of(k)] == without.n_tokens[without.key_of(k)]
    assert rel(with_images.sums[with_images.key_of(k)], without.sums[without.key_of(k)]) > 1e-3


def test_qwen2_vl_statistics_are_those_of_the_models_own_forward():
    """Calibration keeps the model's 3-D (mRoPE) positions: a language layer's statistic equals the one from its
    inputs in a plain multimodal forward."""
    model, processor = tiny_qwen2_vl(dtype=torch.float64)
    batches = vlm_batches(processor)
    name = "model.language_model.layers.1.self_attn.q_proj"
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        for b in batches:
            logits(model, b)
    finally:
        handle.remove()
    ref = torch.zeros(64, 64, dtype=torch.float64)
    for x, b in zip(seen, batches):
        keep = b["labels"] != -100
        for r in range(x.shape[0]):
            rows_ = x[r][keep[r]]
            ref += rows_.T @ rows_
    setup = Setup(target_modules=[name], normalization="none", precision="float64")
    stats = collect_covariance(model, batches, *setup.stage)
    assert rel(stats.sums[stats.key_of(name)], ref) < 1e-10


# ---------------------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("kind,targets", [
    ("llava", ["q_proj", "v_proj", "fc1", "linear_1", "linear_2", "down_proj"]),  # vision tower, projector, LM
    ("qwen2_vl", ["q_proj", "v_proj", "qkv", "fc1", "down_proj"]),
])
def test_identity_at_init_with_vision_targets_and_plain_peft_reload(tmp_path, kind, targets):
    from peft import PeftModel

    model, processor = MAKERS[kind]()
    batches = vlm_batches(processor)
    before = logits(model, batches[0])
    pm, report = init(model, batches, target_modules=targets, rank=4, return_report=True)
    names = [l["name"] for l in report.layers]
    assert any("vision" in n or "visual" in n for n in names) and any("language_model" in n for n in names)
    after = logits(pm, batches[0])
    assert rel(after, before) < 1e-5
    corda_fast.save_residual_base(pm, str(tmp_path / "base"))
    pm.save_pretrained(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(type(model).from_pretrained(str(tmp_path / "base")).eval(),
                                         str(tmp_path / "adapter"))
    assert rel(logits(reloaded, batches[0]), after) < 1e-6


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_streaming_equals_one_pass(kind):
    model, processor = MAKERS[kind](dtype=torch.float64)
    batches = vlm_batches(processor)
    kw = dict(target_modules=LANGUAGE, rank=3, precision="float64", mode="kpm")
    one = init(copy.deepcopy(model), batches, **kw)
    streamed = init(copy.deepcopy(model), batches, streaming=True, **kw)
    for name, module in one.base_model.model.named_modules():
        if hasattr(module, "lora_A"):
            other = streamed.base_model.model.get_submodule(name)
            d1 = module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double()
            d2 = other.lora_B["default"].weight.double() @ other.lora_A["default"].weight.double()
            assert rel(d2, d1) < 1e-6, name


def test_streaming_says_why_it_cannot_cross_from_the_vision_tower():
    model, processor = tiny_llava()
    with pytest.raises(corda_fast.CalibrationError, match="another list of blocks.*vision tower"):
        init(model, vlm_batches(processor), target_modules=["q_proj"], rank=3, streaming=True)


def test_command_line_calibrates_a_vlm_on_images(tmp_path):
    import json

    from peft import PeftModel

    from corda_fast import cli

    model, processor = tiny_llava()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    lines = []
    for i, row in enumerate(rows()):
        path = tmp_path / f"img{i}.png"
        row["image"].save(path)
        lines.append(json.dumps({"image": str(path), "messages": row["messages"]}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    out = tmp_path / "out"
    assert cli.main(["init", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.jsonl"),
                     "--image-column", "image", "--messages-column", "messages", "--mask", "response",
                     "--target-modules", "q_proj", "v_proj", "--rank", "4", "--samples", "6", "--batch-size", "3",
                     "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "corda_report.json").read_text())
    assert report["n_layers"] == 8  # 2 vision + 2 language blocks, q and v
    from transformers import AutoModelForImageTextToText

    reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(out / "residual_base").eval(),
                                         out / "initial_adapter")
    batch = vlm_batches(processor)[0]
    assert rel(logits(reloaded, batch), logits(model, batch)) < 1e-5


def test_the_data_fingerprint_covers_the_images():
    from corda_fast.calibrate import data_fingerprint

    _, processor = tiny_llava()
    batches = vlm_batches(processor)
    other = [{**b, "pixel_values": b["pixel_values"].flip(-1)} for b in batches]
    config = corda_fast.CordaConfig(show_progress=False)
    assert data_fingerprint(batches, config) == data_fingerprint(vlm_batches(processor), config)
    assert data_fingerprint(other, config) != data_fingerprint(batches, config)
