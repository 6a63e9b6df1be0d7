"""Covariance statistics: the data structure every stage reads, its safetensors cache, and the model fingerprint.

Calibration (``calibrate`` / ``streaming``) produces :class:`CovarianceStats`; CorDA++ (``plus``) and decomposition
(``decompose``) read them; a cache written by :meth:`CovarianceStats.save` serves any rank or mode later. This module
imports nothing else of the package, so every stage can depend on it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

CACHE_FORMAT = "corda_fast.covariance.v2"  # v2: the model fingerprint covers the config; the data fingerprint


class CacheError(ValueError):
    """A covariance cache that does not belong to this model / configuration."""


@dataclass
class CovarianceStats:
    """Uncentered second-moment statistics of the targeted layers' inputs.

    ``sums[key]`` is ``Σ_samples (X_s/m_s)ᵀ (X_s/m_s)`` over real tokens (``(d, d)``, float32 or float64) and
    ``n_samples[key]`` the number of samples that contributed; the covariance is their ratio (PEFT divides by
    the number of hook calls, which is the number of samples at batch size 1). ``members[key]`` lists the layers
    reading that input, the first being the one the statistic was computed on.
    """

    sums: dict[str, torch.Tensor]
    n_samples: dict[str, int]
    n_tokens: dict[str, int]
    members: dict[str, list[str]]
    normalization: str
    model_fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)

    def layer_keys(self) -> dict[str, str]:
        """``{layer name: statistic key}``."""
        return {name: key for key, names in self.members.items() for name in names}

    def key_of(self, name: str) -> str:
        return self.layer_keys()[name]

    def covariance(self, key: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``C = sum / n_samples`` for statistic ``key`` (``(d, d)``)."""
        s = self.sums[key]
        return s.to(dtype or s.dtype, copy=True).div_(self.n_samples[key])  # one d×d, not a cast and a quotient

    def covariance_float32(self, key: str, rows: int = 256) -> torch.Tensor:
        """``covariance(key, float64)`` rounded to float32 (the damping search's input), computed a block of rows at a
        time: the same values without a float64 ``d×d``."""
        s = self.sums[key]
        out = torch.empty(s.shape, dtype=torch.float32, device=s.device)
        for i in range(0, s.shape[0], rows):
            out[i:i + rows] = s[i:i + rows].to(torch.float64, copy=True).div_(self.n_samples[key])
        return out

    def layer_names(self) -> list[str]:
        return list(self.layer_keys())

    def groups(self, targets: list) -> dict[str, list]:
        """``{statistic key: [targets reading it]}`` for the targets (anything with a ``.name``) that have a
        statistic here, keys in first-target order and targets in their own order: the unit every later stage works
        in (one damping search and one Cholesky factor per key, then each layer reading it)."""
        return CovarianceStats.groups_over([self], targets)

    @staticmethod
    def groups_over(candidates: list["CovarianceStats"], targets: list) -> dict[str, list]:
        """:meth:`groups` over several statistics of the same inputs (CorDA++ candidates): a layer missing from some
        of them (``unused_targets="skip"``) is grouped by whichever has it."""
        layer_keys: dict[str, str] = {}
        for c in candidates:
            layer_keys.update(c.layer_keys())
        by_key: dict[str, list] = {}
        for t in targets:
            if t.name in layer_keys:
                by_key.setdefault(layer_keys[t.name], []).append(t)
        return by_key

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums.values())

    def subset(self, keys) -> "CovarianceStats":
        """The statistics of ``keys`` only (tensors shared, not copied)."""
        keys = list(keys)
        return dataclasses.replace(self, sums={k: self.sums[k] for k in keys},
                                   n_samples={k: self.n_samples[k] for k in keys},
                                   n_tokens={k: self.n_tokens[k] for k in keys},
                                   members={k: self.members[k] for k in keys}, meta=dict(self.meta))

    def merge(self, other: "CovarianceStats") -> "CovarianceStats":
        """Add ``other``'s statistics (other inputs, e.g. another block of the same model) to these, in place."""
        if other.normalization != self.normalization or other.model_fingerprint != self.model_fingerprint:
            raise ValueError("cannot merge statistics of another model or normalization")
        self.sums.update(other.sums)
        self.n_samples.update(other.n_samples)
        self.n_tokens.update(other.n_tokens)
        self.members.update(other.members)
        return self

    # ------------------------------------------------------------------ cache
    def save(self, path: str) -> None:
        """Write the statistics (sums and counts, so caches can be merged) as safetensors with metadata; the file
        appears whole or not at all (written under another name, then renamed)."""
        from safetensors.torch import save_file

        keys = list(self.sums)
        meta = {
            "format": CACHE_FORMAT,
            "model_fingerprint": self.model_fingerprint,
            "normalization": self.normalization,
            "keys": json.dumps(keys),
            "members": json.dumps(self.members),
            "n_samples": json.dumps(self.n_samples),
            "n_tokens": json.dumps(self.n_tokens),
            "meta": json.dumps(self.meta),
        }
        tensors = {f"stat{i}": self.sums[k].contiguous().cpu() for i, k in enumerate(keys)}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        partial = f"{path}.partial"  # a killed write leaves this name, which no run reads
        save_file(tensors, partial, metadata=meta)
        os.replace(partial, path)
        logger.info("saved covariance statistics of %d inputs (%d layers) to %s", len(keys), len(self.layer_names()), path)

    @classmethod
    def load(cls, path: str, model_fingerprint: Optional[str] = None, targets: Optional[list] = None,
             normalization: Optional[str] = None) -> "CovarianceStats":
        """Load a cache written by :meth:`save`, validated against the model (its ``model_fingerprint``, from
        ``corda_fast.stages.model_fingerprint``) / ``targets`` / ``normalization``.

        Raises :class:`CacheError` naming the mismatched field (another model, a missing layer, a shape or
        normalisation mismatch, non-finite values).
        """
        from safetensors import safe_open

        meta = read_cache_metadata(path)
        try:
            with safe_open(path, framework="pt") as f:
                keys = json.loads(meta["keys"])
                sums = {k: f.get_tensor(f"stat{i}") for i, k in enumerate(keys)}
            stats = cls(
                sums=sums,
                n_samples={k: int(v) for k, v in json.loads(meta["n_samples"]).items()},
                n_tokens={k: int(v) for k, v in json.loads(meta["n_tokens"]).items()},
                members=json.loads(meta["members"]),
                normalization=meta["normalization"],
                model_fingerprint=meta["model_fingerprint"],
                meta=json.loads(meta.get("meta", "{}")),
            )
        except Exception as exc:  # a truncated / hand-edited file: name it
            raise CacheError(f"covariance cache '{path}' cannot be read ({type(exc).__name__}: {exc}); delete it or "
                             "pass another path.") from exc
        if model_fingerprint is not None:
            fp = model_fingerprint
            if fp != stats.model_fingerprint:
                raise CacheError(
                    f"covariance cache '{path}' was collected on another model (model_fingerprint "
                    f"{stats.model_fingerprint[:12]}..., this model {fp[:12]}...: different architecture, configuration or "
                    f"weights; cache made for {stats.meta.get('model_class', '?')}). Recalibrate (overwrite_cache=True or "
                    "another path), or load the model it was made on."
                )
        if normalization is not None and normalization != stats.normalization:
            raise CacheError(
                f"covariance cache '{path}' used normalization={stats.normalization!r} but the config asks for "
                f"{normalization!r}."
            )
        if targets is not None:
            keys = stats.layer_keys()
            missing = [t.name for t in targets if t.name not in keys]
            if missing:
                raise CacheError(
                    f"covariance cache '{path}' has no statistic for layer(s) {missing[:5]}"
                    + (" ..." if len(missing) > 5 else "") + "; it was collected for other target_modules."
                )
            for t in targets:
                key = keys[t.name]
                if tuple(stats.sums[key].shape) != (t.d_in, t.d_in):
                    raise CacheError(
                        f"covariance cache '{path}': statistic of '{t.name}' is {tuple(stats.sums[key].shape)}, "
                        f"the layer needs ({t.d_in}, {t.d_in})."
                    )
        bad = [k for k, s in stats.sums.items() if not torch.isfinite(s.diagonal()).all()]
        if bad:
            raise CacheError(f"covariance cache '{path}' holds non-finite statistics for {bad[:5]}.")
        return stats


def read_cache_metadata(path: str) -> dict:
    """The metadata of a cache written by :meth:`CovarianceStats.save`, without its tensors. Raises
    :class:`CacheError` naming the file if it is missing, unreadable, or not a cache of this version."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CacheError(f"covariance cache '{path}' does not exist.")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # empty, truncated or not safetensors at all
        raise CacheError(f"covariance cache '{path}' is not a readable safetensors file ({type(exc).__name__}: "
                         f"{exc}); delete it or pass another path.") from exc
    _check_length(path)
    fmt = meta.get("format")
    if fmt != CACHE_FORMAT:
        older = isinstance(fmt, str) and fmt.startswith("corda_fast.covariance.")
        raise CacheError(f"'{path}' is " + (f"a covariance cache of another corda_fast version ({fmt}); recalibrate "
                                            "(overwrite_cache=True) or pass another path." if older else
                                            f"not a corda_fast covariance cache (format={fmt!r})."))
    missing = [k for k in ("keys", "n_samples", "n_tokens", "members", "normalization", "model_fingerprint")
               if k not in meta]
    if missing:
        raise CacheError(f"covariance cache '{path}' lacks {missing}; delete it or pass another path.")
    return meta


def _check_length(path: str) -> None:
    """A safetensors file as long as its header says (a truncated file's header may still read)."""
    import struct

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        raise CacheError(f"covariance cache '{path}' is {size} bytes where its header says {8 + n + end} (truncated "
                         "or appended to, e.g. by a run killed while writing it); delete it or pass another path.")
