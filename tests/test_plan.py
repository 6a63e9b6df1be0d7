"""The memory planner: sizes from the config alone equal what a real run allocates; the command line prints it and
init refuses a mode that will not fit."""

import json

import pytest

import corda_fast
from corda_fast import cli
from corda_fast.memory_plan import MODES, mode_of

from helpers import Setup, padded_batches, random_samples, tiny_llama, tiny_model_dir

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_model_dir(tmp_path_factory.mktemp("llama"), tiny_llama(layers=3, hidden=96)))


def test_sizes_from_the_config_equal_the_real_models_and_statistics(model_dir):
    from transformers import AutoModelForCausalLM

    plan = corda_fast.plan_memory(model_dir, samples=6, seq_len=16, batch_size=2, target_modules=TARGETS,
                                  precision="float64", device_memory=0, host_memory=2**34)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert plan.params_bytes == sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    targets = corda_fast.stages.resolve_targets(model, corda_fast.LoraSpec(target_modules=TARGETS))
    assert plan.targeted_bytes == sum(t.module.weight.numel() * 4 for t in targets)
    assert plan.blocks == 3
    cfg = Setup(target_modules=TARGETS, precision="float64")
    stats = corda_fast.stages.collect_covariance(model, padded_batches(random_samples(6), 2), *cfg.stage)
    assert plan.statistics_bytes == stats.nbytes(), "q/k/v and gate/up share one statistic each, as calibration does"
    _, report = corda_fast.init_adapters(model, padded_batches(random_samples(6), 2), return_report=True,
                                         **Setup(target_modules=TARGETS, precision="float64", streaming=True).kw)
    assert plan.block_statistics_bytes == round(report.statistics_mib * 2**20)
    assert plan.inputs_bytes == 6 * 16 * 96 * 4


def test_modes_order_and_fit(model_dir):
    kw = dict(samples=64, seq_len=256, batch_size=8, target_modules=TARGETS, device_memory=0)
    roomy = corda_fast.plan_memory(model_dir, host_memory=2**40, candidates=3, **kw)
    assert set(roomy.modes) == set(MODES) and all(m.fits for m in roomy.modes.values())
    h = {k: v.host_peak_bytes for k, v in roomy.modes.items()}
    assert h["plus"] - h["one_pass"] == 2 * roomy.statistics_bytes  # 3 candidates: twice the statistics more
    one = corda_fast.plan_memory(model_dir, host_memory=2**40, **kw)  # one candidate keeps the scored eigenvectors
    targets = corda_fast.stages.resolve_targets(tiny_llama(layers=3, hidden=96),
                                                corda_fast.LoraSpec(target_modules=TARGETS))
    kept = sum(min(t.d_in, t.d_out, 4 * 8) * min(t.d_in, t.d_out) * 8 for t in targets)  # 4x the rank, 8
    assert one.modes["plus"].host_peak_bytes - one.modes["one_pass"].host_peak_bytes == kept
    assert h["plus_streaming"] - h["streaming"] == 2 * roomy.block_statistics_bytes
    assert h["streaming"] > h["one_pass"], "16k tokens of a 96-wide model: the cached inputs outweigh the statistics"
    few = corda_fast.plan_memory(model_dir, host_memory=2**40, **{**kw, "samples": 4, "seq_len": 32})
    assert few.modes["streaming"].host_peak_bytes < few.modes["one_pass"].host_peak_bytes
    assert roomy.modes["one_pass"].disk_bytes == roomy.targeted_bytes  # the spill file
    tight = corda_fast.plan_memory(model_dir, host_memory=h["one_pass"] + 1, candidates=3, **kw)
    assert tight.modes["one_pass"].fits and not tight.modes["plus"].fits and not tight.modes["streaming"].fits
    assert "host needs" in tight.modes["plus"].why_not
    gpu = corda_fast.plan_memory(model_dir, host_memory=2**40, **{**kw, "device_memory": 2**40}, threads=1)
    cpu1 = corda_fast.plan_memory(model_dir, host_memory=2**40, **kw, threads=1)
    overhead = cpu1.modes["one_pass"].terms["O"]
    assert gpu.modes["one_pass"].device_peak_bytes == cpu1.modes["one_pass"].host_peak_bytes - overhead
    assert gpu.modes["one_pass"].host_peak_bytes == overhead + gpu.targeted_bytes  # the spill, in host memory
    assert gpu.modes["one_pass"].disk_bytes == 0
    assert gpu.modes["onloading"].device_peak_bytes < gpu.modes["streaming"].device_peak_bytes
    assert mode_of(True, True, False, False) == "plus_streaming" and mode_of(False, False, True, False) == "onloading"


def test_plan_command_prints_json_and_a_table(model_dir, capsys):
    assert cli.main(["plan", "--model", model_dir, "--json", "--samples", "4", "--seq-len", "32",
                     "--host-memory", "64GiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["init_mode"] == "one_pass"
    for mode in ("one_pass", "streaming", "onloading", "disk_offload", "plus"):
        assert {"host_peak_bytes", "device_peak_bytes", "disk_bytes", "fits"} <= set(out["modes"][mode])
    assert cli.main(["plan", "--model", model_dir, "--streaming", "on", "--host-memory", "1MiB"]) == 0
    text = capsys.readouterr().out
    assert "init with these flags runs 'streaming': does NOT fit" in text
    small = ["plan", "--model", model_dir, "--samples", "4", "--seq-len", "32", "--streaming", "auto", "--json"]
    assert cli.main(small + ["--host-memory", "64GiB"]) == 0
    assert json.loads(capsys.readouterr().out)["init_mode"] == "one_pass"  # auto: one pass while it fits
    assert cli.main(small + ["--host-memory", "1MiB"]) == 0
    assert json.loads(capsys.readouterr().out)["init_mode"] == "streaming"  # and the streaming run where it won't


def test_init_refuses_a_mode_that_does_not_fit_unless_told(model_dir, tmp_path, capsys):
    data = tmp_path / "data.txt"
    from corda_fast import demo

    data.write_text(" ".join(demo.builtin_text().split()[:2000]))
    args = ["init", "--model", model_dir, "--data", str(data), "--samples", "4", "--seq-len", "16", "--batch-size",
            "2", "--rank", "2", "--concatenate", "--out", str(tmp_path / "out"), "--quiet"]
    assert cli.main(args + ["--host-memory", "1MiB"]) == 1
    err = capsys.readouterr().err
    assert "does NOT fit" in err and "--ignore-memory-plan" in err
    assert not (tmp_path / "out").exists()
    assert cli.main(args + ["--host-memory", "1MiB", "--ignore-memory-plan"]) == 0
    assert (tmp_path / "out" / "corda_report.json").exists()


@pytest.mark.parametrize("name,hidden,inter,layers,params", [("llama2-7b", 4096, 11008, 32, 6.74e9),
                                                              ("llama2-70b", 8192, 28672, 80, 68.98e9)])
def test_the_shipped_7b_and_70b_examples_plan(name, hidden, inter, layers, params):
    import os

    d = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", name)
    plan = corda_fast.plan_memory(d, samples=256, seq_len=2048, dtype="bfloat16", device_memory=0,
                                  host_memory=2**40, target_modules=TARGETS)
    assert plan.blocks == layers
    assert abs(plan.params_bytes / 2 - params) < 0.01 * params  # the published parameter counts
    assert plan.block_statistics_bytes == 4 * (3 * hidden**2 + inter**2)  # q/k/v, o, gate/up, down
    assert plan.statistics_bytes == layers * plan.block_statistics_bytes
    assert plan.inputs_bytes == 256 * 2048 * hidden * 2
    assert plan.modes["streaming"].host_peak_bytes < plan.modes["one_pass"].host_peak_bytes


def test_streaming_counts_one_blocks_jobs_at_once(model_dir):
    """One pass may run the two widest statistics of the model at once (two cores): two blocks' ``down_proj`` inputs
    here. Streaming decomposes one block at a time, whose statistics hold one ``down_proj`` input: its ``D`` is that
    job beside the block's next largest."""
    from transformers import AutoConfig

    from corda_fast.memory_plan import _jobs, _meta_model

    plan = corda_fast.plan_memory(model_dir, samples=6, seq_len=16, batch_size=2, target_modules=TARGETS,
                                  device_memory=0, host_memory=2**34, threads=2)
    meta = _meta_model(AutoConfig.from_pretrained(model_dir))
    targets = corda_fast.stages.resolve_targets(meta, corda_fast.LoraSpec(target_modules=TARGETS))
    jobs = _jobs(targets, plus=False)
    down = [cost for key, cost in jobs.items() if "down_proj" in key]
    rest = [cost for key, cost in jobs.items() if "down_proj" not in key]
    assert len(down) == 3 and len(set(down)) == 1 and max(rest) < down[0]  # three blocks, the MLP input widest
    assert plan.decomposition_bytes == 2 * down[0]
    assert plan.block_decomposition_bytes == down[0] + max(rest)
    assert plan.modes["streaming"].host_peak_bytes < plan.modes["one_pass"].host_peak_bytes


EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.mark.parametrize("route_all", [False, True])
def test_expert_parameters_are_planned_as_calibration_keeps_them(tmp_path, route_all):
    """Routed experts: one statistic per expert and projection (or, with route_all_experts, one for all experts'
    first projection), sized as the real calibration's; CorDA++ and disk offload are refused with expert
    parameters, so they are not planned but say why."""
    from helpers import tiny_moe

    model = tiny_moe("qwen3_moe", experts=4)
    model.save_pretrained(tmp_path)
    plan = corda_fast.plan_memory(str(tmp_path), samples=6, seq_len=16, batch_size=2, target_parameters=EXPERT_PARAMS,
                                  route_all_experts=route_all, rank=2, device_memory=0, host_memory=2**34)
    setup = Setup(target_parameters=EXPERT_PARAMS, rank=2, route_all_experts=route_all)
    stats = corda_fast.stages.collect_covariance(model, padded_batches(random_samples(6), 2), *setup.stage)
    assert plan.statistics_bytes == stats.nbytes()
    assert len(stats.sums) == 2 * (5 if route_all else 8)  # 2 blocks: 4 down (+ 4 up, or 1 shared)
    assert plan.targeted_bytes == sum(p.numel() * 4 for n, p in model.named_parameters()
                                      if n.endswith(("experts.gate_up_proj", "experts.down_proj")))
    assert plan.block_statistics_bytes * 2 == plan.statistics_bytes  # two equal blocks
    for mode in ("plus", "plus_streaming", "disk_offload", "disk_offload_one_pass", "disk_offload_plus"):
        m = plan.modes[mode]
        assert not m.available and not m.fits and m.host_peak_bytes is None and m.why_not
    assert plan.modes["streaming"].available and plan.modes["streaming"].fits
    assert "n/a: CorDA++ is refused" in plan.table()


def test_plan_and_init_take_expert_flags(tmp_path, capsys):
    from helpers import tiny_moe

    d = tmp_path / "moe"
    tiny_model_dir(d, tiny_moe("qwen3_moe", experts=4))
    base = ["--model", str(d), "--target-parameters", *EXPERT_PARAMS, "--samples", "4", "--seq-len", "16",
            "--batch-size", "2", "--rank", "2"]
    assert cli.main(["plan", *base, "--json", "--host-memory", "64GiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    routed = out["statistics_bytes"]
    assert out["modes"]["one_pass"]["fits"] and out["modes"]["plus"]["host_peak_bytes"] is None
    assert cli.main(["plan", *base, "--json", "--route-all-experts", "--host-memory", "64GiB"]) == 0
    assert json.loads(capsys.readouterr().out)["statistics_bytes"] < routed  # one first-projection statistic
    assert cli.main(["plan", *base, "--method", "corda++"]) == 0
    assert "runs 'plus': cannot run (CorDA++ is refused" in capsys.readouterr().out
    data = tmp_path / "data.txt"
    from corda_fast import demo

    data.write_text(" ".join(demo.builtin_text().split()[:2000]))
    init = ["init", *base, "--data", str(data), "--concatenate", "--out", str(tmp_path / "out"), "--quiet"]
    assert cli.main(init + ["--host-memory", "64KiB"]) == 1  # planned (the experts counted), and refused
    assert "does NOT fit" in capsys.readouterr().err


def test_a_vision_language_model_plans_one_pass_and_says_why_it_cannot_stream(tmp_path):
    from test_vlm import tiny_llava, vlm_batches

    model, processor = tiny_llava()
    model.save_pretrained(tmp_path)
    plan = corda_fast.plan_memory(str(tmp_path), samples=6, seq_len=16, batch_size=3, rank=2, device_memory=0,
                                  host_memory=2**34)
    setup = Setup(rank=2)
    stats = corda_fast.stages.collect_covariance(model, vlm_batches(processor), *setup.stage)
    assert plan.statistics_bytes == stats.nbytes(), "vision tower, projector and language model, shared as calibrated"
    for mode in ("one_pass", "plus", "disk_offload_one_pass", "disk_offload_plus"):
        assert plan.modes[mode].available and plan.modes[mode].fits
    for mode in ("streaming", "plus_streaming", "onloading", "disk_offload", "disk_offload_plus_streaming"):
        m = plan.modes[mode]
        assert not m.available and "one list of blocks" in m.why_not and "language_model" in m.why_not
    lm = corda_fast.plan_memory(str(tmp_path), samples=6, seq_len=16, batch_size=3, rank=2, device_memory=0,
                                host_memory=2**34, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)")
    assert lm.modes["streaming"].available and lm.blocks == 2  # the language model's targets alone stream


def test_a_dispatched_model_is_planned_as_it_will_run(model_dir):
    """A model accelerate dispatched runs in one pass through its hooks unless streaming: each of CorDA's and
    CorDA++'s runs beside the host budget, one layer's weight and the checkpoint pages."""
    kw = dict(samples=64, seq_len=64, batch_size=8, target_modules=TARGETS, device_memory=0, host_memory=2**40,
              candidates=2, threads=1)
    plan = corda_fast.plan_memory(model_dir, **kw)
    h = {k: v.host_peak_bytes for k, v in plan.modes.items()}
    # the same run's own terms, model in memory or dispatched: P + O against M + F + W_l + O_d
    assert h["one_pass"] - h["disk_offload_one_pass"] == h["plus"] - h["disk_offload_plus"]
    assert h["streaming"] - h["disk_offload"] == h["plus_streaming"] - h["disk_offload_plus_streaming"]
    assert h["disk_offload_one_pass"] - h["disk_offload"] > plan.statistics_bytes - plan.block_statistics_bytes - \
        plan.inputs_bytes
    assert mode_of(False, False, False, True) == "disk_offload_one_pass"
    assert mode_of(True, False, False, True) == "disk_offload"
    assert mode_of(False, True, False, True) == "disk_offload_plus"
    assert mode_of(True, True, False, True) == "disk_offload_plus_streaming"


def test_the_shipped_moe_example_plans_its_experts():
    """Qwen3-30B-A3B's published shapes: 128 experts a block, each expert's two projections with a statistic of its
    own (the routed tokens), or one statistic for all first projections with route_all_experts."""
    import os

    d = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "qwen3-30b-a3b")
    kw = dict(samples=256, seq_len=2048, dtype="bfloat16", device_memory=0, host_memory=2**40,
              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], target_parameters=EXPERT_PARAMS)
    plan = corda_fast.plan_memory(d, **kw)
    assert abs(plan.params_bytes / 2 - 30.5e9) < 0.01 * 30.5e9  # the published parameter count
    attention = 2048**2 + 4096**2  # q/k/v read the hidden state; o_proj the 32 heads x 128
    assert plan.block_statistics_bytes == 4 * (attention + 128 * (2048**2 + 768**2))
    assert plan.statistics_bytes == 48 * plan.block_statistics_bytes
    shared = corda_fast.plan_memory(d, route_all_experts=True, **kw)
    assert plan.statistics_bytes - shared.statistics_bytes == 4 * 48 * 127 * 2048**2
    assert plan.modes["streaming"].host_peak_bytes < plan.modes["one_pass"].host_peak_bytes / 2


def test_one_pass_counts_the_statistics_still_held_when_each_job_starts(model_dir, monkeypatch):
    """One pass decomposes the narrowest statistics first and drops each once its damped copy exists: the planner's
    peak is, over the jobs, the statistics still held when a job starts beside the jobs running. Checked against
    the statistics a real decomposition still holds as each job starts (one job at a time)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from corda_fast import decompose as dec
    from corda_fast.memory_plan import _jobs, _meta_model, _one_pass_decomposition, _statistic_key

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    setup = Setup(target_modules=TARGETS)
    stats = corda_fast.stages.collect_covariance(model, padded_batches(random_samples(6), 2), *setup.stage)
    targets = corda_fast.stages.resolve_targets(model, setup.lora)
    held_at_start, real = [], dec._damped_covariance

    def spy(stats_, key, names, *a, **k):
        held_at_start.append((names[0], stats_.nbytes()))
        return real(stats_, key, names, *a, **k)

    monkeypatch.setattr(dec, "_damped_covariance", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dec.decompose(stats, targets, setup.corda, release=True)
    finally:
        torch.set_num_threads(threads)
    assert not stats.sums  # every statistic dropped once used
    meta = _meta_model(AutoConfig.from_pretrained(model_dir))
    meta_targets = corda_fast.stages.resolve_targets(meta, setup.lora)
    key_of = {t.name: _statistic_key(t) for t in meta_targets}
    jobs = _jobs(meta_targets, plus=False)
    want = max(held + jobs[key_of[name]] for name, held in held_at_start)
    assert _one_pass_decomposition(meta_targets, 1, 4) == want
    held = [h for _, h in held_at_start]
    assert held[0] == corda_fast.plan_memory(
        model_dir, target_modules=TARGETS, device_memory=0, host_memory=2**34).statistics_bytes
    plan = corda_fast.plan_memory(model_dir, samples=2, seq_len=8, batch_size=1, target_modules=TARGETS,
                                  device_memory=0, host_memory=2**34, threads=2)
    s, d = plan.statistics_bytes, plan.decomposition_bytes
    peak = plan.modes["one_pass"].host_peak_bytes - plan.modes["one_pass"].terms["O"] - plan.params_bytes
    assert s < peak < s + d  # the widest jobs run once the narrow statistics are gone


def test_a_folder_without_config_json_is_planned_from_its_one_gguf_file_or_refused_by_name(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json and no .gguf file"):
        corda_fast.plan_memory(str(tmp_path / "empty"))
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"several .gguf files \['a.gguf', 'b.gguf'\]: name one"):
        corda_fast.plan_memory(str(two))
    with pytest.raises(ValueError, match="gguf_file 'c.gguf' is not in model folder"):
        corda_fast.plan_memory(str(two), gguf_file="c.gguf")
    assert cli.main(["plan", "--model", str(tmp_path / "empty")]) == 1
    assert "has neither a config.json nor a .gguf file to plan from" in capsys.readouterr().err


def test_disk_offload_is_planned_where_accelerate_will_put_each_module(tmp_path):
    """The host share of a dispatched model is accelerate's own placement under the budget (whole modules: a budget
    is an upper bound), and the residual store holds the targeted weights it leaves on disk."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama(layers=6)
    model.save_pretrained(tmp_path / "m")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = int(size * 0.3)
    plan = corda_fast.plan_memory(str(tmp_path / "m"), samples=4, seq_len=16, batch_size=2, target_modules=TARGETS,
                                  max_memory={"cpu": budget}, device_memory=0, host_memory=2**40)
    dispatched = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map="auto", max_memory={"cpu": budget},
                                                      offload_folder=str(tmp_path / "offload"))
    on_host = sum(p.numel() * 4 for p in dispatched.parameters() if p.device.type == "cpu")
    assert 0 < on_host < budget  # whole modules: less than the budget
    disk = {n for n, d in dispatched.hf_device_map.items() if d == "disk"}
    targets = corda_fast.stages.resolve_targets(tiny_llama(layers=6), corda_fast.LoraSpec(target_modules=TARGETS))
    on_disk = sum(t.d_in * t.d_out * 4 for t in targets if any(t.name.startswith(m + ".") for m in disk))
    assert plan.modes["disk_offload"].disk_bytes == on_disk > 0
    assert plan.modes["disk_offload"].terms["M"] == on_host and plan.modes["disk_offload"].terms["G"] == 0
    streaming = plan.modes["disk_offload"]
    f = int(corda_fast.memory_plan.DISK_PAGE_SHARE * (plan.params_bytes - on_host))
    block = plan.block_bytes
    # M + F + S_b + A + W_b + D_b with M the host share accelerate chose
    assert streaming.host_peak_bytes == on_host + f + plan.block_statistics_bytes + plan.inputs_bytes + block + \
        plan.block_decomposition_bytes + corda_fast.memory_plan.DISK_OVERHEAD
