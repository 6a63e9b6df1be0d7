"""The package's layering, read from its source: every import (function-local ones too) is an edge; no cycles, none of
the forbidden edges, no function over the length limit without a reason written beside it."""

import ast
import os
import re

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "corda_fast")
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, str]:
    """``{dotted module name: path}`` of the package's Python sources."""
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return out


def imports(name: str, path: str, known: set) -> tuple[set, set]:
    """``(package modules, external top-level packages)`` that module ``name`` imports anywhere in its body."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    internal, external = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                (internal if a.name.split(".")[0] == "corda_fast" else external).add(
                    a.name if a.name.split(".")[0] == "corda_fast" else a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
                if base.split(".")[0] != "corda_fast":
                    external.add(base.split(".")[0])
                    continue
            else:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:  # `from . import x` names a submodule when one exists
                sub = f"{base}.{a.name}"
                internal.add(sub if sub in known else base)
    internal = {m for m in internal if m in known and m != name}
    return internal, external


GRAPH = {}
EXTERNAL = {}
for _name, _path in modules().items():
    GRAPH[_name], EXTERNAL[_name] = imports(_name, _path, set(modules()))


def reach(start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_graph_is_read():
    assert "corda_fast.stats" in GRAPH["corda_fast.calibrate"]  # the parser sees edges (the test can fail)
    assert "peft" in EXTERNAL["corda_fast.peft_bridge"]


def test_no_import_cycle():
    cycles = sorted(m for m in GRAPH if m in reach(m))
    assert not cycles, f"modules on an import cycle: {cycles}"


LOW = ["corda_fast.stats", "corda_fast.config", "corda_fast.targets", "corda_fast.calibrate", "corda_fast.streaming",
       "corda_fast.decompose", "corda_fast.distributed", "corda_fast.plus", "corda_fast.quant", "corda_fast.offload"]
FORBIDDEN = {  # module (and what it reaches) -> modules it must never reach
    "corda_fast.calibrate": ["corda_fast.decompose", "corda_fast.plus", "corda_fast.peft_bridge", "corda_fast.api"],
    "corda_fast.streaming": ["corda_fast.decompose", "corda_fast.plus", "corda_fast.peft_bridge", "corda_fast.api"],
    "corda_fast.decompose": ["corda_fast.calibrate", "corda_fast.streaming", "corda_fast.peft_bridge",
                             "corda_fast.api"],
    "corda_fast.stats": [m for m in GRAPH if m != "corda_fast.stats"],
    "corda_fast.distributed": [m for m in GRAPH if m != "corda_fast.distributed"],
    "corda_fast.config": [m for m in GRAPH if m != "corda_fast.config"],
    "corda_fast.offload": [m for m in GRAPH if m != "corda_fast.offload"],
}


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_forbidden_edges(module):
    bad = sorted(reach(module) & set(FORBIDDEN[module]))
    assert not bad, f"{module} imports (directly or through others) {bad}"


def test_ops_import_nothing_outside_ops():
    for name in GRAPH:
        if name == "corda_fast.ops" or name.startswith("corda_fast.ops."):
            outside = sorted(m for m in GRAPH[name] if not (m == "corda_fast.ops" or m.startswith("corda_fast.ops.")))
            assert not outside, f"{name} imports {outside}"


@pytest.mark.parametrize("module", LOW)
def test_lower_layers_never_reach_peft(module):
    users = sorted(m for m in reach(module) | {module} if "peft" in EXTERNAL[m])
    assert not users, f"{module} reaches PEFT through {users}"


ROOT = os.path.dirname(PKG)
# what reaches a compiled kernel without the registry: a backend module, the extension, its functions
BACKEND_CALL = re.compile(r"ops\.backends|ops\._C\b|from \.+ import _C|corda_fast_native|triton_xtx|\.kernels\(\)|"
                          r"registry\.register\(")
# the two test files that test the Triton kernels themselves (tile layout, autotuner, ahead-of-time compilation)
KERNEL_TESTS = {"test_triton_kernel.py", "test_triton_compile.py"}


def _python_files(folder: str):
    for root, _, files in os.walk(os.path.join(ROOT, folder)):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(root, f)


def test_no_backend_call_outside_ops():
    """One dispatch: outside ``corda_fast/ops/`` nothing imports a backend module or the extension, or registers a
    kernel (tests of the Triton kernels' own internals excepted, by name)."""
    ops_dir = os.path.join(PKG, "ops") + os.sep
    found = []
    for folder in ("corda_fast", "benchmarks", "examples", "tests"):
        for path in _python_files(folder):
            if path.startswith(ops_dir) or os.path.basename(path) in KERNEL_TESTS or path == os.path.abspath(__file__):
                continue
            for i, line in enumerate(open(path, encoding="utf-8"), 1):
                if BACKEND_CALL.search(line):
                    found.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
    assert not found, found


def test_kernels_register_only_in_backends():
    """``registry.register`` / ``registry.unavailable`` are called from ``ops/backends/`` only, and every op is
    defined (``registry.define``) next to its reference, once."""
    defined, registering = [], []
    for path in _python_files(os.path.join("corda_fast", "ops")):
        text = open(path, encoding="utf-8").read()
        defined += re.findall(r'registry\.define\("(\w+)"', text)
        if re.search(r"registry\.(register|unavailable)\(", text):
            registering.append(os.path.relpath(path, PKG))
    assert sorted(defined) == sorted(set(defined)) and len(defined) == 4, defined
    assert registering and all(p.startswith(os.path.join("ops", "backends")) for p in registering), registering


def test_streaming_uses_calibrations_public_interface():
    src = open(os.path.join(PKG, "streaming.py"), encoding="utf-8").read()
    tree = ast.parse(src)
    private = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "calibrate"
               for a in n.names if a.name.startswith("_")]
    assert not private, private


def test_functions_are_short():
    """No function of the package longer than MAX_FUNCTION_LINES lines, docstring included (no exceptions)."""
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} ({n} lines)")
    assert not long, long
