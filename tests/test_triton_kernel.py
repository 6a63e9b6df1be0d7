"""The Triton statistic kernel on CPU through the interpreter (TRITON_INTERPRET=1, set in conftest.py),
against a float64 reference; plus the kernel switch."""

import pytest
import torch

from corda_fast import ops
from corda_fast.ops.backends import triton as kernels  # this file tests the kernel itself (tiles, autotuner)

from helpers import Setup, rel

# Under the interpreter the kernel runs on CPU tensors; compiled, it needs CUDA tensors.
DEVICE = "cpu" if kernels.INTERPRETING else "cuda"
pytestmark = [pytest.mark.interpreter, pytest.mark.skipif(
    ops.why_not("xtx_accumulate", "triton", DEVICE) is not None, reason="triton cannot run here (no CUDA, no interpreter)")]

TOL = {torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6}  # 16-bit products are exact in fp32


def reference(start, x, scale):
    xd = x.double() * scale.double().unsqueeze(1)
    return start.double() + xd.T @ xd


@pytest.mark.parametrize("d", [1, 3, 129])
@pytest.mark.parametrize("tokens", [1, 7, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_float64(d, tokens, dtype):
    g = torch.Generator().manual_seed(d * 1000 + tokens)
    x = (torch.randn(tokens, d, generator=g) * 3).to(dtype)
    scale = torch.rand(tokens, generator=g) + 0.2
    scale[::3] = 0.0  # padded rows
    start = torch.randn(d, d, generator=g)
    start = start + start.T  # poisoned, non-zero accumulator: the kernel must add, not assign
    acc = start.clone().to(DEVICE)
    ops.xtx_accumulate(acc, x.to(DEVICE), scale.to(DEVICE), kernel="triton")
    got = ops.symmetrize(acc).cpu()
    ref = reference(start, x, scale)
    assert rel(got, ref) < TOL[dtype], rel(got, ref)


def test_strided_input_no_copy_needed():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 2 * 70, generator=g)
    x = base.to(DEVICE)[::2, ::2]  # both strides non-unit
    assert not x.is_contiguous()
    scale = torch.rand(x.shape[0], generator=g).to(DEVICE)
    acc = torch.zeros(70, 70, device=DEVICE)
    ops.xtx_accumulate(acc, x, scale, kernel="triton")
    assert rel(ops.symmetrize(acc).cpu(), reference(torch.zeros(70, 70), x.cpu(), scale.cpu())) < 1e-6


def test_only_upper_tiles_written():
    x = torch.randn(50, 130, device=DEVICE)
    acc = torch.full((130, 130), 7.0, device=DEVICE)
    ops.xtx_accumulate(acc, x, torch.ones(50, device=DEVICE), kernel="triton")
    block = kernels._config(130, 50)[0]
    assert torch.equal(acc[block:, :block].cpu(), torch.full((130 - block, block), 7.0))  # below-diagonal tile untouched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the op's Triton kernel is registered for CUDA")
def test_opcheck_cuda_kernel():
    x = torch.randn(40, 20, device="cuda")
    acc = torch.zeros(20, 20, device="cuda")
    torch.library.opcheck(torch.ops.corda_fast.xtx_accumulate.default, (acc, x, torch.rand(40, device="cuda")),
                          test_utils=("test_schema", "test_faketensor"))


def test_forced_triton_backend_through_calibration(monkeypatch, llama):
    import corda_fast

    from helpers import padded_batches, random_samples

    llama = llama.to(DEVICE)
    batches = padded_batches(random_samples(3, lo=4, hi=9), 3, side="left")
    cfg = Setup(target_modules=["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"],
)
    ref = corda_fast.stages.collect_covariance(llama, batches, *cfg.stage)
    monkeypatch.setenv(ops.BACKEND_ENV, "triton")
    got = corda_fast.stages.collect_covariance(llama, batches, *cfg.stage)
    assert got.meta["backend"] == "triton" and ref.meta["backend"] == "torch"
    for k in ref.sums:
        assert rel(got.covariance(k), ref.covariance(k)) < 1e-6
    with pytest.raises(ops.BackendError, match="float32"):
        corda_fast.stages.collect_covariance(llama, batches, cfg.corda.replace(precision="float64"), cfg.lora)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_backend_on_cuda_is_triton(llama):
    import corda_fast

    from helpers import padded_batches, random_samples

    batches = padded_batches(random_samples(4), 2)
    cfg = Setup()
    cpu = corda_fast.stages.collect_covariance(llama, batches, *cfg.stage)
    gpu = corda_fast.stages.collect_covariance(llama.cuda(), batches, *cfg.stage)
    assert gpu.meta["backend"] == "triton"
    for k in cpu.sums:
        assert rel(gpu.covariance(k).cpu(), cpu.covariance(k)) < 1e-5  # different GPU/CPU forward rounding


@pytest.mark.skipif(not kernels.INTERPRETING, reason="exercises the autotuner with a stand-in timer (interpreter)")
def test_autotuning_trials_do_not_add_into_the_accumulator():
    """The autotuner launches every candidate tile shape on the real accumulator; restore_value must undo them,
    so the statistic is added exactly once (a stand-in timer replaces the GPU benchmarker on CPU)."""
    import itertools

    import triton

    ticks = itertools.count()

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        t = float(next(ticks) % 3 + 1)
        return [t, t, t]

    kernel = triton.autotune(configs=kernels._xtx_configs(True), key=["d"], restore_value=["acc_ptr"],
                             do_bench=fake_bench)(kernels._xtx_tile_kernel)
    x, s, acc = torch.randn(100, 70), torch.rand(100), torch.ones(70, 70)
    kernel[lambda m: (triton.cdiv(70, m["BLOCK"]), triton.cdiv(70, m["BLOCK"]))](
        x, s, acc, 100, 70, x.stride(0), x.stride(1), s.stride(0), acc.stride(0), acc.stride(1))
    assert next(ticks) == len(kernels._xtx_configs(True))  # every candidate was tried
    assert rel(ops.symmetrize(acc), reference(torch.ones(70, 70), x, s)) < 1e-6
