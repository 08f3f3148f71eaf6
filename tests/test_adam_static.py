"""Static checks of the Adam kernels' GPU code, without a GPU: the CUDA kernels of the built extension and the
Triton kernel compiled ahead of time for the build's architectures (sm_80 and sm_90, csrc/build_settings.json) must
not spill, and must use 16-byte accesses."""
import itertools
import json
import os
import re
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


def _cuda_adam_variants() -> int:
    """The adam_kernel instances csrc/include/mixprec/adam_dispatch.h's adam_variant_exists allows: fp32 masters for
    half params, remainders for bf16 params, SR for bf16 params without masters, amsgrad without int8 states; x
    decoupled."""
    n = 0
    for dtype, master, state, amsgrad, sr in itertools.product(
            ("fp32", "fp16", "bf16"), ("none", "fp32", "remainder"), ("fp32", "bf16", "int8"), (0, 1), (0, 1)):
        master_ok = (master == "none" or (master == "fp32" and dtype != "fp32")
                     or (master == "remainder" and dtype == "bf16"))
        sr_ok = not sr or (dtype == "bf16" and master == "none")
        n += master_ok and sr_ok and not (amsgrad and state == "int8")
    return 2 * n


@pytest.mark.skipif(not (_ext.available() and _ext.has_cuda_kernels()), reason="mixprec._C built without CUDA")
@pytest.mark.parametrize("cc", ARCHS)
def test_cuda_adam_kernels_without_spills(cc):
    # the adam_kernel templates (mangled "11adam_kernelI"), not count_steps_kernel from the same file
    kernels = {n: k for n, k in inspect_binary(_ext._C.__file__, cc).items() if "11adam_kernelI" in n}
    assert len(kernels) == _cuda_adam_variants() == 70, sorted(kernels)
    for info in kernels.values():
        assert not info.spills and info.registers <= 64, info  # 2 blocks of 512 threads per SM
    sass = subprocess.run([cuobjdump(), "-sass", "-arch", f"sm_{cc}", _ext._C.__file__], capture_output=True,
                          text=True, check=True).stdout
    funcs = {m.group(1): body for m, body in zip(re.finditer(r"Function : (\S+)", sass),
                                                  re.split(r"Function : \S+", sass)[1:])}
    int8 = [body for name, body in funcs.items() if "11adam_kernelI" in name and "StateKindE2" in name]
    assert len(int8) == 14
    for body in int8:  # int8 codes in 8-byte accesses, the block absmax a warp reduction
        assert "LDG.E.64" in body and "STG.E.64" in body and "REDUX.MAX" in body
    assert "LDG.E.128" in sass and "STG.E.128" in sass  # the 16-byte vector path exists
    adam_sass = "\n".join(b for n, b in funcs.items() if "11adam_kernelI" in n)
    assert not re.search(r"\bLD\.E|\bST\.E", adam_sass)  # global accesses, not generic ones
