"""The command line, on a tiny random Llama with a tiny word-level tokenizer (no downloads)."""

import json
import subprocess
import sys

import pytest
import torch

from corda_fast import cli, demo

from helpers import tiny_llama, tiny_model_dir


@pytest.fixture
def model_dir(tmp_path):
    return tiny_model_dir(tmp_path / "model")


def test_init_on_text_file(model_dir, tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text(" ".join(demo.builtin_text().split()[:3000]))
    out = tmp_path / "out"
    assert cli.main(["init", "--model", str(model_dir), "--data", str(data), "--mode", "kpm", "--rank", "4",
                     "--samples", "6", "--seq-len", "32", "--batch-size", "4", "--concatenate", "--out", str(out),
                     "--quiet"]) == 0
    report = json.loads((out / "corda_report.json").read_text())
    assert report["n_layers"] == 14 and report["calibration"]["samples"] == 6
    assert report["drift_at_init"]["relative"] < 1e-5
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(out / "residual_base")
    loaded = PeftModel.from_pretrained(base, out / "initial_adapter")
    ids = torch.randint(2, 300, (1, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, tiny_llama()(ids).logits, atol=1e-5, rtol=0)


def test_init_on_jsonl_with_cache(model_dir, tmp_path, capsys):
    words = demo.builtin_text().split()
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"body": " ".join(words[i * 40:(i + 1) * 40 - i])}) for i in range(10)))
    cache = tmp_path / "cov.safetensors"
    args = ["init", "--model", str(model_dir), "--data", str(data), "--text-field", "body", "--rank", "2",
            "--samples", "8", "--seq-len", "24", "--covariance-cache", str(cache), "--quiet"]
    assert cli.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert cache.is_file()
    assert cli.main(args + ["--out", str(tmp_path / "b"), "--mode", "kpm"]) == 0
    stream = [a for a in args if a not in ("--covariance-cache", str(cache))]
    assert cli.main(stream + ["--out", str(tmp_path / "s"), "--streaming", "on"]) == 0
    a = json.loads((tmp_path / "a" / "corda_report.json").read_text())
    s = json.loads((tmp_path / "s" / "corda_report.json").read_text())
    assert s["statistics_mib"] == pytest.approx(a["statistics_mib"] / 2, rel=0.02)  # 2 blocks: one block's worth at a time
    assert cli.main(stream + ["--out", str(tmp_path / "f"), "--precision", "float64"]) == 0
    assert cli.main(["init", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "c"), "--quiet"]) == 1
    assert "no calibration column among ['body']" in capsys.readouterr().err and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_env_command_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "corda_fast", "env"], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["kernels_cpu"] == {"xtx_accumulate": "torch", "lowrank_gemm": "torch", "damped_cholesky": "torch",
                                   "batched_decompose": "torch"}
    assert info["torch"] == torch.__version__ and info["corda_fast"] == __import__("corda_fast").__version__


@pytest.mark.slow
def test_init_corda_plus_writes_table_and_plot(model_dir, tmp_path, capsys):
    data = tmp_path / "calib.txt"
    data.write_text(" ".join(demo.builtin_text().split()[:3000]))
    out = tmp_path / "plus"
    assert cli.main(["init", "--model", str(model_dir), "--data", str(data), "--mode", "kpm", "--rank", "4",
                     "--samples", "8", "--seq-len", "32", "--batch-size", "2", "--concatenate", "--method", "corda++",
                     "--candidates", "2", "--min-rank", "2", "--max-rank", "20", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "CorDA++-KPM" in printed and "adapter parameters" in printed and "corda_plus.md" in printed
    report = json.loads((out / "corda_report.json").read_text())
    ranks = [l["rank"] for l in report["plus"]["layers"]]
    assert all(2 <= r <= 20 for r in ranks) and len(set(ranks)) > 1
    assert report["plus"]["realised"] <= report["plus"]["budget"]
    assert (out / "corda_plus.md").read_text().count("| model.layers.") == 14
    hist = report["plus"]["rank_histogram"]  # per module kind: {rank: layers}, adding up to the table
    by_kind = {}
    for l in report["plus"]["layers"]:
        by_kind.setdefault(l["name"].rsplit(".", 1)[-1], []).append(l["rank"])
    assert {k: {int(r): n for r, n in h.items()} for k, h in hist.items()} == {
        k: {r: v.count(r) for r in sorted(set(v))} for k, v in by_kind.items()}
    assert "| q_proj | 2 |" in (out / "corda_plus.md").read_text()  # the histogram table, 2 layers per kind
    q = report["plus"]["rank_histogram"]["q_proj"]
    n_q = sum(q.values())
    mean_q = sum(int(r) * n for r, n in q.items()) / n_q
    assert f"q_proj {mean_q:.1f} (" in printed  # the printed summary is the report's, per module kind
    assert (out / "corda_plus.png").stat().st_size > 1000
    assert report["drift_at_init"]["relative"] < 1e-5


# ---------------------------------------------------------------- errors: short, naming the input, nothing half-written
def _init(model_dir, data, out, *extra):
    return ["init", "--model", str(model_dir), "--data", str(data), "--rank", "2", "--samples", "4", "--seq-len",
            "16", "--batch-size", "2", "--concatenate", "--out", str(out), "--quiet", *extra]


def _error(capsys) -> str:
    """The error the command printed: from its ``corda_fast: error:`` line on, at most two lines."""
    err = capsys.readouterr().err
    assert "corda_fast: error: " in err, err
    err = err[err.index("corda_fast: error: "):].strip()
    assert len(err.splitlines()) <= 2, err
    return err


def test_cli_errors_are_short_and_name_the_input(model_dir, tmp_path, capsys):
    good = tmp_path / "calib.txt"
    good.write_text(" ".join(demo.builtin_text().split()[:600]))
    assert cli.main(_init(tmp_path / "nowhere", good, tmp_path / "o1")) == 1
    err = _error(capsys)
    assert "--model '" in err and "nowhere' does not exist" in err  # missing, not "not a folder"
    assert cli.main(_init(good, good, tmp_path / "o0")) == 1
    assert "calib.txt' is a file, not a folder" in _error(capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert cli.main(_init(model_dir, empty, tmp_path / "o2")) == 1
    assert str(empty) in _error(capsys)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    assert cli.main(_init(model_dir, latin, tmp_path / "o3")) == 1
    err = _error(capsys)
    assert str(latin) in err and "not UTF-8" in err
    with pytest.raises(SystemExit) as exit_:
        cli.main(_init(model_dir, good, tmp_path / "o4", "--batch-size", "0"))
    assert exit_.value.code == 2 and "--batch-size" in capsys.readouterr().err
    for out in ("o0", "o1", "o2", "o3", "o4"):
        assert not (tmp_path / out).exists() and not (tmp_path / f"{out}.partial").exists()
    with pytest.raises(ValueError, match="does not exist"):  # --debug: the exception itself
        cli.main(_init(tmp_path / "nowhere", good, tmp_path / "o5", "--debug"))


def test_cli_output_folder_is_complete_or_absent(model_dir, tmp_path, capsys, monkeypatch):
    import corda_fast

    data = tmp_path / "calib.txt"
    data.write_text(" ".join(demo.builtin_text().split()[:600]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("earlier results")
    assert cli.main(_init(model_dir, data, out)) == 1  # not empty, no --overwrite: refused before any work
    assert "--overwrite" in _error(capsys) and (out / "old.txt").exists()

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(corda_fast.export, "save_residual_base", boom)
    assert cli.main(_init(model_dir, data, out, "--overwrite")) == 1  # fails while writing
    assert "disk full" in _error(capsys)
    assert (out / "old.txt").exists() and not (tmp_path / "out.partial").exists()  # old results untouched
    monkeypatch.undo()
    assert cli.main(_init(model_dir, data, out, "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["axolotl.yaml", "corda_report.json", "initial_adapter",
                                                     "llamafactory.yaml", "residual_base", "train_trl.py"]


def test_init_on_chat_data_with_response_mask(model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    convs = [[{"role": "user", "content": " ".join(demo.builtin_text().split()[i * 9:i * 9 + 9])},
              {"role": "assistant", "content": " ".join(demo.builtin_text().split()[500 + i * 30:530 + i * 30])}]
             for i in range(12)]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"id": i, "messages": c}) for i, c in enumerate(convs)))
    args = _init(model_dir, data, tmp_path / "o", "--mask", "response", "--seq-len", "64", "--samples", "12")
    args.remove("--concatenate")
    assert cli.main(args) == 1  # the tokenizer has no chat template yet: one clear line
    assert "no chat template" in _error(capsys)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}<assistant> {% endif %}")
    tok.save_pretrained(model_dir)
    assert cli.main(args) == 0
    report = json.loads((tmp_path / "o" / "corda_report.json").read_text())
    # statistics count response tokens only: 30 words per answer, at most, over 12 samples
    assert report["calibration"]["samples"] == 12 and 12 * 20 <= report["calibration"]["tokens"] <= 12 * 31


def test_init_on_a_model_offloaded_to_disk(model_dir, tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text(" ".join(demo.builtin_text().split()[:3000]))
    out, offload = tmp_path / "out", tmp_path / "offload"
    size = sum(p.numel() * 4 for p in tiny_llama().parameters())
    assert cli.main(["init", "--model", str(model_dir), "--data", str(data), "--rank", "4", "--samples", "6",
                     "--seq-len", "32", "--concatenate", "--streaming", "on", "--device-map", "auto",
                     "--max-memory", f"cpu={size // 3}", "--offload-folder", str(offload), "--out", str(out),
                     "--quiet"]) == 0
    report = json.loads((out / "corda_report.json").read_text())
    assert report["weights"]["disk"] > 0 and report["drift_at_init"]["relative"] < 1e-5
    assert (out / "residual_base" / "model.safetensors.index.json").is_file()  # written block by block
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "residual_base"),
                                       out / "initial_adapter")
    ids = torch.randint(2, 300, (1, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, tiny_llama()(ids).logits, atol=1e-5, rtol=0)


def test_offload_flags_are_checked(model_dir, tmp_path, capsys):
    data = tmp_path / "calib.txt"
    data.write_text("some words here")
    assert cli.main(_init(model_dir, data, tmp_path / "o", "--max-memory", "cpu=1GiB")) == 1
    assert "--device-map" in _error(capsys)
    with pytest.raises(SystemExit):
        cli.main(_init(model_dir, data, tmp_path / "o", "--device-map", "auto", "--max-memory", "gpu=1GiB"))
    assert "not a device" in capsys.readouterr().err
