"""Static checks of the GEMM kernels' GPU code, without a GPU: the Triton kernel compiled ahead of time for the
build's architectures (sm_80 and sm_90, csrc/build_settings.json) and the hand-written CUDA kernel (from the built
extension, else compiled here with nvcc as the build compiles it) must hold tensor-core instructions with fp32
accumulation and must not spill."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from build_settings import ARCHS, ROOT, nvcc_flags

from mixprec import _ext
from mixprec.tools.sass import inspect_binary

triton = pytest.importorskip("triton")


# Runs in a subprocess: under TRITON_INTERPRET=1 (set by conftest.py) @triton.jit gives interpreter objects
# that triton.compile cannot build, and the variable is read when the kernels are decorated. The specs (signature,
# specialization, configs) are the module's entries of mixprec/tools/kernel_specs.py, the same that
# `python -m mixprec inspect` compiles.
_AOT = r"""
import json, sys
from mixprec.tools.inspector import compile_triton
from mixprec.tools.kernel_specs import aot_specs

cc, dtype, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
report = []
for i, spec in enumerate(s for s in aot_specs("gemm") if s["dtype"] == dtype):
    k = compile_triton(spec, cc, "kernels/gemm.py")
    path = f"{out_dir}/gemm_{i}.cubin"
    open(path, "wb").write(k.asm["cubin"])
    report.append({"path": path, "config": spec["config"], "accumulate": spec["accumulate"],
                   "shared": k.metadata.shared})
print(json.dumps(report))
"""


def test_aot_specs_cover_every_config_and_mode():
    from mixprec.kernels import gemm
    from mixprec.tools.kernel_specs import aot_specs

    specs = aot_specs("gemm")
    assert len(gemm.GPU_CONFIGS) > 1 and gemm.ACCUMULATE_CONFIGS
    seen = {(s["dtype"], s["accumulate"], s["constexprs"]["BLOCK_M"], s["constexprs"]["BLOCK_N"],
             s["constexprs"]["BLOCK_K"], s["options"]["num_warps"], s["options"]["num_stages"]) for s in specs}
    want = {(dt, acc, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
            for dt in ("fp16", "bf16") for acc in (False, True) for c in (gemm.ACCUMULATE_CONFIGS if acc else
                                                                       gemm.GPU_CONFIGS)}
    assert seen == want and len(specs) == len(want)
    for s in specs:  # every kernel argument is typed, and every constexpr has a value
        assert list(s["signature"]) == gemm._gemm_kernel.arg_names, s["config"]
        assert {a for a, t in s["signature"].items() if t == "constexpr"} == set(s["constexprs"]), s["config"]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("cc", ARCHS)
def test_triton_gemm_uses_tensor_cores_without_spills(cc, dtype, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _AOT, str(cc), dtype, str(tmp_path)], env=env, check=True,
                         capture_output=True, text=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert {e["accumulate"] for e in report} == {False, True} and len(report) > 2
    for entry in report:
        info = inspect_binary(entry["path"], cc)["_gemm_kernel"]
        print(f"triton gemm sm_{cc} {entry['config']}: {info.registers} regs, {entry['shared']} B shared, "
              f"hmma.f32={info.hmma_f32}, hgmma.f32={info.hgmma_f32}")
        assert not info.spills, f"{entry['config']} spills on sm_{cc}: {info}"
        if cc == 80:
            assert info.hmma_f32 > 0 and info.hmma_f32 == info.hmma, info
        else:  # Hopper: wgmma, fp32 accumulators
            assert info.hgmma_f32 > 0 and info.hgmma_f32 == info.hgmma, info


def _cuda_binary(tmp_path):
    """The extension .so when built with CUDA, else the kernel compiled here with nvcc (a few seconds) with the
    build's standard, flags and architectures."""
    if _ext.available() and _ext.has_cuda_kernels():
        return _ext._C.__file__
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc):
        pytest.skip("neither a CUDA build of mixprec._C nor nvcc")
    out = tmp_path / "gemm_kernel.o"
    subprocess.run([nvcc, *nvcc_flags(), "-I", os.path.join(ROOT, "csrc", "include"),
                    "-c", os.path.join(ROOT, "csrc", "cuda", "gemm_kernel.cu"), "-o", str(out)], check=True)
    return str(out)


@pytest.fixture(scope="module")
def cuda_binary(tmp_path_factory):
    return _cuda_binary(tmp_path_factory.mktemp("gemm_cu"))


@pytest.mark.parametrize("cc", ARCHS)
def test_cuda_gemm_uses_mma_sync_without_spills(cc, cuda_binary):
    kernels = {n: k for n, k in inspect_binary(cuda_binary, cc).items() if "gemm_kernel" in n}
    # fp16 and bf16, times (a K- or M-contiguous) x (b K- or N-contiguous) on the 16-byte path, plus the fallback
    assert len(kernels) == 10, sorted(kernels)
    for name, info in kernels.items():
        print(f"cuda gemm sm_{cc} {name}: {info.registers} regs, hmma.f32={info.hmma_f32}")
        assert not info.spills, info
        # mma.sync m16n8k16 with fp32 accumulators: HMMA.16816.F32 (.BF16 for bf16) on sm_80 and sm_90 alike
        assert info.hmma_f32 > 0 and info.hmma == info.hmma_f32, info
