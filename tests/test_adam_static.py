"""Static checks of the Adam kernels' GPU code, without a GPU: the CUDA kernels of the built extension and the
Triton kernel compiled ahead of time for the build's architectures (sm_80 and sm_90, csrc/build_settings.json) must
not spill, and must use 16-byte accesses."""
import json
import os
import subprocess
import sys

import pytest
from build_settings import ARCHS

from mixprec import _ext
from mixprec.tools.kernel_specs import ADAM_VARIANTS, adam_has_fp32_streams
from mixprec.tools.sass import cuobjdump, inspect_binary

triton = pytest.importorskip("triton")

# Runs in a subprocess: under TRITON_INTERPRET=1 (set by conftest.py) @triton.jit gives interpreter objects.
# The specialization is the module's entry of mixprec/tools/kernel_specs.py, the same that `python -m mixprec inspect`
# compiles.
_AOT = r"""
import json, sys
from mixprec.tools.inspector import compile_triton
from mixprec.tools.kernel_specs import aot_specs

cc, variant, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
k = compile_triton(next(s for s in aot_specs("adam") if s["variant"] == variant and s["n16"]), cc, "kernels/adam.py")
path = f"{out_dir}/adam_{variant}.cubin"
open(path, "wb").write(k.asm["cubin"])
print(json.dumps({"path": path}))
"""


@pytest.mark.parametrize("variant", ADAM_VARIANTS)
@pytest.mark.parametrize("cc", ARCHS)
def test_triton_adam_compiles_without_spills(cc, variant, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _AOT, str(cc), variant, str(tmp_path)], env=env, check=True,
                         capture_output=True, text=True).stdout
    path = json.loads(out.strip().splitlines()[-1])["path"]
    info = inspect_binary(path, cc)["_adam_kernel"]
    print(f"triton adam sm_{cc} {variant}: {info.registers} regs")
    assert not info.spills, info
    # a 16-divisible n: 4 elements per thread in vectors, so the fp32 streams (masters, fp32 moments) move in 16-byte
    # accesses and the 2-byte ones (half params and grads, remainders, bf16 moments) in 8-byte accesses
    sass = subprocess.run([cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    if adam_has_fp32_streams(variant):
        assert "LDG.E.128" in sass and "STG.E.128" in sass
    assert "LDG.E.64" in sass and "STG.E.64" in sass


@pytest.mark.skipif(not (_ext.available() and _ext.has_cuda_kernels()), reason="mixprec._C built without CUDA")
@pytest.mark.parametrize("cc", ARCHS)
def test_cuda_adam_kernels_without_spills(cc):
    # the adam_kernel templates (mangled "11adam_kernelI"), not count_steps_kernel from the same file
    kernels = {n: k for n, k in inspect_binary(_ext._C.__file__, cc).items() if "11adam_kernelI" in n}
    # 6 (dtype, master, stochastic) combinations x amsgrad x decoupled
    assert len(kernels) == 24, sorted(kernels)
    for info in kernels.values():
        assert not info.spills, info
    sass = subprocess.run([cuobjdump(), "-sass", "-arch", f"sm_{cc}", _ext._C.__file__], capture_output=True,
                          text=True, check=True).stdout
    assert "LDG.E.128" in sass and "STG.E.128" in sass  # the 16-byte vector path exists
