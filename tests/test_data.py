"""calibration_batches: every source kind, packing, chat templates, prompt/response masks and their statistics, and
the clear errors; the label mask in calibration; the too-little-data guard. Offline: every source is written here."""

import logging

import pytest
import torch

import corda_fast
from corda_fast import calibration_batches

from helpers import Setup, init, padded_batches, random_samples, rel, tiny_llama, tiny_model_dir

datasets = pytest.importorskip("datasets")

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir(tmp_path_factory.mktemp("m") / "model"))


@pytest.fixture
def chat_tok(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = TEMPLATE
    return t


def words(n, seed):
    vocab = "the def class import return if else for while print".split()
    g = torch.Generator().manual_seed(seed)
    return " ".join(vocab[int(i)] for i in torch.randint(0, len(vocab), (n,), generator=g))


ROWS = {"text": [words(5 + 3 * i, i) for i in range(12)]}


def same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_every_source_kind_gives_the_same_batches(tok, tmp_path):
    kw = dict(num_samples=8, max_seq_length=12, batch_size=3, seed=5)
    ref = calibration_batches(datasets.Dataset.from_dict(ROWS), tok, **kw)
    assert len(ref) == 3 and ref[0]["input_ids"].shape[0] == 3 and "labels" not in ref[0]
    ds = datasets.Dataset.from_dict(ROWS)
    ds.to_json(tmp_path / "d.jsonl")
    ds.to_parquet(tmp_path / "d.parquet")
    ds.to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.txt").write_text("\n".join(ROWS["text"]) + "\n")
    ds.save_to_disk(str(tmp_path / "folder"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    sources = [datasets.DatasetDict({"train": ds, "test": ds.select([0])}), ROWS["text"], tmp_path / "d.jsonl",
               str(tmp_path / "d.parquet"), str(tmp_path / "d.csv"), str(tmp_path / "d.txt"), str(tmp_path / "folder"),
               str(tmp_path / "dict")]
    arrow = sorted((tmp_path / "folder").glob("*.arrow"))
    sources.append(str(arrow[0]))
    for src in sources:
        got = calibration_batches(src, tok, split="train" if isinstance(src, datasets.DatasetDict) else None, **kw)
        assert same(got, ref), src
    assert not same(calibration_batches(ds, tok, **{**kw, "seed": 6}), ref)  # the seed picks the rows


def test_iterable_dataset_takes_num_samples(tok):
    ds = datasets.Dataset.from_dict(ROWS).to_iterable_dataset()
    got = calibration_batches(ds, tok, num_samples=5, max_seq_length=50, batch_size=5, shuffle=False)
    ids = [tok(t)["input_ids"] for t in ROWS["text"][:5]]
    assert same(got, corda_fast.pad_batches(ids, 5, pad_id=tok.pad_token_id))


def test_concatenate_equals_windows_cut_by_hand(tok):
    got = calibration_batches(ROWS["text"], tok, num_samples=4, max_seq_length=7, batch_size=4, concatenate=True,
                              shuffle=False)
    stream = [t for text in ROWS["text"] for t in tok(text)["input_ids"] + ([tok.eos_token_id] if tok.eos_token_id
                                                                           is not None else [])]
    windows = [stream[i * 7:(i + 1) * 7] for i in range(4)]
    assert same(got, corda_fast.pad_batches(windows, 4, pad_id=tok.pad_token_id))


def conversations(n=6):
    return [[{"role": "user", "content": words(4 + i, i)}, {"role": "assistant", "content": words(3 + 2 * i, 50 + i)}]
            for i in range(n)]


def test_chat_template_renders_messages_and_masks_the_prompt(chat_tok):
    convs = conversations()
    got = calibration_batches(convs, chat_tok, num_samples=6, max_seq_length=64, batch_size=6, shuffle=False,
                              mask="response")
    b = got[0]
    for j, conv in enumerate(convs):
        want = chat_tok(chat_tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
        n = int(b["attention_mask"][j].sum())
        assert b["input_ids"][j, :n].tolist() == want
        answer = chat_tok(conv[1]["content"], add_special_tokens=False)["input_ids"]
        kept = [t for t in b["labels"][j, :n].tolist() if t != -100]
        assert kept == answer  # exactly the assistant's tokens
    prompt = calibration_batches(convs, chat_tok, num_samples=6, max_seq_length=64, batch_size=6, shuffle=False,
                                 mask="prompt")[0]
    assert torch.equal((prompt["labels"] != -100) & (b["labels"] != -100), torch.zeros_like(b["labels"], dtype=bool))


def test_prompt_response_columns_without_template_are_concatenated(tok):
    ds = datasets.Dataset.from_dict({"prompt": ["the def", "class"], "response": ["import", "return if"]})
    b = calibration_batches(ds, tok, num_samples=2, batch_size=2, shuffle=False, mask="response")[0]
    assert b["input_ids"][0, :3].tolist() == tok("the def\nimport")["input_ids"]
    assert [t for t in b["labels"][1].tolist() if t != -100] == tok("return if", add_special_tokens=False)["input_ids"]


def _reference_response_statistic(model, batches, name):
    """float64: each sample run alone (batch size 1, no padding); only its response positions, normalised by the
    |signed max| over those positions."""
    layer = model.get_submodule(name)
    seen = []
    h = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()[0].double()))
    c, n = None, 0
    try:
        for b in batches:
            for j in range(b["input_ids"].shape[0]):
                real = b["attention_mask"][j].bool()
                with torch.no_grad():
                    model(b["input_ids"][j][real].unsqueeze(0))
                x = seen.pop()[b["labels"][j][real] != -100]
                x = x / x.max().abs()
                c = x.T @ x if c is None else c + x.T @ x
                n += 1
    finally:
        h.remove()
    return c / n


def test_response_mask_statistic_equals_float64_reference_with_left_and_right_padding(chat_tok):
    model = tiny_llama()
    right = calibration_batches(conversations(), chat_tok, num_samples=6, max_seq_length=64, batch_size=3,
                                mask="response")
    left = []
    for b in right:  # the same samples, left-padded
        n = b["attention_mask"].sum(1)
        left.append({k: torch.stack([torch.roll(v[j], int(v.shape[1] - n[j])) for j in range(v.shape[0])])
                     for k, v in b.items()})
    name = "model.layers.1.mlp.down_proj"
    ref = _reference_response_statistic(model, right, name)
    cfg = Setup(target_modules=[name], share_inputs=False)
    for batches in (right, left):
        stats = corda_fast.stages.collect_covariance(model, batches, *cfg.stage)
        assert rel(stats.covariance(name), ref) < 1e-5
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in right]
    ignored = corda_fast.stages.collect_covariance(model, right, *Setup(target_modules=[name], use_label_mask=False).stage)
    plain = corda_fast.stages.collect_covariance(model, no_labels, *cfg.stage)
    assert torch.equal(ignored.sums[name], plain.sums[name]) and rel(plain.covariance(name), ref) > 1e-3


@pytest.mark.parametrize("source,kw,match", [
    ("someone/some-dataset", {}, r"could not be loaded from the Hugging Face Hub.*local copy"),
    (ROWS, {"text_column": "body"}, r"column\(s\) \['body'\] not in the dataset"),
    ({"text": ["a"], "messages": [[{"role": "user", "content": "b"}]]}, {}, r"ambiguous calibration columns"),
    ({"body": ["a"]}, {}, r"no calibration column among \['body'\]"),
    ([[{"role": "user", "content": "the"}]], {}, r"no chat template"),
    ({"text": []}, {}, r"empty"),
    (ROWS, {"mask": "response"}, r"needs prompt/response or messages data"),
])
def test_clear_errors(tok, source, kw, match):
    src = datasets.Dataset.from_dict(source) if isinstance(source, dict) else source
    with pytest.raises(ValueError, match=match):
        calibration_batches(src, tok, **kw)


def test_fewer_rows_than_num_samples_warns_with_the_real_count(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="corda_fast.data"):
        got = calibration_batches(ROWS["text"], tok, num_samples=100, batch_size=5)
    assert sum(b["input_ids"].shape[0] for b in got) == 12
    assert "gave 12 samples, fewer than num_samples=100" in caplog.text


def test_token_guard_fires_on_too_little_data_and_is_silent_with_enough(caplog):
    with caplog.at_level(logging.WARNING, logger="corda_fast.api"):
        _, report = init(tiny_llama(), padded_batches(random_samples(2, lo=5, hi=8), 2), rank=2, return_report=True)
    assert report.low_data and "too little calibration data" in caplog.text
    row = report.low_data[0]
    assert row["tokens"] < row["width"] and row["more_samples"] > 0
    assert "too little calibration data" in report.summary()
    assert all("tokens" in layer for layer in report.layers)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="corda_fast.api"):
        _, report = init(tiny_llama(), padded_batches(random_samples(40, lo=20, hi=30), 8), rank=2,
                         return_report=True)
    assert not report.low_data and "too little" not in caplog.text
