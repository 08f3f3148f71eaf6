"""csrc/build_settings.json for the static tests: the architectures they compile and inspect for, and the nvcc
command line of a .cu file compiled here as setup.py and CMakeLists.txt compile it (same standard, flags and
architectures). Imported by name (`from build_settings import ...`): tests/ is on sys.path under pytest and when a
script of tests/ runs."""
from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

with open(os.path.join(ROOT, "csrc", "build_settings.json")) as _f:
    SETTINGS = json.load(_f)

ARCHS: tuple[int, ...] = tuple(SETTINGS["cuda_architectures"])  # compute capability x 10: (80, 90)

# What torch.utils.cpp_extension adds to every nvcc command of the extension build (COMMON_NVCC_FLAGS)
# that the .cu files depend on: no implicit half/bfloat16 conversions.
_TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                       "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def nvcc_flags() -> list[str]:
    """The standard, the common nvcc flags, torch's defines and one -gencode per architecture (SASS, as the build)."""
    gencode = [f for a in ARCHS for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    return [f"-std=c++{SETTINGS['cxx_standard']}", *SETTINGS["nvcc_flags"], *_TORCH_NVCC_DEFINES, *gencode]
