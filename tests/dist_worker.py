"""One rank of the distributed tests, launched by tests/test_distributed.py under torchrun (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT_DIR CASE

CASE ``results``: several scenarios in one process group, each rank saving its adapted model's tensors to
``OUT_DIR/<scenario>_rank<r>.pt`` for the test to compare with one process on the union of the data.
CASE ``fail``: rank 1's loader raises on its second batch; CASE ``die``: rank 1 exits hard mid-calibration.
"""

import os
import sys
from datetime import timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import corda_fast  # noqa: E402

from helpers import Setup, init, padded_batches, random_samples, tiny_llama, tiny_moe  # noqa: E402

EXPERTS = {"target_modules": [], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}

SCENARIOS = {
    # name: (number of samples, batch size, init_adapters kwargs)
    "uneven": (9, 2, {}),  # 5 and 4 samples: 3 and 2 batches
    "streaming": (9, 2, {"streaming": True}),
    "one_rank_empty": (1, 2, {}),  # rank 1 has no batch at all
    "ipm_fp64": (7, 3, {"mode": "ipm", "precision": "float64"}),
}


def adapted_tensors(peft_model) -> dict:
    return {k: v.detach().clone() for k, v in peft_model.state_dict().items()
            if "lora_" in k or k.endswith("base_layer.weight")}


def stats_dict(stats) -> dict:
    return {"sums": stats.sums, "n_samples": stats.n_samples, "n_tokens": stats.n_tokens, "members": stats.members}


def sampler_loader(samples, rank, world):
    """A DataLoader over a DistributedSampler that pads 7 samples to 8 (rank 1 gets a repeat of sample 0)."""
    from torch.utils.data import DataLoader, DistributedSampler

    from corda_fast import pad_batches

    sampler = DistributedSampler(samples, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
    return DataLoader(samples, batch_size=2, sampler=sampler, collate_fn=lambda b: pad_batches(b, len(b))[0])


def main():
    out, case = sys.argv[1], sys.argv[2]
    if case == "accelerate":  # launched by `accelerate launch`: Accelerator sets up the process group
        from accelerate import Accelerator

        Accelerator(cpu=True)
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    if case == "accelerate":
        n, bs, _ = SCENARIOS["uneven"]
        batches = padded_batches(corda_fast.distributed.shard(random_samples(n, seed=11)), bs)
        pm = init(tiny_llama(hidden=64), batches, rank=4, mode="kpm")
        torch.save(adapted_tensors(pm), os.path.join(out, f"accelerate_rank{rank}.pt"))
    elif case == "results":
        for name, (n, bs, kw) in SCENARIOS.items():
            samples = corda_fast.distributed.shard(random_samples(n, seed=11))
            batches = padded_batches(samples, bs) if samples else []
            pm = init(tiny_llama(hidden=64), batches, rank=4, mode=kw.pop("mode", "kpm"),
                                          **kw)
            torch.save(adapted_tensors(pm), os.path.join(out, f"{name}_rank{rank}.pt"))
            if not kw:  # the reduced statistics themselves
                stats = corda_fast.stages.collect_covariance(tiny_llama(hidden=64), batches,
                                                      *Setup().stage)
                torch.save(stats_dict(stats), os.path.join(out, f"{name}_stats_rank{rank}.pt"))
        # CorDA++: 8 samples, 2 batches per rank; candidate group = local batch index mod 2, which is what one
        # process gets from rank 0's batches followed by rank 1's
        batches = padded_batches(corda_fast.distributed.shard(random_samples(8, seed=13)), 2)
        pm = init(tiny_llama(hidden=64), batches, rank=4, mode="kpm", plus=True,
                                      candidates=2, precision="float64")
        torch.save(adapted_tensors(pm), os.path.join(out, f"plus_rank{rank}.pt"))
        # a cache written by two ranks: rank 0 writes; one process with the same data must accept it
        init(tiny_llama(hidden=64), padded_batches(corda_fast.distributed.shard(random_samples(9, seed=14)), 2),
             rank=4, mode="kpm", covariance_cache=os.path.join(out, "cov.safetensors"))
        loader = sampler_loader(random_samples(7, seed=12), rank, world)
        pm = init(tiny_llama(hidden=64), loader, rank=4, mode="kpm")
        torch.save(adapted_tensors(pm), os.path.join(out, f"sampler_rank{rank}.pt"))
        stats = corda_fast.stages.collect_covariance(tiny_llama(hidden=64), sampler_loader(random_samples(7, seed=12), rank,
                                                                                    world),
                                              *Setup().stage)
        torch.save(stats_dict(stats), os.path.join(out, f"sampler_stats_rank{rank}.pt"))
        # expert statistics: summed per expert over ranks (an expert one rank never routed to included)
        stats = corda_fast.stages.collect_covariance(
            tiny_moe("qwen3_moe"), padded_batches(corda_fast.distributed.shard(random_samples(9, seed=15)), 2),
            *Setup(**EXPERTS).stage)
        torch.save(stats_dict(stats), os.path.join(out, f"experts_stats_rank{rank}.pt"))
    elif case in ("fail", "die"):
        samples = corda_fast.distributed.shard(random_samples(8, seed=11))

        def loader():
            for i, b in enumerate(padded_batches(samples, 1)):
                if rank == 1 and i == 1:
                    if case == "die":
                        os._exit(3)
                    raise RuntimeError("simulated data error on rank 1")
                yield b

        model = tiny_llama(hidden=64)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            init(model, loader(), rank=4)
        except Exception as exc:
            unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
            print(f"rank {rank} raised {type(exc).__name__}: {exc} | model unchanged: {unchanged}", flush=True)
            dist.destroy_process_group()
            sys.exit(2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
