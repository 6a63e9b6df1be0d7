"""Compiled kernels, one module per backend; importing them registers what this process can run
(``ops/registry.py``). Only ``corda_fast.ops`` imports this package."""

from . import native, triton

__all__ = ["native", "triton"]
