"""Numeric ops against float64 references (odd shapes, strided inputs, zero weights)."""

import pytest
import torch

from corda_fast import ops

from helpers import rel


@pytest.mark.parametrize("d", [1, 3, 97, 129, 700])
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_xtx_accumulate_matches_float64(d, tokens, dtype):
    x = torch.randn(tokens, 2 * d)[:, ::2].to(dtype)  # strided input
    w = torch.rand(tokens) + 0.1
    w[0] = 0.0  # a zero-weight row (padding)
    acc = torch.randn(d, d)
    acc = acc + acc.T  # non-zero start: accumulation, not assignment
    start = acc.clone()
    ops.xtx_accumulate(acc, x, w)
    ops.xtx_accumulate(acc, x, w)
    got = ops.symmetrize(acc)
    xd = x.double() * w.double().unsqueeze(1)
    ref = start.double() + 2 * xd.T @ xd
    assert torch.allclose(got, got.T)
    assert rel(got, ref) < 1e-6


def test_sample_scales_signed_max_quirk():
    x = torch.tensor([[-5.0, 1.0], [2.0, -3.0], [-1.0, -4.0]])
    sample = torch.tensor([0, 0, 1])
    peft = ops.sample_scales(x, sample, 2, "peft")
    assert torch.allclose(peft, torch.tensor([1 / 2.0, 1 / 2.0, 1 / 1.0]))  # |max| = 2 and |-1| = 1
    absmax = ops.sample_scales(x, sample, 2, "absmax")
    assert torch.allclose(absmax, torch.tensor([1 / 5.0, 1 / 5.0, 1 / 4.0]))
    assert torch.equal(ops.sample_scales(x, sample, 2, "none"), torch.ones(3))


def test_one_variable_chooses_every_kernel(monkeypatch):
    from corda_fast.ops import registry

    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    ops_ = list(ops.describe())
    assert ops_ == ["xtx_accumulate", "damped_cholesky", "batched_decompose", "lowrank_gemm"] or \
        sorted(ops_) == sorted(["xtx_accumulate", "damped_cholesky", "batched_decompose", "lowrank_gemm"])
    assert all(registry.choose(op, "cpu") == "torch" for op in ops_)  # the reference is the CPU default
    monkeypatch.setenv(ops.BACKEND_ENV, "torch")
    assert all(registry.choose(op, "cuda") == "torch" for op in ops_)
    monkeypatch.setenv(ops.BACKEND_ENV, "warp-drive")
    with pytest.raises(ops.BackendError, match="warp-drive"):
        ops.xtx_accumulate(torch.zeros(2, 2), torch.ones(3, 2), torch.ones(3))
    # a listed kernel that an op does not have leaves that op automatic
    monkeypatch.setenv(ops.BACKEND_ENV, "native")
    assert registry.choose("xtx_accumulate", "cpu") == "torch"
    if registry.available()["native"]:
        assert registry.choose("damped_cholesky", "cpu") == "native"
    else:
        with pytest.raises(ops.BackendError, match="native"):
            registry.choose("damped_cholesky", "cpu")


OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck_every_op_reference():
    """Every public op: its schema, its fake implementation and its default (reference) kernel."""
    g = torch.Generator().manual_seed(3)
    acc = torch.zeros(9, 9)
    x = torch.randn(13, 9, generator=g)
    torch.library.opcheck(torch.ops.corda_fast.xtx_accumulate.default, (acc, x, torch.rand(13, generator=g)),
                          test_utils=OPCHECK)
    p, q, s, r = (torch.randn(*shape, generator=g) for shape in ((7, 5), (5, 6), (7, 3), (3, 6)))
    torch.library.opcheck(torch.ops.corda_fast.lowrank_gemm.default, (p, q, s, r, torch.randn(6, generator=g)),
                          test_utils=OPCHECK)
    m = torch.randn(2, 9, 30, generator=g, dtype=torch.float64)
    covs = m @ m.mT / 30
    probes = ops.damping_probes(9)
    torch.library.opcheck(torch.ops.corda_fast.damped_cholesky.default, (covs, probes, 0.01, 0.05, 40),
                          test_utils=OPCHECK)
    cf, chol, lam = torch.ops.corda_fast.damped_cholesky(covs, probes, 0.01, 0.05, 40)
    w = torch.randn(2, 5, 9, generator=g, dtype=torch.float64)
    for method in ("gram", "svd"):
        torch.library.opcheck(torch.ops.corda_fast.batched_decompose.default,
                              (w, cf, chol, torch.tensor([1.0, 2.0], dtype=torch.float64), 3, False, method),
                              test_utils=OPCHECK)


def test_reference_ops_agree_with_their_building_blocks():
    """The batched reference ops are the per-statistic functions the decomposition's CPU path calls."""
    g = torch.Generator().manual_seed(4)
    m = torch.randn(3, 11, 40, generator=g)
    covs = m @ m.mT / 40
    covs[2] = 0.0  # degenerate: flagged -1, not raised
    cf, chol, lam = ops.damped_cholesky(covs, ops.damping_probes(11), 0.01, 0.05, 40)
    for i in range(2):
        assert lam[i] == ops.find_damping(covs[i])
        assert torch.equal(cf[i], ops.damp(covs[i], float(lam[i])))
    assert lam[2] == -1.0
    w = torch.randn(2, 6, 11, generator=g)
    a, b, s = ops.batched_decompose(w, cf[:2], chol[:2], torch.tensor([0.5, 2.0], dtype=torch.float64), 4, True, "svd")
    for i, scaling in enumerate((0.5, 2.0)):
        a1, b1, s1 = ops.decompose_layer(w[i], chol[i], cf[i], 4, "ipm", scaling, "svd")
        assert torch.equal(a[i], a1) and torch.equal(b[i], b1) and torch.equal(s[i], s1)
