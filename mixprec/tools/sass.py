"""What the compiled GPU code holds, read from a cubin or from the extension .so without a GPU.

`inspect_binary(path, arch)` returns, per kernel of that architecture, the registers, stack/local memory
(non-zero means spills or local arrays), static shared memory and the tensor-core instruction counts (HMMA on
sm_80-class mma.sync, HGMMA for sm_90's wgmma, each also counted with fp32 accumulation). `elf_facts(path, arch)`
reads what only the ELF sections say: each kernel's __launch_bounds__ and whether SHARED counts the system
reservation. The one place that reads cubins; used by the static tests and by `python -m mixprec inspect`.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass


@dataclass
class KernelInfo:
    name: str
    arch: str
    registers: int = 0
    stack_bytes: int = 0
    local_bytes: int = 0
    shared_bytes: int = 0  # static only; dynamic shared memory is a launch parameter
    hmma: int = 0
    hmma_f32: int = 0
    hgmma: int = 0
    hgmma_f32: int = 0

    @property
    def spills(self) -> bool:
        """Local memory in use: ptxas spilled registers (none of mixprec's kernels use local arrays)."""
        return self.stack_bytes > 0 or self.local_bytes > 0


@functools.cache
def cuobjdump() -> str:
    """cuobjdump from the CUDA toolkit, else the copy that ships with triton (the toolkit here lacks it)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME", "/usr/local/cuda"),):
        cand = os.path.join(root, "bin", "cuobjdump")
        if os.path.exists(cand):
            return cand
    try:
        import triton

        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(cand):
            return cand
    except ImportError:
        pass
    raise FileNotFoundError("cuobjdump not found (CUDA toolkit or the triton package provide it)")


def _arch(arch) -> str:
    return arch if str(arch).startswith("sm_") else f"sm_{arch}"


def _run(*args: str) -> str:
    return subprocess.run([cuobjdump(), *args], check=True, capture_output=True, text=True).stdout


_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_FUNC = re.compile(r"^\s*Function : (\S+)\s*$", re.M)


def inspect_binary(path: str, arch) -> dict[str, KernelInfo]:
    """Per-kernel resources and tensor-core instruction counts of the `arch` (80, "sm_90", ...) code in a cubin,
    an object file or a shared library with embedded fatbins."""
    arch = _arch(arch)
    kernels: dict[str, KernelInfo] = {}
    for name, reg, stack, shared, local in _RES.findall(_run("-res-usage", "-arch", arch, path)):
        kernels[name] = KernelInfo(name, arch, int(reg), int(stack), int(local), int(shared))
    sass = _run("-sass", "-arch", arch, path)
    starts = [(m.start(), m.group(1)) for m in _FUNC.finditer(sass)]
    for i, (pos, name) in enumerate(starts):
        body = sass[pos: starts[i + 1][0] if i + 1 < len(starts) else len(sass)]
        info = kernels.setdefault(name, KernelInfo(name, arch))
        info.hmma = len(re.findall(r"\bHMMA\.", body))
        info.hmma_f32 = len(re.findall(r"\bHMMA\.\S*\.F32\b", body))
        info.hgmma = len(re.findall(r"\bHGMMA\.", body))
        info.hgmma_f32 = len(re.findall(r"\bHGMMA\.\S*\.F32\b", body))
    return kernels


_MAX_THREADS = re.compile(r"EIATTR_MAX_THREADS\s+Format:\s+\S+\s+Value:\s+(0x[0-9a-f]+) (0x[0-9a-f]+) (0x[0-9a-f]+)")


def elf_facts(path: str, arch) -> tuple[dict[str, int], bool]:
    """What the resource summary does not say, from the ELF sections of the `arch` code: each kernel's
    __launch_bounds__ thread count (EIATTR_MAX_THREADS, "Value: 0x200 0x1 0x1"; kernels without bounds are
    absent), and whether SHARED includes the 1 KB system reservation (sm_90 cubins count it, and carry a
    .nv.reservedSmem section)."""
    elf = _run("-elf", "-arch", _arch(arch), path)
    bounds = {}
    for section in elf.split(".nv.info.")[1:]:
        name = section.split(None, 1)[0]
        m = _MAX_THREADS.search(section)
        if m:
            bounds[name] = int(m.group(1), 16) * int(m.group(2), 16) * int(m.group(3), 16)
    return bounds, ".nv.reservedSmem" in elf
