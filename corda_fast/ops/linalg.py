"""Reference kernels of the decomposition ops: damping search, damped covariance, one layer's CorDA factors.

These pure-torch functions are the CPU path of :func:`corda_fast.stages.decompose` and the oracle the native kernels
(``backends/native.py``, ``csrc/``) are tested against. Two ops are defined on them, each with one schema:

- ``corda_fast::damped_cholesky(covs (n, d, d), probes (d, p), start, tol, max_iter) -> (C_f, L, λ)``: per
  statistic the damping rule of :func:`find_damping`, the damped covariance and its lower Cholesky factor;
  ``λ`` is float64 on the CPU, ``-1`` for a degenerate statistic and NaN where no ``λ`` passed within ``max_iter``.
- ``corda_fast::batched_decompose(W (n, d_out, d_in), C_f, L, scaling (n,), rank, ipm, method) -> (A, B, S)``:
  :func:`decompose_layer` on every layer of a batch.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import registry


class DampingError(RuntimeError):
    """The damping loop hit its iteration cap (or the statistic is degenerate)."""


def degenerate_error(what: str, mean_diag: float) -> DampingError:
    return DampingError(
        f"the covariance of {what} has mean diagonal {mean_diag}: its input was all zeros or non-finite "
        "on the calibration data. Exclude that layer or use other calibration data."
    )


def not_converged_error(what: str, max_iter: int, last_lam: float, residual: str, tol: float) -> DampingError:
    return DampingError(
        f"damping of {what} did not converge after {max_iter} doublings (last λ={last_lam:.3g}, "
        f"‖C_f C_f⁻¹ − I‖{residual} ≥ {tol}); the statistic is degenerate — check the calibration data."
    )


def damp(cov: torch.Tensor, lam: float) -> torch.Tensor:
    """The damped covariance ``C_f = C + λ·mean(diag C)·I``, in ``cov``'s dtype (the one place it is built in
    Python; the native kernel builds the same)."""
    out = cov.clone()
    out.diagonal().add_(torch.diagonal(cov).mean() * lam)  # = cov + λ·mean·I, without a d×d identity
    return out


def damp_(cov: torch.Tensor, lam: float) -> torch.Tensor:
    """:func:`damp` in place on ``cov`` (a copy the caller owns): the same values, without a second ``d×d``."""
    cov.diagonal().add_(torch.diagonal(cov).mean() * lam)
    return cov


def damping_probes(d: int) -> torch.Tensor:
    """The 16 fixed random probes (float32, seed 0) of the damping estimate, shared by every kernel."""
    return torch.randn(d, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float32)


def find_damping(cov: torch.Tensor, start: float = 0.01, tol: float = 0.05, max_iter: int = 40,
                 what: str = "statistic", probes: torch.Tensor | None = None, overwrite: bool = False) -> float:
    """The PEFT / reference damping rule: the smallest ``λ = start·2^k`` with ``‖C_f C_f⁻¹ − I‖_F < tol`` where
    ``C_f = C + λ·mean(diag C)·I``, evaluated in float32.

    PEFT measures the residual of an explicit LU inverse (two O(d³) products per trial). We first estimate the
    residual's Frobenius norm from 16 random probes through the Cholesky factor (``E‖R g‖² = ‖R‖_F²``; O(d²)
    per probe), and run PEFT's exact LU test whenever the estimate is within 8x of ``tol`` either way or Cholesky
    fails; so the accepted λ is PEFT's unless the estimate and the LU residual differ by more than 8x
    (``tests/test_decompose.py`` checks they stay within it for spectra spanning 1e3 to 1e12).

    Args:
        cov: ``(d, d)`` covariance (any float dtype; evaluated in float32).
        what: name used in errors (the layers sharing this statistic).
        overwrite: a float32 ``cov`` is the search's to damp in place (its values are not kept); otherwise it is
            copied (one float32 ``d×d``).
    Raises:
        DampingError: after ``max_iter`` doublings, or for a non-finite / non-positive-trace statistic.
    """
    c = cov if overwrite and cov.dtype == torch.float32 else cov.to(torch.float32, copy=True)  # damped in place
    diag = c.diagonal().clone()
    mean_diag = diag.mean()
    if not bool(torch.isfinite(mean_diag)) or float(mean_diag) <= 0:
        raise degenerate_error(what, float(mean_diag))
    lam = start
    err = float("nan")
    probes = (damping_probes(c.shape[0]) if probes is None else probes.float()).to(c.device)
    for _ in range(max_iter):
        c.diagonal().copy_(diag + mean_diag * lam)  # = damp(cov, lam) in float32, without a d×d per trial
        chol, info = torch.linalg.cholesky_ex(c)
        if int(info) == 0:
            err = float((c @ cholesky_solve_lower(probes, chol) - probes).norm()) / 4.0  # /sqrt(16 probes)
        else:
            err = float("inf")
        if not tol / 8 <= err < 8 * tol:  # clear-cut: PEFT's LU residual would decide the same
            if err < tol:
                return lam
        else:
            err = _lu_residual(c, chol)
            if err < tol:
                return lam
        del chol
        lam *= 2
    raise not_converged_error(what, max_iter, lam / 2, f"={err:.3g}", tol)


_LU_COLS = 1024  # columns of the inverse solved (and multiplied back) at a time by the exact damping test


def _lu_residual(c: torch.Tensor, spent: torch.Tensor) -> float:
    """PEFT's exact test, ``‖C_f·C_f⁻¹ − I‖_F`` with the inverse from an LU factorization (``inf`` when singular),
    without a ``d×d`` inverse or product: the LU factors take the storage of ``spent`` (the trial's Cholesky factor,
    done with), then the inverse is solved ``_LU_COLS`` columns at a time and each block's residual summed (the last
    block's product in the LU factors' storage). At the peak: ``C_f``, the LU factors and two ``d×_LU_COLS``
    blocks, or one block up to ``_LU_COLS`` columns: three ``d×d`` (``torch.linalg.inv_ex`` and a whole product
    hold four). Up to ``_LU_COLS`` columns this is ``inv_ex``'s residual bit for bit (the same LU, the same
    solve); over more, the sum's order differs in the last bits."""
    d = c.shape[0]
    if spent.mT.is_contiguous():  # column-major (as cholesky_ex returns its factor)
        col_major, flat = spent, spent.mT.reshape(-1)
    elif spent.is_contiguous():
        col_major, flat = spent.mT, spent.reshape(-1)
    else:
        col_major = torch.empty_like(c).mT
        flat = col_major.mT.reshape(-1)
    lu, piv, info = torch.linalg.lu_factor_ex(c, out=(col_major, torch.empty(d, dtype=torch.int32, device=c.device),
                                                      torch.empty((), dtype=torch.int32, device=c.device)))
    if int(info) != 0:
        return float("inf")
    total = 0.0
    for j in range(0, d, _LU_COLS):
        cols = min(_LU_COLS, d - j)
        block = torch.zeros(cols, d, dtype=c.dtype, device=c.device).mT  # I[:, j:j+cols], column-major
        block[j:j + cols].diagonal().fill_(1.0)
        block = torch.linalg.lu_solve(lu, piv, block, out=block)  # C_f⁻¹[:, j:j+cols], solved in place
        if j + cols < d:
            prod = c @ block
        else:  # the last block: the LU factors are done with, their storage takes the product
            prod = torch.mm(c, block, out=flat[:d * cols].view(d, cols))
        del block
        prod[j:j + cols].diagonal().sub_(1.0)
        total += float(prod.norm()) ** 2
        del prod
    return total ** 0.5


def _kept(n: int, rank: int, mode: str) -> slice:
    return slice(0, rank) if mode == "ipm" else slice(n - rank, n)


def decompose_layer(weight: torch.Tensor, chol: torch.Tensor, c_f: torch.Tensor, rank: int, mode: str,
                    scaling: float, method: str = "gram") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adapter factors of one layer.

    Args:
        weight: ``W`` as ``(d_out, d_in)``; c_f: damped covariance ``(d_in, d_in)``; chol: lower Cholesky factor
            of ``c_f``; all three in one dtype (``"gram"`` computes in float64 whatever it is), which the
            outputs take.
        rank: ``r``; mode: ``"ipm"`` (r largest) or ``"kpm"`` (r smallest); scaling: LoRA scaling ``s``.
        method: ``"svd"`` — thin SVD of ``M = W·C_f`` in the working dtype (PEFT's arithmetic); ``"gram"`` —
            eigendecomposition of the Gram matrix of ``M`` on its smaller side, then only the ``r`` kept singular
            vectors of the other side (``M v / σ``), computed in float64: 1.3-1.4x faster than a float32 SVD on CPU
            for rectangular layers, on par for square ones (``benchmarks/bench_ops.py``), and more accurate
            (σ error ≈ ε64·σ_max²/σ against ε32·σ_max); when a kept σ is below 1e-8·σ_max, where
            squaring stops paying, it falls back to the SVD of ``M`` in float64.
    Returns:
        ``(A (r, d_in), B (d_out, r), S_r (r,))`` with ``A = diag(√(S_r/s)) V̂_rᵀ``, ``B = U_r diag(√(S_r/s))``,
        ``V̂_r = C_f⁻¹ V_r`` (triangular solves, kept columns only), singular values in descending order.
    """
    u_r, s_r, v_r = kept_triplets(weight, c_f, rank, mode, method, keep_m=True)
    return finish_factors(u_r, s_r, v_r, chol, scaling, weight.dtype)


def kept_triplets(weight: torch.Tensor, c_f: torch.Tensor, rank: int, mode: str, method: str = "gram",
                  basis: Optional[tuple] = None, eval_scale: float = 1.0, keep_m: bool = False):
    """The ``rank`` kept singular triplets ``(U_r, S_r, V_r)`` of ``M = W·C_f`` (σ descending) as
    :func:`decompose_layer` computes them, from ``W`` and ``C_f`` alone: the Cholesky factor is only needed after,
    by :func:`finish_factors`, so a caller may factor ``C_f`` in its own storage once every layer reading it has its
    triplets. ``"gram"`` works in float64 from any ``W`` dtype; ``basis`` (a :func:`gram_basis` computed before)
    skips the Gram matrix; ``keep_m=False`` drops ``M`` before the eigen-decomposition (the kept vectors are mapped
    through ``W`` and ``C_f`` instead: ``d_out·d_in`` less at the peak, two products with ``r`` columns more)."""
    if method != "gram":
        return _svd_triplets(weight @ c_f, rank, mode)
    got = None if basis is None else triplets_from_basis(basis, weight, c_f, rank, mode, None, eval_scale)
    if got is not None:
        return got
    basis, m = gram_basis(weight, c_f, keep_m=keep_m)
    got = triplets_from_basis(basis, weight, c_f, rank, mode, m)
    if got is not None:
        return got
    del basis
    return _svd_triplets(m if m is not None else weight.double() @ c_f.double(), rank, mode)


def gram_basis(weight: torch.Tensor, c_f: torch.Tensor, keep_m: bool = True) -> tuple[tuple, Optional[torch.Tensor]]:
    """``((eigenvalues ascending, eigenvectors, whether the Gram is M·Mᵀ, index of the first eigenvector kept), M)``
    of the Gram matrix of ``M = W·C_f`` on its smaller side, in float64: the spectrum CorDA++ scores, and the basis
    of the decomposition (:func:`trim_basis` keeps only the eigenvectors a decomposition may use).

    With ``keep_m=False`` ``M`` is not returned (``None``) nor held whole (:func:`gram_matrix`, summed over blocks);
    ``W`` is converted to float64 a row block at a time and the eigenvectors overwrite the Gram matrix: at the peak
    ``C_f``, the Gram matrix and the eigen-solver's workspace."""
    out_side = weight.shape[0] <= weight.shape[1]
    if keep_m:
        m = weight.double() @ c_f.double()
        g = m @ m.mT if out_side else m.mT @ m
    else:
        g, m = gram_matrix(weight, c_f), None
    evals = torch.empty(g.shape[0], dtype=torch.float64, device=g.device)
    g = _lapack_layout(g)
    evals, evecs = torch.linalg.eigh(g, out=(evals, g))  # ascending; the eigenvectors take the Gram's storage
    return (evals, evecs, out_side, 0), m


_ROWS = 256  # row block of W converted to float64 at a time
# column block of M summed into M·Mᵀ: narrower blocks save little more memory and cost time (a pass over the Gram
# matrix and over W's conversion per block)
_COLS = 2048


def gram_matrix(weight: torch.Tensor, c_f: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of ``M = W·C_f`` on its smaller side (``M·Mᵀ`` when ``d_out ≤ d_in``, else ``MᵀM``), float64,
    without a float64 copy of ``W`` and without ``M`` whole: ``M·Mᵀ`` is summed over ``_COLS``-column blocks of ``M``
    (``W·C_f[:, J]``, ``W`` converted a row block at a time), ``MᵀM`` over row blocks of ``W``. At the peak: the Gram
    matrix, one block of ``M`` and one float64 row block of ``W``."""
    c64 = c_f.double()
    d_out, d_in = weight.shape
    if d_out <= d_in:
        if d_in <= _COLS:
            m = _rows_times(weight, c64)
            return m @ m.mT
        g = torch.zeros(d_out, d_out, dtype=torch.float64, device=c64.device)
        for j in range(0, d_in, _COLS):
            part = _rows_times(weight, c64[:, j:j + _COLS])
            g.addmm_(part, part.mT)
            del part  # before the next block is computed
        return g
    g = torch.zeros(d_in, d_in, dtype=torch.float64, device=c64.device)
    for i in range(0, d_out, _ROWS):
        part = weight[i:i + _ROWS].double() @ c64
        g.addmm_(part.mT, part)
        del part
    return g


def _rows_times(weight: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``W·rhs`` in float64 with ``W`` converted a row block at a time (no float64 copy of the whole ``W``)."""
    if weight.dtype == torch.float64:
        return weight @ rhs
    out = torch.empty(weight.shape[0], rhs.shape[1], dtype=torch.float64, device=rhs.device)
    for i in range(0, weight.shape[0], _ROWS):
        torch.mm(weight[i:i + _ROWS].double(), rhs, out=out[i:i + _ROWS])
    return out


def trim_basis(basis: tuple, keep: int, mode: str) -> tuple:
    """``basis`` with only the ``keep`` eigenvectors a decomposition of rank ≤ ``keep`` uses (the largest for IPM,
    the smallest for KPM); a larger rank finds them missing and is computed afresh."""
    evals, evecs, out_side, first = basis
    n = evecs.shape[1]
    keep = min(keep, n)
    lo = n - keep if mode == "ipm" else 0
    return evals, evecs[:, lo:lo + keep].clone(), out_side, first + lo


def triplets_from_basis(basis: tuple, weight: torch.Tensor, c_f: torch.Tensor, rank: int, mode: str,
                        m: Optional[torch.Tensor] = None, eval_scale: float = 1.0):
    """The kept triplets of :func:`kept_triplets`'s ``"gram"`` route from a :func:`gram_basis` computed before (``m``
    may be dropped: the kept vectors are mapped through ``W`` and ``C_f`` instead; ``eval_scale`` multiplies the
    eigenvalues, for a basis computed on a rescaled covariance). ``None`` where a kept σ is below 1e-8·σ_max or an
    eigenvector needed was not kept (the caller computes the layer afresh)."""
    evals, evecs, out_side, first = basis
    n = evals.shape[0]
    order = torch.arange(n - 1, -1, -1, device=evals.device)[_kept(n, rank, mode)]  # descending, like svd
    kept = evals.index_select(0, order)
    if eval_scale != 1.0:
        kept = kept * eval_scale
    s_r = kept.clamp(min=0).sqrt()
    s_max = float((evals[-1] * eval_scale).clamp(min=0).sqrt())
    if not float(s_r.min()) > 1e-8 * s_max:
        return None
    if int(order.min()) < first or int(order.max()) >= first + evecs.shape[1]:
        return None  # a rank beyond the kept eigenvectors
    vecs = evecs.index_select(1, order - first)
    if m is not None:
        other = m.mT @ vecs if out_side else m @ vecs
    else:
        c64 = c_f.double()
        other = c64 @ _rows_times(weight.mT, vecs) if out_side else _rows_times(weight, c64 @ vecs)
    return (vecs, s_r, other / s_r) if out_side else (other / s_r, s_r, vecs)


def _svd_triplets(m: torch.Tensor, rank: int, mode: str):
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    sl = _kept(s.shape[0], rank, mode)
    return u[:, sl], s[sl], vh[sl].mT


def _lapack_layout(sym: torch.Tensor) -> torch.Tensor:
    """The symmetric ``sym`` as a column-major view of its own storage, for a LAPACK call that writes its result
    into it: handed a row-major matrix, torch factors a column-major copy (one ``d×d`` more) and copies it back;
    the transpose is that layout already and, ``sym`` being symmetric, the same matrix."""
    return sym.mT if sym.is_contiguous() else sym


def cholesky_in_place(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, info)``: the lower Cholesky factor of the symmetric ``c`` computed in ``c``'s own storage (``c`` is
    spent; no copy, :func:`_lapack_layout`). ``L`` is returned as a column-major view of that storage."""
    a = _lapack_layout(c)
    return torch.linalg.cholesky_ex(a, out=(a, torch.empty((), dtype=torch.int32, device=c.device)))


def cholesky_solve_lower(b: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """``(L·Lᵀ)⁻¹·b`` from the lower factor ``L``: ``torch.cholesky_solve``'s two triangular solves, without the copy
    of ``L`` it makes (one ``d×d``); ``L`` may be either layout."""
    y = torch.linalg.solve_triangular(chol, b, upper=False)
    return torch.linalg.solve_triangular(chol.mT, y, upper=True)


def finish_factors(u_r: torch.Tensor, s_r: torch.Tensor, v_r: torch.Tensor, chol: torch.Tensor, scaling: float,
                   out_dtype: torch.dtype):
    """``(A, B, S_r)`` of :func:`decompose_layer` from the kept triplets and the Cholesky factor of ``C_f``."""
    v_hat = cholesky_solve_lower(v_r.to(chol.dtype), chol)  # (d_in, r) = C_f⁻¹ V_r
    root = (s_r / scaling).sqrt()
    a = (v_hat * root.to(v_hat.dtype)).mT.contiguous()
    b = (u_r * root).contiguous()
    return a.to(out_dtype), b.to(out_dtype), s_r.to(out_dtype)


# ---------------------------------------------------------------------------------------------------- ops
def damped_cholesky_reference(covs: torch.Tensor, probes: torch.Tensor, start: float, tol: float,
                              max_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference kernel of ``corda_fast::damped_cholesky``: :func:`find_damping` (with ``probes``), :func:`damp` and
    the Cholesky factor per statistic. Failed statistics are flagged in ``λ`` (-1 degenerate, NaN no convergence),
    with ``C_f = C`` for them, as the native kernel does."""
    n = covs.shape[0]
    lam = torch.empty(n, dtype=torch.float64)
    cf = torch.empty_like(covs)
    chol = torch.empty_like(covs)
    for i in range(n):
        c = covs[i]
        try:
            value = find_damping(c, start, tol, max_iter, probes=probes)
        except DampingError as exc:
            value = -1.0 if "mean diagonal" in str(exc) else float("nan")
        lam[i] = value
        cf[i] = damp(c, value) if value > 0 else c
        chol[i] = torch.linalg.cholesky_ex(cf[i])[0]
    return cf, chol, lam


def batched_decompose_reference(w: torch.Tensor, cf: torch.Tensor, chol: torch.Tensor, scaling: torch.Tensor,
                                rank: int, ipm: bool, method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference kernel of ``corda_fast::batched_decompose``: :func:`decompose_layer` per layer of the batch, computed
    in ``cf``'s dtype; outputs in ``w``'s dtype, as the native kernel."""
    d_out, d_in = w.shape[1], w.shape[2]
    a = w.new_empty(w.shape[0], rank, d_in)
    b = w.new_empty(w.shape[0], d_out, rank)
    s = w.new_empty(w.shape[0], rank)
    for i in range(w.shape[0]):
        out = decompose_layer(w[i].to(cf.dtype), chol[i], cf[i], rank, "ipm" if ipm else "kpm", float(scaling[i]),
                              method)
        a[i], b[i], s[i] = out
    return a, b, s


damped_cholesky_op = torch.library.custom_op(
    "corda_fast::damped_cholesky", damped_cholesky_reference, mutates_args=(),
    schema="(Tensor covs, Tensor probes, float start, float tol, int max_iter) -> (Tensor, Tensor, Tensor)")
batched_decompose_op = torch.library.custom_op(
    "corda_fast::batched_decompose", batched_decompose_reference, mutates_args=(),
    schema="(Tensor w, Tensor cf, Tensor chol, Tensor scaling, int rank, bool ipm, str method) "
           "-> (Tensor, Tensor, Tensor)")


@damped_cholesky_op.register_fake
def _damped_cholesky_fake(covs, probes, start, tol, max_iter):
    lam = torch.empty(covs.shape[0], dtype=torch.float64, device="cpu")
    return torch.empty_like(covs), torch.empty_like(covs), lam


@batched_decompose_op.register_fake
def _batched_decompose_fake(w, cf, chol, scaling, rank, ipm, method):
    b, d_out, d_in = w.shape
    return w.new_empty(b, rank, d_in), w.new_empty(b, d_out, rank), w.new_empty(b, rank)


registry.define("damped_cholesky", damped_cholesky_op, damped_cholesky_reference)
registry.define("batched_decompose", batched_decompose_op, batched_decompose_reference)
