"""Configure and build CMakeLists.txt against the pip-installed torch (used by `make test-cpp` and CI).

Encodes what the build machines need: torch's CMake prefix, the toolkit's nvcc, and the nvrtc library from the
nvidia wheels. The CUDA part is built when torch has CUDA and nvcc is found. (The architectures, and the
TORCH_CUDA_ARCH_LIST that torch's cmake needs at configure time, come from csrc/build_settings.json through
CMakeLists.txt itself.)
"""
import argparse
import os
import pathlib
import shutil
import subprocess
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--build-dir", default="cmake-build")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()

    root = pathlib.Path(__file__).resolve().parent.parent
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    nvcc = pathlib.Path(cuda_home, "bin", "nvcc")
    force_cpu = os.environ.get("MIXPREC_FORCE_CPU", "0") not in ("", "0")
    with_cuda = torch.version.cuda is not None and nvcc.exists() and not force_cpu
    generator = "Ninja" if shutil.which("ninja") else "Unix Makefiles"
    cmd = ["cmake", "-S", str(root), "-B", args.build_dir, "-G", generator,
           f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
           f"-DMIXPREC_WITH_CUDA={'ON' if with_cuda else 'OFF'}"]
    if with_cuda:
        site = pathlib.Path(torch.__file__).resolve().parent.parent
        cmd += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}",
                f"-DCUDA_nvrtc_LIBRARY={site / 'nvidia' / 'cu13' / 'lib' / 'libnvrtc.so.13'}"]
    subprocess.run(cmd, check=True)
    subprocess.run(["cmake", "--build", args.build_dir, "-j", str(args.jobs)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
