"""Decomposition: damping, ``W·C_f``, SVD and the adapter factors for KPM / IPM.

Per distinct statistic (shared by q/k/v, gate/up) the damping search and the Cholesky factor are computed once;
per layer one thin SVD of ``W·C_f``; ``V̂ = C_f⁻¹V`` is solved for the ``r`` kept columns only (PEFT multiplies the
full ``Vᵀ`` by an explicit inverse).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from .calibrate import CovarianceStats
from .config import CordaConfig
from .targets import Target

logger = logging.getLogger(__name__)


class DampingError(RuntimeError):
    """The damping loop hit its iteration cap (or the statistic is degenerate)."""


@dataclass
class LayerFactors:
    """CorDA adapter of one layer: ``W ≈ W_res + scaling·B·A``.

    Shapes: ``A`` is ``(r, d_in)``, ``B`` is ``(d_out, r)``, ``singular_values`` ``(r,)`` — the adapted
    singular values of ``W·C_f`` (largest for IPM, smallest for KPM), before division by ``scaling``.
    ``A`` and ``B`` have the decomposition dtype (float32 or float64).
    """

    name: str
    A: torch.Tensor
    B: torch.Tensor
    singular_values: torch.Tensor
    scaling: float
    damping: float
    stat_key: str


def _degenerate_error(what: str, mean_diag: float) -> DampingError:
    return DampingError(
        f"the covariance of {what} has mean diagonal {mean_diag}: its input was all zeros or non-finite "
        "on the calibration data. Exclude that layer or use other calibration data."
    )


def _not_converged_error(what: str, max_iter: int, last_lam: float, residual: str, tol: float) -> DampingError:
    return DampingError(
        f"damping of {what} did not converge after {max_iter} doublings (last λ={last_lam:.3g}, "
        f"‖C_f C_f⁻¹ − I‖{residual} ≥ {tol}); the statistic is degenerate — check the calibration data."
    )


def map_per_core(fn, items: list, on_cpu: bool) -> list:
    """``[fn(x) for x in items]``; on CPU with several threads, one single-threaded call per core at a time:
    LAPACK's eigh/svd scale poorly across cores at these sizes, and this gives 1.4x the throughput of one
    multi-threaded call at a time (``benchmarks/bench_ops.py``)."""
    threads = torch.get_num_threads()
    if not (on_cpu and threads > 1 and len(items) > 1):
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)


def find_damping(cov: torch.Tensor, start: float = 0.01, tol: float = 0.05, max_iter: int = 40,
                 what: str = "statistic") -> float:
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
    Raises:
        DampingError: after ``max_iter`` doublings, or for a non-finite / non-positive-trace statistic.
    """
    c = cov.float()
    mean_diag = torch.diagonal(c).mean()
    if not bool(torch.isfinite(mean_diag)) or float(mean_diag) <= 0:
        raise _degenerate_error(what, float(mean_diag))
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    lam = start
    err = float("nan")
    probes = torch.randn(c.shape[0], 16, generator=torch.Generator().manual_seed(0), dtype=c.dtype).to(c.device)
    for _ in range(max_iter):
        c_f = c + eye * (mean_diag * lam)
        chol, info = torch.linalg.cholesky_ex(c_f)
        if int(info) == 0:
            err = float((c_f @ torch.cholesky_solve(probes, chol) - probes).norm()) / 4.0  # /sqrt(16 probes)
        else:
            err = float("inf")
        if not tol / 8 <= err < 8 * tol:  # clear-cut: PEFT's LU residual would decide the same
            if err < tol:
                return lam
        else:
            inv, info = torch.linalg.inv_ex(c_f)
            err = float(torch.dist(c_f @ inv, eye)) if int(info) == 0 else float("inf")
            if err < tol:
                return lam
        lam *= 2
    raise _not_converged_error(what, max_iter, lam / 2, f"={err:.3g}", tol)


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
            for rectangular layers, on par for square ones (``benchmarks/bench_ops.py``), and more accurate (σ error ≈ ε64·σ_max²/σ against ε32·σ_max); when a kept σ is below 1e-8·σ_max, where
            squaring stops paying, it falls back to the SVD in the input dtype.
    Returns:
        ``(A (r, d_in), B (d_out, r), S_r (r,))`` with ``A = diag(√(S_r/s)) V̂_rᵀ``, ``B = U_r diag(√(S_r/s))``,
        ``V̂_r = C_f⁻¹ V_r`` (triangular solves, kept columns only), singular values in descending order.
    """
    out_dtype = weight.dtype
    m = weight.double() @ c_f.double() if method == "gram" else weight @ c_f  # the Gram route needs float64
    d_out, d_in = m.shape
    u_r = v_r = None
    if method == "gram":
        small_side_is_out = d_out <= d_in
        g = m @ m.mT if small_side_is_out else m.mT @ m
        evals, evecs = torch.linalg.eigh(g)  # ascending
        n = evals.shape[0]
        sl = _kept(n, rank, mode)
        order = torch.arange(n - 1, -1, -1, device=evals.device)[sl]  # descending, like svd
        s_r = evals.index_select(0, order).clamp(min=0).sqrt()
        s_max = float(evals[-1].clamp(min=0).sqrt())
        if float(s_r.min()) > 1e-8 * s_max:
            vecs = evecs.index_select(1, order)
            if small_side_is_out:
                u_r, v_r = vecs, (m.mT @ vecs) / s_r
            else:
                u_r, v_r = (m @ vecs) / s_r, vecs
    if u_r is None:
        m = m.to(out_dtype)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        sl = _kept(s.shape[0], rank, mode)
        u_r, s_r, v_r = u[:, sl], s[sl], vh[sl].mT
    v_hat = torch.cholesky_solve(v_r.to(chol.dtype), chol)  # (d_in, r) = C_f⁻¹ V_r
    root = (s_r / scaling).sqrt()
    a = (v_hat * root.to(v_hat.dtype)).mT.contiguous()
    b = (u_r * root).contiguous()
    return a.to(out_dtype), b.to(out_dtype), s_r.to(out_dtype)


@torch.no_grad()
def decompose(stats: CovarianceStats, targets: list[Target], config: Optional[CordaConfig] = None,
              device: Optional[torch.device] = None, release: bool = False) -> dict[str, LayerFactors]:
    """CorDA factors for every target that has a statistic.

    Args:
        stats: output of :func:`corda_fast.collect_covariance` (or a loaded cache).
        targets: resolved targets (their ``module.weight`` is read, never written).
        config: mode, precision, damping settings.
        device: where to decompose (default: each statistic's device).
        release: drop each statistic from ``stats.sums`` once its layers are decomposed (bounds peak memory
            when the statistics are not needed afterwards).
    Returns:
        ``{layer name: LayerFactors}`` in target order.
    """
    config = config or CordaConfig()
    dtype = config.decompose_dtype
    method = config.resolved_svd_method
    work = torch.float64 if method == "gram" else dtype
    layer_keys = stats.layer_keys()
    by_key: dict[str, list[Target]] = {}
    for t in targets:
        if t.name in layer_keys:
            by_key.setdefault(layer_keys[t.name], []).append(t)
    t0 = time.perf_counter()
    bar = tqdm(total=sum(len(v) for v in by_key.values()), desc="corda_fast: decomposing", unit="layer",
               disable=not config.show_progress)

    def run_group(key: str, layer_targets: list[Target]) -> list[LayerFactors]:
        """Damping and Cholesky once per statistic, then every layer that reads it."""
        c = stats.covariance(key, work)  # a float64 statistic keeps its digits
        if device is not None:
            c = c.to(device)
        names = [t.name for t in layer_targets]
        lam = find_damping(c, config.damping_start, config.damping_tol, config.damping_max_iter,
                           what=f"layer(s) {names}")  # float32, as PEFT
        c_f = c + torch.eye(c.shape[0], dtype=work, device=c.device) * (torch.diagonal(c).mean() * lam)
        if release:
            stats.sums.pop(key, None)
        chol, info = torch.linalg.cholesky_ex(c_f)
        if int(info) != 0:
            raise DampingError(f"damped covariance of layer(s) {names} is not positive definite (λ={lam}).")
        done = []
        for t in layer_targets:
            w = t.weight_matrix().detach().to(device=c.device, dtype=work)
            a, b, s_r = decompose_layer(w, chol, c_f, t.rank, config.mode, t.scaling, method)
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise DampingError(f"non-finite adapter factors for layer '{t.name}' (λ={lam}).")
            done.append(LayerFactors(t.name, a.to(dtype), b.to(dtype), s_r.to(dtype), t.scaling, lam, key))
            bar.update(1)
        return done

    out: dict[str, LayerFactors] = {}
    from .ops import native

    stat_device = device if device is not None else next(iter(stats.sums.values())).device if stats.sums else None
    backend = "native" if by_key and native.decompose_backend(stat_device) == "native" else "torch"
    try:
        if backend == "native":
            out = _decompose_native(stats, by_key, config, work, method, device, release, bar)
        else:
            on_cpu = all(s.device.type == "cpu" for s in stats.sums.values()) and (
                device is None or torch.device(device).type == "cpu")
            for group in map_per_core(lambda kv: run_group(*kv), list(by_key.items()), on_cpu):
                out.update((f.name, f) for f in group)
    finally:
        bar.close()
    logger.info("decomposed %d layers (%d distinct statistics, %s, %s, %s) in %.2fs", len(out), len(by_key),
                config.decompose_precision, method, backend, time.perf_counter() - t0)
    order = {t.name: i for i, t in enumerate(targets)}
    return dict(sorted(out.items(), key=lambda kv: order[kv[0]]))


# Bytes of statistics (and their damped copies, factors and damping trials) one native call may hold.
NATIVE_CHUNK_BYTES = 256 * 2**20


def _decompose_native(stats: CovarianceStats, by_key: dict, config: CordaConfig, work: torch.dtype, method: str,
                      device, release: bool, bar) -> dict[str, LayerFactors]:
    """The same factors through the native ops: statistics of one size are damped together
    (``damped_cholesky``, one host sync per round of trials), then same-shaped layers of the same rank are
    decomposed together (``batched_decompose``, layers in parallel). Chunked to bound memory."""
    dtype = config.decompose_dtype
    by_dim: dict[int, list[str]] = {}
    for key in by_key:
        by_dim.setdefault(stats.sums[key].shape[0], []).append(key)
    out: dict[str, LayerFactors] = {}
    for d, keys in by_dim.items():
        per = max(1, NATIVE_CHUNK_BYTES // (d * d * 8 * 4))
        probes = torch.randn(d, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
        for c0 in range(0, len(keys), per):
            chunk = keys[c0:c0 + per]
            covs = torch.stack([stats.covariance(k, work) for k in chunk])
            if device is not None:
                covs = covs.to(device)
            cf, chol, lam = torch.ops.corda_fast.damped_cholesky(
                covs, probes.to(covs.device), config.damping_start, config.damping_tol, config.damping_max_iter)
            del covs
            lam = lam.tolist()
            for i, key in enumerate(chunk):
                names = [t.name for t in by_key[key]]
                value = lam[i]
                if value == -1.0:
                    md = float(torch.diagonal(stats.covariance(key, work)).mean())
                    raise _degenerate_error(f"layer(s) {names}", md)
                if value != value:  # NaN: no λ passed within max_iter doublings
                    raise _not_converged_error(f"layer(s) {names}", config.damping_max_iter,
                                               config.damping_start * 2 ** (config.damping_max_iter - 1), "",
                                               config.damping_tol)
            if release:
                for key in chunk:
                    stats.sums.pop(key, None)
            groups: dict[tuple, list] = {}
            for i, key in enumerate(chunk):
                for t in by_key[key]:
                    groups.setdefault((t.d_out, t.rank), []).append((i, t))
            for (_, rank), items in groups.items():
                idx = torch.tensor([i for i, _ in items], device=cf.device)
                w = torch.stack([t.weight_matrix().detach().to(device=cf.device, dtype=work) for _, t in items])
                scaling = torch.tensor([t.scaling for _, t in items], dtype=torch.float64)
                a, b, s = torch.ops.corda_fast.batched_decompose(
                    w, cf.index_select(0, idx), chol.index_select(0, idx), scaling, rank, config.mode == "ipm", method)
                del w
                finite = (torch.isfinite(a).flatten(1).all(1) & torch.isfinite(b).flatten(1).all(1)).tolist()
                for j, (i, t) in enumerate(items):
                    if not finite[j]:
                        raise DampingError(f"non-finite adapter factors for layer '{t.name}' (λ={lam[i]}).")
                    out[t.name] = LayerFactors(t.name, a[j].to(dtype), b[j].to(dtype), s[j].to(dtype), t.scaling,
                                               lam[i], chunk[i])
                bar.update(len(items))
            del cf, chol
    return out
