"""``eval``: a trained model against its base — its figures equal a direct computation, whichever form the trained
model takes (merged, residual base + adapter, converted LoRA on the original)."""

import json

import pytest
import torch

import corda_fast
from corda_fast import cli, convert, demo, evaluate

from helpers import tiny_model_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("eval")
    base_dir = tiny_model_dir(d / "base")
    tok = AutoTokenizer.from_pretrained(base_dir)
    words = demo.builtin_text().split()
    knowledge = d / "knowledge.txt"
    knowledge.write_text(" ".join(words[:3000]))
    task = d / "task.jsonl"
    task.write_text("".join(json.dumps({"text": " ".join(words[i:i + 12])}) + "\n" for i in range(3000, 3600, 12)))
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    batches = corda_fast.calibration_batches(str(knowledge), tok, num_samples=8, max_seq_length=24, batch_size=4,
                                             concatenate=True)
    pm = corda_fast.init_adapters(model, batches, mode="kpm", rank=4, target_modules=["q_proj", "down_proj"],
                                  corda_config=corda_fast.CordaConfig(show_progress=False))
    corda_fast.save_for_trainers(pm, str(d / "corda_out"), tok)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * p.abs().mean() * 3)
    pm.save_pretrained(d / "trained")
    convert.merge(str(d / "corda_out" / "residual_base"), str(d / "trained"), str(d / "merged"))
    convert.convert(str(d / "corda_out"), str(d / "trained"), str(d / "lora"))
    return d, base_dir, tok, knowledge, task


def _eval(run, out, *trained):
    d, base_dir, _, knowledge, task = run
    args = ["eval", "--base", str(base_dir), *trained, "--knowledge", str(knowledge), "--task", str(task),
            "--samples", "6", "--seq-len", "20", "--batch-size", "3", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    return json.loads(out.read_text())


def _direct_nll(model, batches):
    """HF's own loss (labels = input ids, padding -100), weighted by each batch's predicted tokens."""
    total, n = 0.0, 0
    for b in batches:
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        count = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += float(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss) * count
        n += count
    return total / n


def test_figures_equal_a_direct_computation_for_every_form(run, tmp_path):
    from transformers import AutoModelForCausalLM

    d, base_dir, tok, knowledge, task = run
    merged = _eval(run, tmp_path / "merged.json", "--trained", str(d / "merged"))
    residual = _eval(run, tmp_path / "residual.json", "--trained", str(d / "corda_out" / "residual_base"), "--adapter",
                     str(d / "trained"))
    lora = _eval(run, tmp_path / "lora.json", "--trained", str(d / "lora"))
    for other in (residual, lora):
        for part, key in (("knowledge", "perplexity_trained"), ("knowledge", "kl_to_base"), ("task", "loss_trained")):
            assert other[part][key] == pytest.approx(merged[part][key], rel=1e-4, abs=1e-7), (part, key)
        assert {n: v["intruders"] for n, v in other["intruders"]["layers"].items()} == \
            {n: v["intruders"] for n, v in merged["intruders"]["layers"].items()}
    assert (tmp_path / "merged.png").stat().st_size > 1000

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    trained = AutoModelForCausalLM.from_pretrained(d / "merged").eval()
    common = dict(num_samples=6, max_seq_length=20, batch_size=3, shuffle=False)
    kb = corda_fast.calibration_batches(str(knowledge), tok, concatenate=True, **common)
    tb = corda_fast.calibration_batches(str(task), tok, **common)
    r = merged
    assert r["knowledge"]["perplexity_base"] == pytest.approx(torch.tensor(_direct_nll(base, kb)).exp().item(), rel=1e-5)
    assert r["knowledge"]["perplexity_trained"] == pytest.approx(
        torch.tensor(_direct_nll(trained, kb)).exp().item(), rel=1e-5)
    assert r["task"]["loss_trained"] == pytest.approx(_direct_nll(trained, tb), rel=1e-5)
    assert r["knowledge"]["perplexity_ratio"] != 1.0 and r["knowledge"]["kl_to_base"] > 0  # the model moved
    kl, n = 0.0, 0  # KL(p_base || p_trained) summed token by token
    with torch.no_grad():
        for b in kb:
            lb = torch.log_softmax(base(**b).logits[:, :-1].double(), -1)
            lt = torch.log_softmax(trained(**b).logits[:, :-1].double(), -1)
            keep = (b["attention_mask"][:, 1:] != 0)
            for i, j in keep.nonzero().tolist():
                kl += float(torch.nn.functional.kl_div(lt[i, j], lb[i, j], log_target=True, reduction="sum"))
                n += 1
    assert r["knowledge"]["kl_to_base"] == pytest.approx(kl / n, rel=1e-4)
    # intruder dimensions of one layer, by brute force
    name = "model.layers.1.mlp.down_proj"
    wb = base.get_submodule(name).weight.double()
    wt = trained.get_submodule(name).weight.double()
    ub = torch.linalg.svd(wb)[0]
    ut = torch.linalg.svd(wt)[0]
    count = sum(1 for i in range(10) if max(abs(float(ut[:, i] @ ub[:, j])) for j in range(ub.shape[1])) < 0.5)
    assert r["intruders"]["layers"][name]["intruders"] == count
    assert set(r["intruders"]["layers"]) == {f"model.layers.{i}.{m}" for i in (0, 1)
                                             for m in ("self_attn.q_proj", "mlp.down_proj")}


def test_intruder_count_of_known_directions():
    """A weight whose top direction is replaced by one orthogonal to every base direction has exactly one intruder;
    a reweighting of the base's own directions has none."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    base = u[:, :8] @ torch.diag(torch.linspace(8, 1, 8, dtype=torch.float64)) @ v.mT  # uses 8 of 12 directions
    assert evaluate.intruder_dimensions(base, base * 2 + u[:, :8] @ v.mT, k=8) == 0
    new = base + 20 * torch.outer(u[:, 10], v[:, 0])  # a direction the base never had, now the largest
    assert evaluate.intruder_dimensions(base, new, k=3) == 1


def test_convert_reports_the_logit_drift_against_the_trained_model(run, tmp_path, capsys):
    d, _, _, knowledge, _ = run
    drifts = {}
    for how in (["--exact"], ["--rank", "1"]):
        out = tmp_path / how[-1].strip("-")
        assert cli.main(["convert", "--initial-adapter", str(d / "corda_out"), "--trained", str(d / "trained"),
                         "--out", str(out), "--drift-data", str(knowledge), "--drift-samples", "4", *how,
                         "--quiet"]) == 0
        assert "logit drift vs the trained model" in capsys.readouterr().out
        drifts[how[-1]] = json.loads((out / "convert_report.json").read_text())["logit_drift"]
    assert drifts["--exact"]["relative"] < 1e-5 and drifts["--exact"]["tokens"] > 0
    assert drifts["1"]["relative"] > 10 * drifts["--exact"]["relative"]  # rank 1 of a rank-8 update drifts
