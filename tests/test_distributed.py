"""Data-parallel calibration: 2 gloo processes under torchrun give what one process gives on the union of the data;
a rank that fails takes the job down cleanly, without a hang."""

import os
import subprocess
import sys
import time

import pytest
import torch

import corda_fast
from corda_fast.decompose import _owners
from corda_fast.distributed import PaddingFilter

from helpers import Setup, init, padded_batches, random_samples, rel_max, tiny_llama, tiny_model_dir

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = [pytest.mark.distributed, pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available")]


def launch(launcher, args, timeout=240):
    """Run ``python -m <launcher> ...args`` with 2 processes of one thread each; ``(completed process, seconds)``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m"] + launcher + args, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.perf_counter() - t


TORCHRUN = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ACCELERATE = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]


def torchrun(out, case, timeout=240):
    return launch(TORCHRUN, [os.path.join(HERE, "dist_worker.py"), str(out), case], timeout)


def single_process(n, bs, seed, reverse=False, **kw):
    samples = random_samples(n, seed=seed)
    pm = init(tiny_llama(hidden=64), padded_batches(samples[::-1] if reverse else samples, bs),
                                  rank=4,
                                  mode=kw.pop("mode", "kpm"), **kw)
    return {k: v.detach() for k, v in pm.state_dict().items() if "lora_" in k or k.endswith("base_layer.weight")}



@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc, _ = torchrun(out, "results")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _reference(name):
    import dist_worker

    if name == "sampler":  # 7 samples; the sampler's padding repeat of sample 0 must not count twice
        return 7, 2, 12, {}
    n, bs, kw = dist_worker.SCENARIOS[name]
    return n, bs, 11, {k: v for k, v in kw.items() if k != "streaming"}


@pytest.mark.parametrize("name", ["uneven", "one_rank_empty", "sampler"])
def test_two_rank_statistics_equal_one_process_on_the_union(two_rank_results, name):
    s0 = torch.load(two_rank_results / f"{name}_stats_rank0.pt")
    s1 = torch.load(two_rank_results / f"{name}_stats_rank1.pt")
    n, bs, seed, _ = _reference(name)
    ref = corda_fast.stages.collect_covariance(tiny_llama(hidden=64), padded_batches(random_samples(n, seed=seed), bs),
                                        *Setup().stage)
    assert s0["members"] == ref.members and s0["n_samples"] == ref.n_samples == s1["n_samples"]
    assert s0["n_tokens"] == ref.n_tokens and sum(ref.n_samples.values()) == n * len(ref.sums)
    for k, total in ref.sums.items():
        assert torch.equal(s0["sums"][k], s1["sums"][k])
        assert rel_max(s0["sums"][k], total) < 1e-6, k  # float32 sums, another summation order


def test_two_rank_expert_statistics_are_summed_per_expert(two_rank_results):
    import dist_worker

    from helpers import tiny_moe

    s0 = torch.load(two_rank_results / "experts_stats_rank0.pt")
    s1 = torch.load(two_rank_results / "experts_stats_rank1.pt")
    ref = corda_fast.stages.collect_covariance(tiny_moe("qwen3_moe"), padded_batches(random_samples(9, seed=15), 2),
                                               *Setup(**dist_worker.EXPERTS).stage)
    assert s0["members"] == ref.members and s0["n_tokens"] == ref.n_tokens == s1["n_tokens"]
    assert s0["n_samples"] == ref.n_samples and len(ref.sums) == 16
    for k, total in ref.sums.items():
        assert torch.equal(s0["sums"][k], s1["sums"][k])
        assert rel_max(s0["sums"][k], total) < 1e-5, k


@pytest.mark.parametrize("name", ["uneven", "streaming", "one_rank_empty", "ipm_fp64", "sampler"])
def test_two_rank_adapters_equal_one_process_on_the_union(two_rank_results, name):
    r0 = torch.load(two_rank_results / f"{name}_rank0.pt")
    r1 = torch.load(two_rank_results / f"{name}_rank1.pt")
    assert r0.keys() == r1.keys() and len(r0) == 2 * 14 + 14
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "the ranks ended with different models"
    n, bs, seed, kw = _reference(name)
    ref = single_process(n, bs, seed=seed, **kw)

    def errors(got):
        out = {}
        for k in got:  # B·A (raw factors have arbitrary signs) and the residual
            if "lora_A" in k:
                kb = k.replace("lora_A", "lora_B")
                out[k] = rel_max(got[kb] @ got[k], ref[kb] @ ref[k])
            elif k.endswith("base_layer.weight"):
                out[k] = rel_max(got[k], ref[k])
        return out

    err = errors(r0)
    if kw.get("precision") == "float64":
        # float64 statistics and decomposition: the summation order no longer matters; what is left is the
        # float32 storage of the factors and the residual (the model's dtype)
        assert max(err.values()) < 1e-6, max(err.items(), key=lambda kv: kv[1])
    else:
        # float32: the statistics differ from one process's in the last bits (test above), which the KPM
        # decomposition of near-degenerate smallest components amplifies. Bound: the same data in another
        # order on ONE process moves the result as much.
        reordered = single_process(n, bs, seed=seed, reverse=True, **kw)
        own = errors(reordered)
        for k, e in err.items():
            assert e < max(10 * own[k], 1e-6), (k, e, own[k])


def test_two_rank_corda_plus_plus_equals_one_process(two_rank_results):
    r0 = torch.load(two_rank_results / "plus_rank0.pt")
    r1 = torch.load(two_rank_results / "plus_rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    samples = random_samples(8, seed=13)
    ordered = samples[0::2] + samples[1::2]  # rank 0's shard, then rank 1's: the same candidate groups
    pm = init(tiny_llama(hidden=64), padded_batches(ordered, 2), rank=4, mode="kpm",
                                  plus=True, candidates=2,
                                  precision="float64")
    ref = {k: v.detach() for k, v in pm.state_dict().items() if "lora_" in k or k.endswith("base_layer.weight")}
    assert r0.keys() == ref.keys()
    ranks = {k: v.shape[0] for k, v in ref.items() if "lora_A" in k}
    assert {k: r0[k].shape[0] for k in ranks} == ranks and len(set(ranks.values())) > 1  # same non-uniform ranks
    for k in ranks:
        kb = k.replace("lora_A", "lora_B")
        assert rel_max(r0[kb] @ r0[k], ref[kb] @ ref[k]) < 1e-6, k


def test_accelerate_launch_equals_one_process(tmp_path):
    proc, _ = launch(ACCELERATE, [os.path.join(HERE, "dist_worker.py"), str(tmp_path), "accelerate"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "accelerate_rank0.pt")
    r1 = torch.load(tmp_path / "accelerate_rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    ref = single_process(9, 2, seed=11)
    own = single_process(9, 2, seed=11, reverse=True)
    for k in r0:
        if "lora_A" in k:
            kb = k.replace("lora_A", "lora_B")
            err = rel_max(r0[kb] @ r0[k], ref[kb] @ ref[k])
            assert err < max(10 * rel_max(own[kb] @ own[k], ref[kb] @ ref[k]), 1e-6), k


def test_sampler_padding_counts_are_what_one_process_sees():
    # the repeat is really there: without the filter the statistic differs
    from torch.utils.data import DistributedSampler

    samples = list(range(7))
    s1 = DistributedSampler(samples, num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=False)
    idx = list(s1)
    f = PaddingFilter(7, rank=1, world=2)
    rep = f.repeated(len(idx))
    assert rep.tolist() == [False, False, False, True]
    s0 = DistributedSampler(samples, num_replicas=2, rank=0, shuffle=True, seed=3, drop_last=False)
    kept = list(s0) + [i for i, r in zip(idx, rep) if not r]
    assert sorted(kept) == samples  # the filtered union is the dataset, once


def test_owner_assignment_balances_cost():
    from corda_fast.stats import CovarianceStats

    sums = {f"k{i}": torch.zeros(d, d) for i, d in enumerate([64, 64, 32, 32, 16, 128])}
    stats = CovarianceStats(sums, {k: 1 for k in sums}, {k: 1 for k in sums}, {k: [k] for k in sums}, "peft", "x")
    owner = _owners(stats, [], 2)
    assert set(owner.values()) == {0, 1} and owner["k5"] != owner["k0"]
    load = [sum(sums[k].shape[0] ** 3 for k in owner if owner[k] == r) for r in (0, 1)]
    assert max(load) == 128 ** 3  # the biggest alone, everything else on the other rank


@pytest.mark.parametrize("case", ["fail", "die"])
def test_a_failing_rank_fails_the_job_cleanly(tmp_path, case):
    proc, seconds = torchrun(tmp_path, case, timeout=180)
    assert proc.returncode != 0
    assert seconds < 120  # the process group timeout (60 s) is the backstop; a clean failure is much faster
    if case == "fail":
        out = proc.stdout
        assert "rank 1 raised RuntimeError: simulated data error on rank 1 | model unchanged: True" in out
        assert "rank 0 raised DistributedError: calibration failed on 1 of 2 ranks (rank 1: RuntimeError: " \
               "simulated data error on rank 1)" in out and "rank 0" in out and "model unchanged: True" in out


def test_distributed_true_without_process_group_is_a_clear_error():
    model = tiny_llama(hidden=64)
    with pytest.raises(corda_fast.distributed.DistributedError, match="init_process_group"):
        init(model, padded_batches(random_samples(2), 2), rank=4, distributed=True)


def test_a_cache_written_by_two_ranks_is_accepted_by_one_process_on_the_same_data(two_rank_results):
    """The data fingerprint is independent of how samples were split over ranks, batched and ordered."""
    _, report = init(tiny_llama(hidden=64), padded_batches(random_samples(9, seed=14), 3), rank=4, mode="kpm",
                     covariance_cache=str(two_rank_results / "cov.safetensors"), return_report=True)
    assert report.cache_hit
    with pytest.raises(corda_fast.CacheError, match="other calibration data"):
        init(tiny_llama(hidden=64), padded_batches(random_samples(8, seed=14), 3), rank=4, mode="kpm",
             covariance_cache=str(two_rank_results / "cov.safetensors"))


def test_shard_is_strided_and_uneven():
    items = list(range(7))
    assert corda_fast.distributed.shard(items, 0, 3) == [0, 3, 6]
    assert corda_fast.distributed.shard(items, 2, 3) == [2, 5]
    assert sorted(sum((corda_fast.distributed.shard(items, r, 3) for r in range(3)), [])) == items


def test_cli_distributed_mode_equals_one_process(tmp_path):
    """``torchrun -m corda_fast init --distributed``: rank 0 writes what one process writes (float64 statistics and
    decomposition, so only the storage rounding differs)."""
    import json

    from safetensors.torch import load_file

    from corda_fast import cli, demo

    model = tiny_model_dir(tmp_path / "model")
    data = tmp_path / "calib.txt"
    data.write_text(" ".join(demo.builtin_text().split()[:3000]))
    common = ["init", "--model", str(model), "--data", str(data), "--mode", "kpm", "--rank", "4", "--samples", "7",
              "--seq-len", "32", "--batch-size", "2", "--concatenate", "--precision", "float64", "--quiet"]
    proc, _ = launch(TORCHRUN, ["-m", "corda_fast"] + common + ["--distributed", "--out", str(tmp_path / "dist")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cli.main(common + ["--out", str(tmp_path / "one")]) == 0
    report = json.loads((tmp_path / "dist" / "corda_report.json").read_text())
    assert report["calibration"]["ranks"] == 2 and report["calibration"]["samples"] == 7
    assert report["drift_at_init"]["relative"] < 1e-5
    got = load_file(tmp_path / "dist" / "initial_adapter" / "adapter_model.safetensors")
    ref = load_file(tmp_path / "one" / "initial_adapter" / "adapter_model.safetensors")
    assert got.keys() == ref.keys() and len(got) == 28
    for k in got:
        if "lora_A" in k:
            kb = k.replace("lora_A", "lora_B")
            assert rel_max(got[kb] @ got[k], ref[kb] @ ref[k]) < 1e-6, k
