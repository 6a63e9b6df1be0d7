"""Build script of corda_fast's native extension (metadata: pyproject.toml).

A plain ``pip install .`` needs no compiler: every op has a pure-torch path. The native extension
(``corda_fast.ops._C``, sources in ``csrc/``) is built here when ``csrc/`` has sources, torch is importable in the
build environment and ``CORDA_FAST_SKIP_EXT`` is unset. Torch is deliberately NOT a build requirement: an isolated
build would fetch a multi-GB CUDA wheel. Build the extension with ``pip install --no-build-isolation -e .``.
"""

import glob
import os
import shutil

from setuptools import setup


def _pip_cuda_includes():
    """Header folders of the CUDA libraries that pip-installed CUDA torch wheels ship (``nvidia/*/include``): a
    toolkit installed for nvcc alone may lack cuSPARSE / cuSOLVER headers that ATen's CUDA headers include."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted({d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "*", "include"))})


def _extensions():
    """(ext_modules, cmdclass) for the native extension, or nothing (with one log line) when it cannot build.

    CPU sources (``csrc/*.cpp``) build whenever torch is importable here and a compiler works. CUDA sources
    (``csrc/cuda/*.cu``) join them when torch has CUDA, ``CUDA_HOME`` (or nvcc) is found and either a GPU is
    visible or ``CORDA_FAST_FORCE_CUDA=1``; ``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS`` are honoured by torch's
    builder. ``CORDA_FAST_SKIP_EXT=1`` skips the extension.
    """
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if os.environ.get("CORDA_FAST_SKIP_EXT") == "1" or not sources:
        if sources:
            print("corda_fast: CORDA_FAST_SKIP_EXT=1: building without the native extension (pure-torch path)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # no torch in the build environment: pure-torch install
        print(f"corda_fast: building without the native extension ({exc}); the pure-torch path will be used. "
              "Install torch first and build with `pip install --no-build-isolation .` to get it.")
        return [], {}
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        print(f"corda_fast: no C++ compiler ({compiler!r} not found): building without the native extension; "
              "the pure-torch path will be used")
        return [], {}
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    force = os.environ.get("CORDA_FAST_FORCE_CUDA") == "1"
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None \
        and (force or torch.cuda.is_available())
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is torch's (C++17 or C++20 depending on its version)
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "corda_fast.ops._C", sources + cuda_sources,
            define_macros=[("CORDA_FAST_WITH_CUDA", "1")], include_dirs=_pip_cuda_includes(),
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=["-fopenmp"])
        print(f"corda_fast: building the native extension with CUDA {torch.version.cuda} "
              f"(arch list {os.environ.get('TORCH_CUDA_ARCH_LIST', 'auto')})")
    else:
        ext = cpp_extension.CppExtension("corda_fast.ops._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=["-fopenmp"])
        why = ("no CUDA sources" if not cuda_sources else "torch is CPU-only" if torch.version.cuda is None
               else "CUDA_HOME not found" if cpp_extension.CUDA_HOME is None
               else "no GPU visible (set CORDA_FAST_FORCE_CUDA=1 to build the CUDA sources anyway)")
        print(f"corda_fast: building the native extension for CPU only ({why})")
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class OptionalBuildExt(base):
        """A failed native build leaves a working pure-torch install (one clear line), unless
        CORDA_FAST_REQUIRE_EXT=1 asks for the failure."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if os.environ.get("CORDA_FAST_REQUIRE_EXT") == "1":
                    raise
                print(f"corda_fast: the native extension failed to build ({type(exc).__name__}: {exc}); the "
                      "pure-torch path will be used (CORDA_FAST_REQUIRE_EXT=1 makes this an error)")

    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _extensions()

# Metadata, dependencies and the version live in pyproject.toml; this file only builds the extension.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
