"""Build of the one extension, mixprec._C.

The CUDA part is built when torch has CUDA and a toolkit is found (CUDA_HOME, else /usr/local/cuda);
MIXPREC_FORCE_CPU=1 builds the CPU part only (fast local iteration). Sources are globbed: adding an op
means adding files under csrc/, never editing this file. The C++ standard, the default architectures
(TORCH_CUDA_ARCH_LIST overrides them) and the compiler flags are csrc/build_settings.json's, which
CMakeLists.txt and the static tests read too.
"""
import glob
import json
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(ROOT, "csrc", "build_settings.json")) as f:
    SETTINGS = json.load(f)
STD = f"-std=c++{SETTINGS['cxx_standard']}"

# torch.utils.cpp_extension reads CUDA_HOME when imported, and without it guesses from the nvcc on PATH
# (here a wrapper in /usr/local/bin, which sends the link looking for /usr/local/lib64/libcudart).
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
# the default architectures as TORCH_CUDA_ARCH_LIST spells them: "8.0;9.0" (A100, H100)
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(f"{a // 10}.{a % 10}" for a in SETTINGS["cuda_architectures"]))

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _sources(*patterns):
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join("csrc", pattern)))


def _want_cuda():
    if os.environ.get("MIXPREC_FORCE_CPU", "0") not in ("", "0"):
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    # Portable x86-64 code; the AVX2 kernels carry their own target attribute and are picked at run time.
    cxx = [STD, *SETTINGS["cxx_flags"], "-DMIXPREC_PYTHON_MODULE"]
    cpu_sources = _sources("*.cpp", "cpu/*.cpp")
    if not _want_cuda():
        return CppExtension("mixprec._C", cpu_sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    archs = ",".join("sm_" + a.replace(".", "").replace("+PTX", "")
                     for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";") if a)
    defines = ["-DMIXPREC_WITH_CUDA", f'-DMIXPREC_CUDA_ARCHS="{archs}"']
    nvcc = [STD, *SETTINGS["nvcc_flags"]]
    return CUDAExtension("mixprec._C", cpu_sources + _sources("cuda/*.cpp", "cuda/*.cu"),
                         include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc + defines},
                         extra_link_args=["-fopenmp"])


setup(
    packages=["mixprec", "mixprec.ops", "mixprec.amp", "mixprec.tools", "mixprec.kernels", "mixprec.benchmarks",
              "mixprec.examples"],
    package_dir={"mixprec": "mixprec", "mixprec.kernels": "kernels", "mixprec.benchmarks": "benchmarks",
                 "mixprec.examples": "examples"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
