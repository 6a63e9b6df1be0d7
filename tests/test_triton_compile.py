"""The Triton kernels compiled ahead of time for Hopper (sm_90, the H200) on this CPU-only machine: catches code that
the interpreter accepts but the compiler rejects, and checks that the 16-bit GEMM lowers to Hopper tensor-core
instructions (wgmma). Runs in a subprocess because TRITON_INTERPRET=1 (set for the other tests) changes what
@triton.jit returns."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from corda_fast.ops.backends import triton as kernels

target = GPUTarget("cuda", 90, 32)
out = {}
names = ["p_ptr", "q_ptr", "s_ptr", "r_ptr", "bias_ptr", "c_ptr", "M", "N", "K", "R", "M_BUCKET", "stride_pm",
         "stride_pk", "stride_qk", "stride_qn", "stride_sm", "stride_sr", "stride_rr", "stride_rn", "stride_cm",
         "stride_cn"]
for dt, precision, bias in (("bf16", "ieee", True), ("fp16", "ieee", False), ("fp32", "ieee", True),
                            ("fp32", "tf32", False)):
    sig = dict(zip(names, [f"*{dt}"] * 6 + ["i32"] * 15))
    consts = dict(HAS_BIAS=bias, UPCAST=False, PRECISION=precision, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
                  BLOCK_R=16, GROUP_M=8)
    sig.update({k: "constexpr" for k in consts})
    k = triton.compile(ASTSource(fn=kernels._lowrank_gemm_kernel, signature=sig, constexprs=consts), target=target,
                       options={"num_warps": 8, "num_stages": 3})
    out[f"lowrank_{dt}_{precision}"] = {"cubin": len(k.asm["cubin"]), "wgmma": "wgmma" in k.asm["ptx"]}
xs = ["x_ptr", "s_ptr", "acc_ptr", "n_tokens", "d", "stride_xt", "stride_xd", "stride_s", "stride_am", "stride_an"]
for dt in ("bf16", "fp32"):
    sig = dict(zip(xs, [f"*{dt}", "*fp32", "*fp32"] + ["i32"] * 7))
    consts = dict(BLOCK=128, BLOCK_T=64)
    sig.update({k: "constexpr" for k in consts})
    k = triton.compile(ASTSource(fn=kernels._xtx_tile_kernel, signature=sig, constexprs=consts), target=target,
                       options={"num_warps": 8, "num_stages": 3})
    out[f"xtx_{dt}"] = {"cubin": len(k.asm["cubin"])}
print(json.dumps(out))
"""

pytestmark = pytest.mark.interpreter


def test_kernels_compile_for_sm90():
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as exc:
        pytest.skip(f"triton's compiler is not available: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr.lower()):
        pytest.skip("triton's bundled ptxas is missing")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(v["cubin"] > 0 for v in res.values()) and len(res) == 6
    assert res["lowrank_bf16_ieee"]["wgmma"] and res["lowrank_fp16_ieee"]["wgmma"]  # Hopper tensor cores
