"""Static checks of the GEMM kernels' GPU code, without a GPU: the Triton kernel compiled ahead of time for sm_80
and sm_90 and the hand-written CUDA kernel (from the built extension, else compiled here with nvcc) must hold
tensor-core instructions with fp32 accumulation and must not spill."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from mixprec import _ext
from mixprec._sass import inspect_binary

triton = pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Runs in a subprocess: under TRITON_INTERPRET=1 (set by conftest.py) @triton.jit gives interpreter objects
# that triton.compile cannot build, and the variable is read when the kernels are decorated.
_AOT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mixprec.kernels.gemm import _configs, _gemm_kernel

cc, dtype, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
t = {"fp16": "*fp16", "bf16": "*bf16"}[dtype]
sig = {"a_ptr": t, "b_ptr": t, "c_ptr": t, "bias_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
       "stride_ab": "i64", "stride_am": "i32", "stride_ak": "constexpr", "stride_bk": "constexpr",
       "stride_bn": "i32", "stride_cb": "i64", "stride_cm": "i32", "stride_cn": "constexpr",
       "HAS_BIAS": "constexpr", "ACCUMULATE": "constexpr", "UPCAST_DOT": "constexpr",
       "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr"}
# what the runtime specializes on for aligned tensors: 16-divisible pointers, sizes and strides
attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 8, 10, 13)}
report = []
for i, cfg in enumerate(_configs()):
    # the linear layer's forward: a K-contiguous, b = W^T (K-contiguous), bias, half output
    constexprs = {"stride_ak": 1, "stride_bk": 1, "stride_cn": 1, "HAS_BIAS": True, "ACCUMULATE": False,
                  "UPCAST_DOT": False, **cfg.kwargs}
    k = triton.compile(ASTSource(fn=_gemm_kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", cc, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    path = f"{out_dir}/gemm_{i}.cubin"
    open(path, "wb").write(k.asm["cubin"])
    report.append({"path": path, "config": f"{cfg.kwargs} warps={cfg.num_warps} stages={cfg.num_stages}",
                   "shared": k.metadata.shared})
print(json.dumps(report))
"""


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("cc", [80, 90])
def test_triton_gemm_uses_tensor_cores_without_spills(cc, dtype, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _AOT, str(cc), dtype, str(tmp_path)], env=env, check=True,
                         capture_output=True, text=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert len(report) > 1
    for entry in report:
        info = inspect_binary(entry["path"], cc)["_gemm_kernel"]
        print(f"triton gemm sm_{cc} {dtype} {entry['config']}: {info.registers} regs, {entry['shared']} B shared, "
              f"hmma.f32={info.hmma_f32}, hgmma.f32={info.hgmma_f32}")
        assert not info.spills, f"{entry['config']} spills on sm_{cc}: {info}"
        if cc == 80:
            assert info.hmma_f32 > 0 and info.hmma_f32 == info.hmma, info
        else:  # Hopper: wgmma, fp32 accumulators
            assert info.hgmma_f32 > 0 and info.hgmma_f32 == info.hgmma, info


def _cuda_binary(tmp_path):
    """The extension .so when built with CUDA, else the kernel compiled here with nvcc (a few seconds)."""
    if _ext.available() and _ext.has_cuda_kernels():
        return _ext._C.__file__
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc):
        pytest.skip("neither a CUDA build of mixprec._C nor nvcc")
    out = tmp_path / "gemm_kernel.o"
    subprocess.run([nvcc, "-std=c++20", "-O3", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
                    "-I", os.path.join(ROOT, "csrc", "include"),
                    "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
                    "-c", os.path.join(ROOT, "csrc", "cuda", "gemm_kernel.cu"), "-o", str(out)], check=True)
    return str(out)


@pytest.fixture(scope="module")
def cuda_binary(tmp_path_factory):
    return _cuda_binary(tmp_path_factory.mktemp("gemm_cu"))


@pytest.mark.parametrize("cc", [80, 90])
def test_cuda_gemm_uses_mma_sync_without_spills(cc, cuda_binary):
    kernels = {n: k for n, k in inspect_binary(cuda_binary, cc).items() if "gemm_kernel" in n}
    # fp16 and bf16, times (a K- or M-contiguous) x (b K- or N-contiguous) on the 16-byte path, plus the fallback
    assert len(kernels) == 10, sorted(kernels)
    for name, info in kernels.items():
        print(f"cuda gemm sm_{cc} {name}: {info.registers} regs, hmma.f32={info.hmma_f32}")
        assert not info.spills, info
        # mma.sync m16n8k16 with fp32 accumulators: HMMA.16816.F32 (.BF16 for bf16) on sm_80 and sm_90 alike
        assert info.hmma_f32 > 0 and info.hmma == info.hmma_f32, info
