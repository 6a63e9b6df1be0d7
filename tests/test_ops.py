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


def test_forced_backend(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "torch")
    assert ops.active_backend() == "torch"
    monkeypatch.setenv(ops.BACKEND_ENV, "warp-drive")
    with pytest.raises(ops.BackendError, match="warp-drive"):
        ops.xtx_accumulate(torch.zeros(2, 2), torch.ones(3, 2), torch.ones(3))
