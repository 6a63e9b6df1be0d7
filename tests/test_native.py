"""The native kernels (csrc/, registered as the ``"native"`` backend of ``corda_fast::damped_cholesky`` and
``corda_fast::batched_decompose``): each against the float64 torch reference, output layout against the op's fake,
and decompose() through them. They are reached as any caller reaches them: ``ops.<op>(..., kernel="native")``.

Skipped only where the extension is not built; ``scripts/test.sh`` sets ``CORDA_FAST_REQUIRE_NATIVE=1`` when a
C++ compiler is present, so in CI a silently missing build fails instead of skipping.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import corda_fast
from corda_fast import DampingError
from corda_fast import ops as public_ops
from corda_fast.stages import find_damping

from helpers import Setup, padded_batches, random_samples, reference_factors, rel, tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HAVE_NATIVE = public_ops.available()["native"]
if os.environ.get("CORDA_FAST_REQUIRE_NATIVE") == "1" and not HAVE_NATIVE:
    raise RuntimeError(f"CORDA_FAST_REQUIRE_NATIVE=1 but the extension is not built: {public_ops.extension_status()}")
pytestmark = pytest.mark.skipif(not HAVE_NATIVE, reason=f"native extension {public_ops.extension_status()}")
NATIVE_CUDA = public_ops.why_not("batched_decompose", "native", "cuda") is None


class _Native:
    """The native kernels through the public ops, forced."""

    @staticmethod
    def damped_cholesky(*args):
        return public_ops.damped_cholesky(*args, kernel="native")

    @staticmethod
    def batched_decompose(*args):
        return public_ops.batched_decompose(*args, kernel="native")


ops = _Native()
PROBES = {}


def probes(d):
    if d not in PROBES:
        PROBES[d] = torch.randn(d, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    return PROBES[d]


def cov(d, tokens, seed=0, cond=None, dtype=torch.float64):
    """A fresh random covariance: from ``tokens`` samples (rank-deficient when tokens < d), or with a prescribed
    condition number."""
    g = torch.Generator().manual_seed(seed)
    if cond is not None:
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        return ((q * torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), d,
                                    dtype=torch.float64)) @ q.T).to(dtype)
    x = torch.randn(tokens, d, generator=g, dtype=torch.float64) * torch.linspace(0.05, 2.0, d, dtype=torch.float64)
    return (x.T @ x / tokens).to(dtype)


CASES = [(1, 5, None), (3, 7, None), (40, 200, None), (40, 10, None), (129, 1000, None), (64, None, 1e8),
         (50, None, 1e12), (64, None, 1e30)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("start", [0.01, 1e-9])
def test_damped_cholesky_matches_the_torch_rule(dtype, start):
    covs = [cov(d, t, seed=i, cond=c, dtype=dtype) for i, (d, t, c) in enumerate(CASES)]
    lams = []
    for c in covs:
        cf, chol, lam = ops.damped_cholesky(c.unsqueeze(0), probes(c.shape[0]), start, 0.05, 40)
        ref = find_damping(c, start=start)
        assert float(lam[0]) == ref
        lams.append(ref)
        ref_cf = c + torch.eye(c.shape[0], dtype=dtype) * (torch.diagonal(c).mean() * ref)
        assert cf.dtype == chol.dtype == dtype
        assert torch.equal(cf[0], ref_cf)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert rel(chol[0] @ chol[0].mT, ref_cf) < tol
    if start < 0.01:
        assert len(set(lams)) > 2  # several rounds of trials were needed, and differently per statistic
    # statistics of one size batched in one call give the same answers
    same = torch.stack([cov(40, t, seed=s, dtype=dtype) for s, t in enumerate((200, 10, 41, 39))]
                       + [cov(40, None, cond=c, dtype=dtype) for c in (1e8, 1e20, 1e30)])
    _, _, lam = ops.damped_cholesky(same, probes(40), start, 0.05, 40)
    assert lam.tolist() == [find_damping(c, start=start) for c in same]


def test_damped_cholesky_flags_degenerate_and_non_converging_statistics():
    good = cov(6, 30)
    zero = torch.zeros(6, 6, dtype=torch.float64)
    nan = good.clone()
    nan[2, 2] = float("nan")
    _, _, lam = ops.damped_cholesky(torch.stack([good, zero, nan]), probes(6), 0.01, 0.05, 40)
    assert float(lam[0]) == find_damping(good) and lam[1:].tolist() == [-1.0, -1.0]
    hard = cov(30, 3)  # rank 3 of 30
    _, _, lam = ops.damped_cholesky(hard.unsqueeze(0), probes(30), 1e-12, 1e-9, 2)
    assert lam.isnan().all()
    with pytest.raises(DampingError, match="did not converge after 2 doublings"):
        find_damping(hard, start=1e-12, tol=1e-9, max_iter=2)


@pytest.mark.parametrize("d_out,d_in", [(17, 29), (29, 17), (33, 33), (1, 3)])
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_batched_decompose_matches_float64_reference(d_out, d_in, mode, method):
    rank = min(3, d_out, d_in)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4 if method == "svd" else 1e-6)):
        cs = torch.stack([cov(d_in, 3 * d_in + 5, seed=s) for s in range(3)])
        ws = torch.randn(3, d_out, d_in, dtype=torch.float64)
        scaling = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
        work = torch.float64 if method == "gram" else dtype
        cf, chol, lam = ops.damped_cholesky(cs.to(work), probes(d_in), 0.01, 0.05, 40)
        a, b, s = ops.batched_decompose(ws.to(work), cf, chol, scaling, rank, mode == "ipm", method)
        assert a.shape == (3, rank, d_in) and b.shape == (3, d_out, rank) and s.shape == (3, rank)
        for i in range(3):
            d_ref, w_ref = reference_factors(ws[i], cs[i], rank, mode, float(scaling[i]), float(lam[i]))
            delta = float(scaling[i]) * b[i].double() @ a[i].double()
            assert rel(delta, d_ref) < tol, (dtype, i)
            # W_res relative to W (for a full-rank adapter W_res is ~0 and has no scale of its own)
            assert float((ws[i] - delta - w_ref).norm() / ws[i].norm()) < tol
            assert torch.all(s[i, :-1] >= s[i, 1:])


@pytest.mark.parametrize("case", ["cond1e8", "rank_deficient"])
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_kpm_smallest_as_accurate_as_ipm_largest(case, method):
    """Both modes' adapted parts within one bound of the float64 reference, on an ill-conditioned (1e8) and a
    rank-deficient (20 tokens, d = 48) covariance."""
    d_in, d_out, rank = 48, 40, 4
    c = cov(d_in, None, cond=1e8) if case == "cond1e8" else cov(d_in, 20, seed=3)
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    errs = {}
    cf, chol, lam = ops.damped_cholesky(c.unsqueeze(0), probes(d_in), 0.01, 0.05, 40)
    for mode in ("ipm", "kpm"):
        a, b, _ = ops.batched_decompose(w.unsqueeze(0), cf, chol, torch.ones(1, dtype=torch.float64), rank,
                                        mode == "ipm", method)
        d_ref, _ = reference_factors(w, c, rank, mode, 1.0, float(lam[0]))
        errs[mode] = rel(b[0] @ a[0], d_ref)
    assert errs["kpm"] < 1e-7 and errs["ipm"] < 1e-7, errs


def test_bad_arguments_raise_clear_errors():
    c = cov(5, 20).unsqueeze(0)
    with pytest.raises(RuntimeError, match="probes must be"):
        ops.damped_cholesky(c, probes(4), 0.01, 0.05, 40)
    with pytest.raises(RuntimeError, match=r"covs must be \(batch, d, d\)"):
        ops.damped_cholesky(c[0], probes(5), 0.01, 0.05, 40)
    cf, chol, _ = ops.damped_cholesky(c, probes(5), 0.01, 0.05, 40)
    w = torch.randn(1, 4, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="rank 9 is outside"):
        ops.batched_decompose(w, cf, chol, torch.ones(1, dtype=torch.float64), 9, True, "gram")
    with pytest.raises(RuntimeError, match="method must be"):
        ops.batched_decompose(w, cf, chol, torch.ones(1, dtype=torch.float64), 2, True, "qr")


def _layout(outputs):
    return [(tuple(t.shape), t.dtype, t.device.type) for t in outputs]


def test_native_outputs_match_the_ops_fake():
    """What the op's fake promises (torch.compile traces the op by it) is what the native kernel returns."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    c = torch.stack([cov(9, 40, seed=s) for s in range(2)])
    cf, chol, _ = ops.damped_cholesky(c, probes(9), 0.01, 0.05, 40)
    w = torch.randn(2, 7, 9, dtype=torch.float64)
    sc = torch.tensor([1.0, 0.5], dtype=torch.float64)
    got = [_layout(ops.damped_cholesky(c, probes(9), 0.01, 0.05, 40)),
           _layout(ops.batched_decompose(w, cf, chol, sc, 3, False, "gram"))]
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (c, probes(9), w, cf, chol, sc)]
        want = [_layout(torch.ops.corda_fast.damped_cholesky(fake[0], fake[1], 0.01, 0.05, 40)),
                _layout(torch.ops.corda_fast.batched_decompose(fake[2], fake[3], fake[4], fake[5], 3, False, "gram"))]
    assert got == want


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_decompose_native_equals_torch_path(mode, precision, monkeypatch):
    model = tiny_llama()
    cfg = Setup(mode=mode, rank=5, precision=precision)
    targets = corda_fast.stages.resolve_targets(model, cfg.lora)
    stats = corda_fast.stages.collect_covariance(model, padded_batches(random_samples(6), 3), cfg.corda, targets)
    monkeypatch.setenv("CORDA_FAST_BACKEND", "native")
    got = corda_fast.stages.decompose(stats, targets, cfg.corda)
    monkeypatch.setenv("CORDA_FAST_BACKEND", "torch")
    ref = corda_fast.stages.decompose(stats, targets, cfg.corda)
    assert list(got) == list(ref) == [t.name for t in targets]
    tol = 1e-10 if precision == "float64" else 1e-5
    for name in ref:
        assert got[name].damping == ref[name].damping and got[name].stat_key == ref[name].stat_key
        assert got[name].A.dtype == ref[name].A.dtype
        s = ref[name].scaling
        assert rel(s * got[name].B.double() @ got[name].A.double(), s * ref[name].B.double() @ ref[name].A.double()) < tol


def test_native_decompose_raises_like_the_torch_path(monkeypatch):
    model = tiny_llama()
    cfg = Setup(rank=2)
    targets = corda_fast.stages.resolve_targets(model, cfg.lora)
    stats = corda_fast.stages.collect_covariance(model, padded_batches(random_samples(4), 2), cfg.corda, targets)
    key = next(iter(stats.sums))
    stats.sums[key] = torch.zeros_like(stats.sums[key])
    monkeypatch.setenv("CORDA_FAST_BACKEND", "native")
    with pytest.raises(DampingError, match=r"mean diagonal 0\.0"):
        corda_fast.stages.decompose(stats, targets, cfg.corda)


def test_forced_native_kernel_that_cannot_run_raises(monkeypatch):
    from corda_fast.ops import BackendError, registry

    monkeypatch.setenv("CORDA_FAST_BACKEND", "maybe")
    with pytest.raises(BackendError, match="'maybe' is not a backend"):
        registry.choose("batched_decompose", "cpu")
    monkeypatch.setenv("CORDA_FAST_BACKEND", "native")
    assert registry.choose("batched_decompose", "cpu") == "native"
    if not NATIVE_CUDA:
        with pytest.raises(BackendError, match="not cuda"):
            registry.choose("batched_decompose", "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the public ops' native kernels are registered for CUDA")
def test_public_ops_on_cuda_run_the_native_kernels():
    c = torch.stack([cov(9, 40, seed=s) for s in range(2)]).cuda()
    torch.library.opcheck(torch.ops.corda_fast.damped_cholesky.default, (c, probes(9).cuda(), 0.01, 0.05, 40))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_cuda_ops_match_cpu(method):
    assert NATIVE_CUDA
    cs = torch.stack([cov(257, 600, seed=s) for s in range(5)])
    ws = torch.randn(5, 130, 257, dtype=torch.float64)
    sc = torch.ones(5, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        work = torch.float64 if method == "gram" else dtype
        cpu = ops.damped_cholesky(cs.to(work), probes(257), 0.01, 0.05, 40)
        gpu = ops.damped_cholesky(cs.to(work).cuda(), probes(257).cuda(), 0.01, 0.05, 40)
        assert gpu[2].tolist() == cpu[2].tolist()
        for mode in (True, False):
            a, b, _ = ops.batched_decompose(ws.to(work).cuda(), gpu[0], gpu[1], sc, 8, mode, method)
            a0, b0, _ = ops.batched_decompose(ws.to(work), cpu[0], cpu[1], sc, 8, mode, method)
            for i in range(5):
                assert rel(b[i].cpu().double() @ a[i].cpu().double(), b0[i].double() @ a0[i].double()) < \
                    (1e-9 if work == torch.float64 else 1e-3)


@pytest.mark.skipif(torch.version.cuda is None or shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"),
                    reason="compiling the CUDA sources needs a CUDA build of torch and nvcc")
def test_cuda_sources_compile(tmp_path):
    env = dict(os.environ, CORDA_FAST_FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "t"),
                          "--build-lib", str(tmp_path / "l")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "with CUDA" in out.stdout
