"""Decomposition properties (spec §7): damping rule, reconstruction, mode selection, invariants, limits."""

import pytest
import torch

from corda_fast import DampingError
from corda_fast.ops import decompose_layer
from corda_fast.stages import find_damping

from helpers import reference_damping, reference_factors, rel


def spd(d, tokens, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g, dtype=dtype) * torch.linspace(0.05, 2.0, d, dtype=dtype)
    return x.T @ x / tokens


def factors(w, c, rank, mode, s, dtype=torch.float64, method="svd"):
    lam = find_damping(c)
    c = c.to(dtype)
    cf = c + torch.eye(c.shape[0], dtype=dtype) * torch.diagonal(c).mean() * lam
    a, b, sr = decompose_layer(w.to(dtype), torch.linalg.cholesky(cf), cf, rank, mode, s, method)
    return a, b, sr, cf, lam


@pytest.mark.parametrize("d_out,d_in", [(17, 29), (29, 17), (1, 3), (33, 33)])
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
@pytest.mark.parametrize("method", ["svd", "gram"])
def test_matches_float64_reference(d_out, d_in, mode, method):
    w = torch.randn(d_out, d_in)
    c = spd(d_in, 3 * d_in + 5)
    rank = min(3, d_out, d_in)
    a, b, sr, _, lam = factors(w, c, rank, mode, 0.5, torch.float32, method)
    assert a.dtype == b.dtype == torch.float32
    d_ref, w_ref = reference_factors(w, c, rank, mode, 0.5, lam)
    assert rel(0.5 * b.double() @ a.double(), d_ref) < (1e-4 if method == "svd" else 1e-6)
    a64, b64, _, _, _ = factors(w, c, rank, mode, 0.5, torch.float64, method)
    assert rel(0.5 * b64 @ a64, d_ref) < 1e-10
    assert torch.all(sr[:-1] >= sr[1:])  # descending, like PEFT


def test_gram_falls_back_to_svd_for_tiny_kept_values():
    u, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    w = (u * torch.logspace(0, -9, 12, dtype=torch.float64)) @ v.T  # kept σ down to 1e-9·σ_max
    eye = torch.eye(12, dtype=torch.float64)
    for method in ("svd", "gram"):
        a, b, sr = decompose_layer(w, eye, eye, 3, "kpm", 1.0, method)
        assert torch.allclose(sr, torch.logspace(0, -9, 12, dtype=torch.float64)[-3:], rtol=1e-6)
        assert rel(b @ a, (u[:, -3:] * sr) @ v[:, -3:].T) < 1e-6


def test_damping_rule_smallest_accepted():
    for c in (spd(40, 200), spd(40, 10, seed=1).float()):  # full rank, and rank 10 of 40
        lam = find_damping(c)
        assert lam == reference_damping(c)
        assert lam >= 0.01
        c32 = c.float()
        eye = torch.eye(40)
        cf = c32 + eye * torch.diagonal(c32).mean() * lam
        assert float(torch.dist(cf @ torch.linalg.inv(cf), eye)) < 0.05


def test_damping_grows_for_ill_conditioned():
    d = 64
    u, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    c = (u * torch.logspace(0, -30, d, dtype=torch.float64)) @ u.T * 1e4  # cond 1e30
    lam_small = find_damping(c, start=1e-9)
    assert lam_small > 1e-9  # needed doublings
    assert lam_small == reference_damping(c, start=1e-9)


def test_damping_cap_and_degenerate_errors():
    with pytest.raises(DampingError, match="mean diagonal"):
        find_damping(torch.zeros(5, 5), what="layer 'x'")
    with pytest.raises(DampingError, match="non-finite|mean diagonal"):
        find_damping(torch.full((5, 5), float("nan")))
    c = spd(30, 3)
    with pytest.raises(DampingError, match="did not converge after 2 doublings"):
        find_damping(c, start=1e-12, tol=1e-9, max_iter=2, what="layer 'x'")


@pytest.mark.parametrize("s", [0.5, 1.0, 2.0])
def test_invariants(s):
    d_out, d_in, r = 23, 31, 5
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    c = spd(d_in, 100)
    full = torch.linalg.svdvals(w @ (c + torch.eye(d_in, dtype=torch.float64) * torch.diagonal(c).mean() * find_damping(c)))
    for mode in ("ipm", "kpm"):
        a, b, sr, cf, _ = factors(w, c, r, mode, s)
        assert torch.allclose(sr, full[:r] if mode == "ipm" else full[-r:], rtol=1e-10)
        assert torch.allclose(b.T @ b, torch.diag(sr / s), atol=1e-10 * float(sr.max()))
        assert torch.allclose(a @ cf @ cf @ a.T, torch.diag(sr / s), atol=1e-9 * float(sr.max()))
        # frozen part keeps exactly the other singular values
        w_res = w - s * b @ a
        kept = torch.linalg.svdvals(w_res @ cf)
        other = full[r:] if mode == "ipm" else full[:-r]
        assert torch.allclose(kept[: other.numel()], other, rtol=1e-8)
        assert float(kept[other.numel():].abs().max()) < 1e-8 * float(full[0])
    a_i, b_i, *_ = factors(w, c, r, "ipm", s)
    a_k, b_k, *_ = factors(w, c, r, "kpm", s)
    assert float((b_i.T @ b_k).abs().max()) < 1e-8 * float(b_i.norm() * b_k.norm())  # orthogonal U blocks


def test_identity_covariance_is_pissa_and_milora():
    w = torch.randn(12, 20, dtype=torch.float64)
    c = torch.eye(20, dtype=torch.float64) * 3.0
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    for mode, idx in (("ipm", slice(0, 4)), ("kpm", slice(-4, None))):
        a, b, *_ = factors(w, c, 4, mode, 1.0)
        expected = u[:, idx] @ torch.diag(sv[idx]) @ vh[idx]
        assert rel(b @ a, expected) < 1e-10


def test_scale_changes_balance_not_product():
    w = torch.randn(10, 14, dtype=torch.float64)
    c = spd(14, 60)
    a1, b1, *_ = factors(w, c, 3, "kpm", 1.0)
    a2, b2, *_ = factors(w, c * 100, 3, "kpm", 1.0)
    assert rel(b2 @ a2, b1 @ a1) < 1e-9
    assert abs(float(b2.norm() / b1.norm()) - 10) < 1e-6
    assert abs(float(a1.norm() / a2.norm()) - 10) < 1e-6


def test_probe_residual_estimate_tracks_peft_lu_residual():
    """find_damping trusts its 16-probe estimate of ‖C_f C_f⁻¹ − I‖_F only outside [tol/8, 8·tol]; the estimate
    must stay within 8x of PEFT's LU residual across conditionings (this is what makes the λ PEFT's)."""
    import math

    ratios = []
    for d, seed in ((64, 0), (256, 1)):
        g = torch.Generator().manual_seed(seed)
        u, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        for decades in (3, 6, 9, 12):
            c = (u * torch.logspace(0, -decades, d)) @ u.T
            for lam in (1e-6, 1e-4, 1e-2):
                cf = c + torch.eye(d) * torch.diagonal(c).mean() * lam
                chol, info = torch.linalg.cholesky_ex(cf)
                if info:
                    continue
                probes = torch.randn(d, 16, generator=torch.Generator().manual_seed(0))
                est = float((cf @ torch.cholesky_solve(probes, chol) - probes).norm()) / 4.0
                lu = float(torch.dist(cf @ torch.linalg.inv(cf), torch.eye(d)))
                ratios.append(est / lu)
    assert len(ratios) >= 15
    assert all(1 / 8 < r < 8 for r in ratios), [round(r, 2) for r in ratios]
    assert max(abs(math.log(r)) for r in ratios) > 0  # the two differ: the fallback zone is needed


# ---------------------------------------------------------------------------------------------------- low-memory route
@pytest.mark.parametrize("d_out,d_in", [(37, 300), (300, 37), (41, 41)])  # both Gram sides, row blocks of W
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_triplets_without_m_match_the_reference(d_out, d_in, mode, monkeypatch):
    """Dropping M = W·C_f (Gram summed over row blocks of a float32 W or column blocks of M, kept vectors mapped
    through W and C_f, the eigenvectors in the Gram's storage) gives the factors of the route that keeps M, against float64."""
    import corda_fast.ops.linalg as linalg

    monkeypatch.setattr(linalg, "_ROWS", 16)  # several row blocks of W at these sizes
    monkeypatch.setattr(linalg, "_COLS", 64)  # and column blocks of M for M·Mᵀ
    w = torch.randn(d_out, d_in)
    c = spd(d_in, 2 * d_in + 3, seed=5)
    lam = find_damping(c)
    cf = c + torch.eye(d_in, dtype=torch.float64) * torch.diagonal(c).mean() * lam
    chol = torch.linalg.cholesky(cf)
    rank = 5
    kept_m = linalg.kept_triplets(w.double(), cf, rank, mode, keep_m=True)
    no_m = linalg.kept_triplets(w, cf, rank, mode, keep_m=False)
    assert all(x.dtype == torch.float64 for x in no_m)
    a1, b1, s1 = linalg.finish_factors(*kept_m, chol, 0.5, torch.float64)
    a2, b2, s2 = linalg.finish_factors(*no_m, chol, 0.5, torch.float64)
    d_ref, _ = reference_factors(w, c, rank, mode, 0.5, lam)
    assert rel(0.5 * b2 @ a2, d_ref) < 1e-9 and rel(0.5 * b1 @ a1, 0.5 * b2 @ a2) < 1e-10
    assert torch.allclose(s1, s2, rtol=1e-10)
    e1 = linalg.gram_basis(w.double(), cf)[0][0]
    e2, _, side, _ = linalg.gram_basis(w, cf, keep_m=False)[0]
    assert side == (d_out <= d_in) and torch.allclose(e1, e2, rtol=1e-9, atol=1e-12 * float(e1[-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_covariance_and_in_place_search_equal_the_copies(dtype):
    """The damping search's float32 input built by row blocks is bit-identical to rounding the float64 covariance,
    and a search that damps its input in place accepts the same λ as one that copies (the input is left as it was
    only in the second)."""
    from corda_fast.stats import CovarianceStats

    g = torch.Generator().manual_seed(7)
    x = torch.randn(500, 300, generator=g, dtype=dtype) * torch.logspace(-5, 1, 300, dtype=dtype)
    stats = CovarianceStats(sums={"k": x.T @ x}, n_samples={"k": 37}, n_tokens={"k": 500}, members={"k": ["l"]},
                            normalization="none", model_fingerprint="f")
    c32 = stats.covariance_float32("k", rows=64)
    assert torch.equal(c32, stats.covariance("k", torch.float64).float())
    assert torch.equal(stats.covariance("k", torch.float64), stats.sums["k"].double() / 37)
    kept = c32.clone()
    lam = find_damping(c32, start=1e-9)
    assert torch.equal(c32, kept)  # copied: untouched
    assert find_damping(c32, start=1e-9, overwrite=True) == lam and lam >= 4e-9  # several trials, in place
    assert not torch.equal(c32, kept)  # damped in place: the caller gave it away


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_a_given_damping_is_used_as_it_is(backend, monkeypatch):
    """A statistic whose λ is given (``meta["damping"]``: CorDA++'s selected statistics, damped as they were scored)
    is damped with that λ — not searched again, not rounded to the rule's grid — on either decomposition path; the
    other statistics still run the search."""
    import corda_fast
    import corda_fast.decompose as dec
    from corda_fast import ops

    from helpers import Setup, padded_batches, random_samples, tiny_llama

    if backend == "native" and not ops.available()["native"]:
        pytest.skip("native extension not built")
    model = tiny_llama()
    cfg = Setup(mode="kpm", rank=3)
    targets = corda_fast.stages.resolve_targets(model, cfg.lora)
    stats = corda_fast.stages.collect_covariance(model, padded_batches(random_samples(5), 2), cfg.corda, targets)
    key = next(iter(stats.sums))
    stats.meta["damping"] = {key: 0.37}  # off the start·2^k grid: the search could never return it
    searched = []
    monkeypatch.setattr(dec, "find_damping", lambda c, *a, **k: searched.append(1) or find_damping(c, *a, **k))
    monkeypatch.setenv("CORDA_FAST_BACKEND", backend)
    got = corda_fast.stages.decompose(stats, targets, cfg.corda)
    given = [t for t in targets if got[t.name].stat_key == key]
    assert given and all(got[t.name].damping == 0.37 for t in given)
    assert all(got[t.name].damping != 0.37 for t in targets if t not in given)
    if backend == "torch":
        assert len(searched) == len(stats.sums) - 1
    c = stats.covariance(key, torch.float64)
    for t in given:
        f = got[t.name]
        ref, _ = reference_factors(t.weight_matrix().detach(), c, t.rank, "kpm", f.scaling, 0.37)
        assert rel(f.scaling * f.B.double() @ f.A.double(), ref) < 1e-4  # float32 factors


@pytest.mark.parametrize("d,cond", [(37, 1e3), (129, 1e6), (300, 1e7), (64, None)])
@pytest.mark.parametrize("cols", [None, 50])
def test_lu_residual_without_a_whole_inverse_equals_the_inverse_route(d, cond, cols, monkeypatch):
    """The damping rule's exact test computed in the spent Cholesky factor's storage, the inverse solved a block of
    columns at a time, equals ``inv_ex``'s residual: bit for bit in one block (same LU, same inverse), to float32
    rounding over several; ``inf`` for a singular matrix."""
    import corda_fast.ops.linalg as linalg
    from corda_fast.ops.linalg import _lu_residual

    if cols is not None:
        monkeypatch.setattr(linalg, "_LU_COLS", cols)

    g = torch.Generator().manual_seed(d)
    if cond is None:  # singular: a zero row and column
        x = torch.randn(2 * d, d, generator=g, dtype=torch.float64)
        c = (x.T @ x).float()
        c[:, -1] = 0
        c[-1] = 0
    else:
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        c = ((q * torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), d, dtype=torch.float64)) @ q.T).float()
    spent = torch.randn(d, d, generator=g)  # whatever the failed trial left there
    kept = c.clone()
    got = _lu_residual(c, spent)
    assert torch.equal(c, kept)  # C_f is read only
    inv, info = torch.linalg.inv_ex(c)
    if cond is None:
        assert int(info) != 0 and got == float("inf")
        return
    prod = c @ inv
    prod.diagonal().sub_(1.0)
    want = float(prod.norm())
    assert got > 0 and (got == want if cols is None or d <= cols else abs(got - want) <= 1e-5 * want)


def test_gram_and_exact_damping_test_work_in_blocks_and_in_place(monkeypatch):
    """What bounds the decomposition's workspace: ``M·Mᵀ`` is summed from ``_COLS``-column blocks of ``M`` (never
    ``W·C_f`` whole), the Gram's eigenvectors are written in its own storage as LAPACK lays them out (column-major:
    no copy of the Gram for the solver), and the exact damping test solves the inverse ``_LU_COLS`` columns at a
    time with its LU factors in the spent Cholesky factor's storage."""
    import corda_fast.ops.linalg as linalg

    monkeypatch.setattr(linalg, "_COLS", 40)
    monkeypatch.setattr(linalg, "_LU_COLS", 30)
    widths, solved, factored = [], [], []
    rows_times, lu_solve, lu_factor = linalg._rows_times, torch.linalg.lu_solve, torch.linalg.lu_factor_ex
    monkeypatch.setattr(linalg, "_rows_times", lambda w, rhs: widths.append(rhs.shape[1]) or rows_times(w, rhs))
    monkeypatch.setattr(torch.linalg, "lu_solve", lambda lu, piv, b, **k: solved.append(b.shape[1]) or lu_solve(
        lu, piv, b, **k))
    monkeypatch.setattr(torch.linalg, "lu_factor_ex", lambda a, **k: factored.append(k["out"][0].data_ptr()) or
                        lu_factor(a, **k))
    w = torch.randn(23, 150)
    c = spd(150, 400, seed=3)
    (evals, evecs, out_side, _), m = linalg.gram_basis(w, c, keep_m=False)
    assert m is None and out_side and widths == [40, 40, 40, 30]
    assert evecs.shape == (23, 23) and evecs.stride() == (1, 23)  # the Gram's storage, column-major
    g = (w.double() @ c) @ (w.double() @ c).T
    assert torch.allclose(g @ evecs, evecs * evals, rtol=1e-9, atol=1e-9 * float(evals[-1]))
    c32 = c.float()
    for spent in (torch.empty_like(c32), torch.empty_like(c32).mT):  # row- or column-major (cholesky_ex's)
        solved.clear(), factored.clear()
        linalg._lu_residual(c32, spent)
        assert solved == [30] * 5 and factored == [spent.data_ptr()]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("layout", ["row", "col"])
def test_cholesky_in_place_and_its_solve_equal_torch(dtype, tol, layout):
    """The factor is computed in the statistic's own storage (no ``d×d`` copy: the same memory comes back, a
    column-major view) and equals ``torch.linalg.cholesky``; the solve through it equals ``torch.cholesky_solve``
    (which copies the factor) on either layout."""
    import corda_fast.ops.linalg as linalg

    c = spd(37, 90, seed=5).to(dtype)
    c = c if layout == "row" else c.T.contiguous().mT  # a column-major statistic is factored in place too
    want = torch.linalg.cholesky(c)
    work = c.clone() if layout == "row" else c.mT.clone().mT
    ptr = work.data_ptr()
    chol, info = linalg.cholesky_in_place(work)
    assert int(info) == 0 and chol.data_ptr() == ptr
    assert torch.equal(chol.tril(), want)
    b = torch.randn(37, 5, dtype=dtype)
    ref = torch.cholesky_solve(b.double(), want.double())
    for factor in (chol, want):
        got = linalg.cholesky_solve_lower(b, factor)
        assert rel(got.double(), ref) < tol
        assert rel(got, torch.cholesky_solve(b, want)) < tol
    bad = -torch.eye(4, dtype=dtype)
    assert int(linalg.cholesky_in_place(bad)[1]) != 0


def test_decomposition_factors_c_f_in_place_without_copying_the_factor(monkeypatch):
    """The group's Cholesky factor takes ``C_f``'s storage and the final solves do not copy it (``cholesky_solve``
    would: one ``d×d`` each); the factors still equal the float64 reference."""
    import corda_fast.ops as ops
    from corda_fast.config import CordaConfig
    from corda_fast.decompose import _group_factors

    copies = []
    monkeypatch.setattr(torch, "cholesky_solve", lambda *a, **k: copies.append(1) or pytest.fail("copying solve"))
    seen = []
    in_place = ops.cholesky_in_place
    monkeypatch.setattr(ops, "cholesky_in_place", lambda c: seen.append(c.data_ptr()) or in_place(c))

    class T:
        name, rank, scaling = "layer", 3, 0.5

        def __init__(self, w):
            self.w = w

        def weight_matrix(self):
            return self.w

    c = spd(29, 80, seed=6)
    w = torch.randn(13, 29, dtype=torch.float64)
    lam = find_damping(c)
    cf = c + torch.eye(29, dtype=torch.float64) * torch.diagonal(c).mean() * lam
    delta, _ = reference_factors(w, c, 3, "ipm", 0.5, lam)
    work = cf.clone()
    out = _group_factors(work, lam, "k", [T(w)], CordaConfig(mode="ipm", precision="float64"), torch.float64, {},
                         type("Bar", (), {"update": lambda self, n: None})())
    assert seen == [work.data_ptr()] and not copies
    assert rel(0.5 * out[0].B @ out[0].A, delta) < 1e-9
