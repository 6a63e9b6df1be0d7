"""The statistics cache as a folder: one file per block, written as each block completes, so a run resumes.

``covariance_cache`` names a file (``*.safetensors``, or any existing file) or a folder (an existing folder, or a
new path without the ``.safetensors`` suffix). A folder holds ``block-00000.safetensors`` ... — each an ordinary
cache file (:meth:`CovarianceStats.save`: the same model and data fingerprints) with the targets of one block of the
model's block list, and the block's name in its metadata. Each file is written under another name and renamed when
whole, so a killed run leaves only complete files (and a ``.partial`` that no run reads).

- A streaming run writes each block's file as the block completes. Rerun with the same model, data and config, it
  reads the files of completed blocks (never rewriting them) and computes the others. Block inputs for the next
  block to compute come from a forward pass through the completed blocks, without statistics (cost: one forward of
  each completed block over the calibration data, the cheapest part of calibration).
- A one-pass run reads a complete folder as one cache, and writes a folder when given one (its statistics split by
  block): a folder written either way serves either kind of run, and a one-pass file serves a streaming run.
- A file that is truncated, of another model or data, or of another block, is refused by name.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

from .config import CordaConfig
from .stats import CacheError, CovarianceStats, read_cache_metadata
from .targets import Target

logger = logging.getLogger(__name__)

BLOCK_FILE = "block-{:05d}.safetensors"


def is_folder(path: str) -> bool:
    """Whether ``covariance_cache=path`` means a folder cache (see the module's docstring)."""
    if os.path.isdir(path):
        return True
    if os.path.exists(path):
        return False
    return not os.fspath(path).endswith(".safetensors")


class BlockCache:
    """The block files of one model's targets in ``folder``: which exist, reading them checked, writing them whole."""

    def __init__(self, folder: str, prefix: str, by_block: dict[int, list[Target]], config: CordaConfig):
        self.folder = folder
        self.prefix = prefix
        self.by_block = by_block
        self.normalization = config.normalization
        self.route_all_experts = config.calibration.route_all_experts
        self.overwrite = config.calibration.overwrite_cache
        self.data_fingerprint: Optional[str] = None
        self.model_fingerprint: Optional[str] = None
        self.done: set[int] = set()  # blocks whose file was found valid (read, never rewritten)

    def path(self, b: int) -> str:
        return os.path.join(self.folder, BLOCK_FILE.format(b))

    def present(self) -> list[int]:
        return [b for b in self.by_block if os.path.isfile(self.path(b))]

    def complete(self) -> bool:
        return not self.overwrite and len(self.present()) == len(self.by_block)

    def bind(self, model_fingerprint: str, data_fingerprint: Optional[str]) -> None:
        """Check every existing block file against this model and data (raising :class:`CacheError` naming the first
        that does not belong), and remember which blocks are done."""
        self.model_fingerprint, self.data_fingerprint = model_fingerprint, data_fingerprint
        self.done = set()
        if self.overwrite:
            return
        for b in self.present():
            self._check(b, read_cache_metadata(self.path(b)))
            self.done.add(b)
        if self.done:
            logger.info("covariance cache folder %s: %d of %d blocks already done, read instead of recomputed",
                        self.folder, len(self.done), len(self.by_block))

    def _check(self, b: int, header: dict) -> None:
        path = self.path(b)
        meta = json.loads(header.get("meta", "{}"))
        block = f"{self.prefix}.{b}"
        if meta.get("block") != block:
            raise CacheError(f"covariance cache file '{path}' holds the statistics of block {meta.get('block')!r}, "
                             f"not '{block}' (a file of another folder or model): delete it or use another folder.")
        if header["model_fingerprint"] != self.model_fingerprint:
            raise CacheError(f"covariance cache file '{path}' was collected on another model (or configuration): "
                             "delete the folder, use another, or CalibrationConfig(overwrite_cache=True).")
        if header["normalization"] != self.normalization:
            raise CacheError(f"covariance cache file '{path}' used normalization={header['normalization']!r}; the "
                             f"config asks for {self.normalization!r}.")
        if self.data_fingerprint is not None and meta.get("data_fingerprint") != self.data_fingerprint:
            raise CacheError(f"covariance cache file '{path}' was computed from other calibration data than the "
                             "loader passed: another folder, or CalibrationConfig(overwrite_cache=True).")
        held = {n for names in json.loads(header.get("members", "{}")).values() for n in names}
        missing = [t.name for t in self.by_block[b] if t.name not in held]
        if missing:
            raise CacheError(f"covariance cache file '{path}' has no statistic for {missing[:3]} (made for other "
                             "target_modules): another folder, or CalibrationConfig(overwrite_cache=True).")
        if bool(meta.get("route_all_experts")) != self.route_all_experts and any(
                n.endswith("]") for n in json.loads(header.get("members", "{}"))):
            raise CacheError(f"covariance cache file '{path}' holds expert statistics made with route_all_experts="
                             f"{bool(meta.get('route_all_experts'))}; the config asks for {self.route_all_experts}.")

    def read(self, b: int) -> CovarianceStats:
        """Block ``b``'s statistics from its file, checked against its targets (shapes, finiteness)."""
        return CovarianceStats.load(self.path(b), self.model_fingerprint, self.by_block[b], self.normalization)

    def write(self, b: int, stats: CovarianceStats) -> None:
        """Write block ``b``'s file whole (stamped with the block's name and the data fingerprint)."""
        stats.meta["block"] = f"{self.prefix}.{b}"
        if self.data_fingerprint is not None:
            stats.meta["data_fingerprint"] = self.data_fingerprint
        stats.save(self.path(b))
        self.done.add(b)


def load_folder(cache: BlockCache, model_fingerprint: str, data_fingerprint: Optional[str]) -> CovarianceStats:
    """A complete folder as one :class:`CovarianceStats` (a one-pass run reading it)."""
    cache.bind(model_fingerprint, data_fingerprint)
    out: Optional[CovarianceStats] = None
    for b in cache.by_block:
        stats = cache.read(b)
        out = stats if out is None else out.merge(stats)
    out.meta.pop("block", None)
    return out


def save_folder(cache: BlockCache, stats: CovarianceStats, model_fingerprint: str) -> None:
    """A one-pass run's statistics written as block files."""
    cache.bind(model_fingerprint, stats.meta.get("data_fingerprint"))
    keys = stats.layer_keys()
    for b, ts in cache.by_block.items():
        cache.write(b, stats.subset(sorted({keys[t.name] for t in ts if t.name in keys}, key=list(stats.sums).index)))

