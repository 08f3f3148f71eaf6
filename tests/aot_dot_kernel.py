"""A tl.dot kernel compiled by mixprec.tools.inspector in a subprocess (tests/test_cli.py): checks that the SASS reader
finds tensor-core instructions (HMMA on sm_80, HGMMA on sm_90) before any GEMM kernel of ours exists to show it.
Run as a script, with TRITON_INTERPRET unset; prints {arch: report} as JSON, for the build's architectures
(csrc/build_settings.json)."""
import json
from dataclasses import asdict

import triton
import triton.language as tl
from build_settings import ARCHS

from mixprec.tools.inspector import compile_spec


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
    b = tl.load(b_ptr + offs[:, None] * BLOCK + offs[None, :])
    tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, b))


SPEC = {"kernel": _dot_kernel, "config": "fp16 64x64", "signature": {"a_ptr": "*fp16", "b_ptr": "*fp16",
        "c_ptr": "*fp32", "BLOCK": "constexpr"}, "constexprs": {"BLOCK": 64}, "options": {"num_warps": 4}}

if __name__ == "__main__":
    print(json.dumps({arch: asdict(compile_spec(SPEC, arch, "tests/aot_dot_kernel.py")) for arch in ARCHS}))
