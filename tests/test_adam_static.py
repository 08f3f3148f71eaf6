"""Static checks of the Adam kernels' GPU code, without a GPU: the CUDA kernels of the built extension and the
Triton kernel compiled ahead of time for sm_80 and sm_90 must not spill, and must use 16-byte accesses."""
import json
import os
import subprocess
import sys

import pytest

from mixprec import _ext
from mixprec._sass import inspect_binary

triton = pytest.importorskip("triton")

# Runs in a subprocess: under TRITON_INTERPRET=1 (set by conftest.py) @triton.jit gives interpreter objects.
# The specialization is the kernel module's AOT_SPECS, the same that `python -m mixprec inspect` compiles.
_AOT = r"""
import json, sys
from mixprec.inspect import compile_triton
from mixprec.kernels.adam import AOT_SPECS

cc, variant, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
k = compile_triton(next(s for s in AOT_SPECS if s["variant"] == variant), cc, "kernels/adam.py")
path = f"{out_dir}/adam_{variant}.cubin"
open(path, "wb").write(k.asm["cubin"])
print(json.dumps({"path": path}))
"""


@pytest.mark.parametrize("variant", ["fp16-master", "bf16-sr"])
@pytest.mark.parametrize("cc", [80, 90])
def test_triton_adam_compiles_without_spills(cc, variant, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _AOT, str(cc), variant, str(tmp_path)], env=env, check=True,
                         capture_output=True, text=True).stdout
    path = json.loads(out.strip().splitlines()[-1])["path"]
    info = inspect_binary(path, cc)["_adam_kernel"]
    print(f"triton adam sm_{cc} {variant}: {info.registers} regs")
    assert not info.spills, info


@pytest.mark.skipif(not (_ext.available() and _ext.has_cuda_kernels()), reason="mixprec._C built without CUDA")
@pytest.mark.parametrize("cc", [80, 90])
def test_cuda_adam_kernels_without_spills(cc):
    # the adam_kernel templates (mangled "11adam_kernelI"), not count_steps_kernel from the same file
    kernels = {n: k for n, k in inspect_binary(_ext._C.__file__, cc).items() if "11adam_kernelI" in n}
    # 6 (dtype, master, stochastic) combinations x amsgrad x decoupled
    assert len(kernels) == 24, sorted(kernels)
    for name, info in kernels.items():
        assert not info.spills, info
    sass = subprocess.run([_sass_tool(), "-sass", "-arch", f"sm_{cc}", _ext._C.__file__], capture_output=True,
                          text=True, check=True).stdout
    assert "LDG.E.128" in sass and "STG.E.128" in sass  # the 16-byte vector path exists


def _sass_tool():
    from mixprec._sass import cuobjdump

    return cuobjdump()
