"""`python -m mixprec inspect`: what the GPU kernels will do on A100 / H100, found without a GPU.

Every Triton kernel is compiled ahead of time for sm_80 and sm_90 (triton.compile with a GPUTarget), every
CUDA kernel is taken from the built extension's cubins, and each cubin is read with the cuobjdump that ships
with triton (through mixprec.tools.sass): registers per thread, spills (local memory in use), shared memory, an
occupancy estimate from those and the SM limits, and tensor-core instruction counts (HMMA on sm_80,
HGMMA on sm_90). Then a roofline *prediction* for A100 and H100 SXM from the bytes and flops each op must
move and the published peaks: no GPU has run anything.

The Triton kernels' compile specs and the roofline problems are in mixprec/tools/kernel_specs.py.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

from mixprec.tools import kernel_specs
from mixprec.tools.sass import KernelInfo, elf_facts, inspect_binary

# Per-SM limits (CUDA C Programming Guide, "Technical Specifications per Compute Capability").
SM_LIMITS = {
    80: {"regs": 65536, "threads": 2048, "blocks": 32, "smem": 164 * 1024, "max_regs_per_thread": 255},
    90: {"regs": 65536, "threads": 2048, "blocks": 32, "smem": 228 * 1024, "max_regs_per_thread": 255},
}
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_RESERVED_PER_BLOCK = 1024  # sm_80 and later reserve 1 KB of shared memory per block for the system
SMEM_ALLOC_UNIT = 128

# Published dense fp16 tensor-core peaks and HBM bandwidths (NVIDIA data sheets).
GPUS = {
    "A100": {"arch": 80, "tflops": 312.0, "tbps": 2.0, "name": "A100 (fp16 dense 312 TFLOP/s, 2.0 TB/s)"},
    "H100 SXM": {"arch": 90, "tflops": 989.0, "tbps": 3.35, "name": "H100 SXM (fp16 dense 989 TFLOP/s, 3.35 TB/s)"},
    # the lent GPU machine's: the H100's SM at 4.8 TB/s of HBM3e
    "H200": {"arch": 90, "tflops": 989.0, "tbps": 4.8, "name": "H200 (fp16 dense 989 TFLOP/s, 4.8 TB/s)"},
}
# The GPUs this command models (SM_LIMITS, GPUS). What the extension itself is built for is
# csrc/build_settings.json's (`python -m mixprec info` shows it); an installed package has no csrc/ to read.
ARCHS = (80, 90)


# ---------------------------------------------------------------- cubin reading

def read_binary(path: str, arch: int) -> list[tuple[KernelInfo, int | None, int]]:
    """(resources, launch-bounds threads or None, static smem without the reservation) per kernel of `arch`."""
    bounds, reservation_counted = elf_facts(path, arch)
    out = []
    for name, k in inspect_binary(path, arch).items():
        smem = max(0, k.shared_bytes - SMEM_RESERVED_PER_BLOCK) if reservation_counted else k.shared_bytes
        out.append((k, bounds.get(name), smem))
    return out


# The template parameters of each CUDA kernel (csrc/cuda/*.cu), in order: a dtype, a flag named only when it is
# on, a flag with a word for each value (a pair: true, false), or an enum with a word for each value (a dict).
# A kernel left out here is shown as the compiler prints it.
_TEMPLATE_PARAMS = {
    "adam_kernel": ("dtype", {"(MasterKind)0": "no master", "(MasterKind)1": "fp32 master",
                              "(MasterKind)2": "remainder master"},
                    {"(StateKind)0": "fp32 states", "(StateKind)1": "bf16 states", "(StateKind)2": "int8 states"},
                    "amsgrad", ("AdamW", "Adam"), "stochastic rounding"),
    "unscale_kernel": ("dtype",),
    "gemm_kernel": ("dtype", ("A K-contiguous", "A M-contiguous"), ("B K-contiguous", "B N-contiguous"),
                    ("16-byte vectors", "scalar loads")),
}
_DTYPE_WORDS = {"(DType)0": "fp32", "(DType)1": "fp16", "(DType)2": "bf16", "__half": "fp16",
                "__nv_bfloat16": "bf16", "float": "fp32"}


def _short_name(demangled: str) -> str:
    """'void mixprec::cuda::(anonymous namespace)::adam_kernel<(mixprec::DType)1, true, ...>(args)' ->
    'adam_kernel (fp16, fp32 master, fp32 states, Adam)': the instance in words (_TEMPLATE_PARAMS)."""
    name = re.sub(r"\(anonymous namespace\)::|mixprec::cuda::|mixprec::", "", demangled)
    name = re.sub(r"^void ", "", name)
    depth = 0
    for i, ch in enumerate(name):  # cut the parameter list: the first '(' outside template brackets
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            name = name[:i]
            break
    base, _, args = name.partition("<")
    params = _TEMPLATE_PARAMS.get(base)
    values = [v.strip() for v in args.rstrip(">").split(",")] if args else []
    if params is None or len(values) != len(params):
        return name
    words = []
    for param, value in zip(params, values):
        if param == "dtype":
            words.append(_DTYPE_WORDS.get(value, value))
        elif isinstance(param, dict):
            words.append(param.get(value, value))
        elif value not in ("true", "false"):
            words.append(f"{param}={value}")
        elif isinstance(param, tuple):
            words.append(param[value == "false"])
        elif value == "true":
            words.append(param)
    return f"{base} ({', '.join(words)})"


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


# ---------------------------------------------------------------- occupancy

def occupancy(arch: int, threads: int, regs: int, smem: int) -> tuple[float, str]:
    """Estimated fraction of the SM's warp slots filled, and what limits it (threads / regs / smem / blocks).
    smem: the block's shared memory without the system reservation, which is added here."""
    lim = SM_LIMITS[arch]
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    smem_per_block = -(-(smem + SMEM_RESERVED_PER_BLOCK) // SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT
    limits = {
        "blocks": lim["blocks"],
        "threads": lim["threads"] // (warps * 32),
        "regs": (lim["regs"] // regs_per_warp) // warps,
        "smem": lim["smem"] // smem_per_block,
    }
    limiter = min(limits, key=lambda k: limits[k])
    blocks = limits[limiter]
    return min(1.0, blocks * warps * 32 / lim["threads"]), limiter


# ---------------------------------------------------------------- the kernels

@dataclass
class KernelReport:
    source: str  # "triton" or "cuda"
    module: str  # kernels module or cubin file
    kernel: str
    config: str
    arch: int
    threads: int | None
    regs: int
    spills: bool  # local memory or stack in use: ptxas spilled (mixprec's kernels use no local arrays)
    local_bytes: int
    stack_bytes: int
    smem_bytes: int  # static + dynamic, without the system reservation
    occupancy: float | None
    occupancy_limiter: str
    hmma: int
    hgmma: int
    notes: str = ""


def _report(source, module, kernel, config, arch, res: KernelInfo, threads, smem, notes=""):
    """smem: static (without the system reservation) + dynamic shared memory of one block."""
    occ, limiter = occupancy(arch, threads, res.registers, smem) if threads else (None, "block size unknown")
    return KernelReport(source, module, kernel, config, arch, threads, res.registers, res.spills, res.local_bytes,
                        res.stack_bytes, smem, occ, limiter, res.hmma, res.hgmma, notes)


def compile_triton(spec: dict, arch: int, where: str = ""):
    """triton.compile of one AOT spec (mixprec/tools/kernel_specs.py) for sm_<arch>, as the JIT would specialize
    it (the "aligned" arguments carry the 16-divisibility hint); returns triton's compiled kernel (.asm["cubin"],
    .metadata)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec["kernel"]
    if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError(f"{where}: {spec['config']}: the kernel is not a compilable @triton.jit function "
                           "(unset TRITON_INTERPRET to inspect)")
    sig = spec["signature"]
    aligned = spec.get("aligned", [a for a, t in sig.items() if t.startswith("*")])
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=spec.get("constexprs", {}), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec.get("options", {}))


def compile_spec(spec: dict, arch: int, where: str = "") -> KernelReport:
    """Compiles one AOT spec for sm_<arch> and reads its cubin."""
    compiled = compile_triton(spec, arch, where)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res, _, static_smem = next(k for k in read_binary(path, arch) if k[0].name == compiled.metadata.name)
    threads = compiled.metadata.num_warps * 32 * compiled.metadata.num_ctas
    return _report("triton", where, spec["kernel"].__name__, spec["config"], arch, res, threads,
                   static_smem + compiled.metadata.shared)


def triton_reports(archs=ARCHS) -> list[KernelReport]:
    """Every AOT spec of every Triton kernel module (mixprec/tools/kernel_specs.py), compiled for each arch."""
    reports = []
    for module_name in kernel_specs.modules():
        for spec in kernel_specs.aot_specs(module_name):
            reports += [compile_spec(spec, arch, f"kernels/{module_name}.py") for arch in archs]
    return reports


def extension_path() -> str | None:
    from mixprec import _ext

    return _ext._C.__file__ if _ext.available() else None


def cuda_reports(archs=ARCHS) -> tuple[list[KernelReport], str]:
    """Every kernel in the extension's cubins; the second value says why there are none, if so."""
    from mixprec import _ext

    so = extension_path()
    if so is None:
        return [], f"mixprec._C is not built ({_ext.LOAD_ERROR})"
    if not _ext.has_cuda_kernels():
        return [], "mixprec._C was built without its CUDA part"
    reports = []
    for arch in archs:
        kernels = read_binary(so, arch)
        for (res, threads, smem), readable in zip(kernels, demangle([k[0].name for k in kernels])):
            notes = "" if threads else "no __launch_bounds__: occupancy not estimated"
            # dynamic shared memory is a launch parameter the binary does not record: static only
            reports.append(_report("cuda", os.path.basename(so), _short_name(readable), "", arch, res, threads,
                                   smem, notes))
    return reports, ""


# ---------------------------------------------------------------- roofline

def roofline() -> list[dict]:
    """Predicted time on each GPU for every kernel_specs.ROOFLINE problem: max(bytes / bandwidth, flops / peak)."""
    out = []
    for w in kernel_specs.ROOFLINE:
        for gpu, spec in GPUS.items():
            t_mem = w["bytes"] / (spec["tbps"] * 1e12)
            t_math = w["flops"] / (spec["tflops"] * 1e12)
            t = max(t_mem, t_math)
            out.append({"op": w["op"], "problem": w["problem"], "gpu": gpu, "bytes": w["bytes"],
                        "flops": w["flops"], "intensity_flop_per_byte": w["flops"] / w["bytes"],
                        "bound": "memory" if t_mem >= t_math else "compute", "predicted_ms": t * 1e3,
                        "predicted_tflops": w["flops"] / t / 1e12, "predicted_gbps": w["bytes"] / t / 1e9})
    return out


# ---------------------------------------------------------------- the command

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--arch", type=int, action="append", choices=ARCHS, help="only this compute capability")


def collect(archs=ARCHS) -> dict:
    cuda, why_no_cuda = cuda_reports(archs)
    return {"kernels": [asdict(r) for r in triton_reports(archs) + cuda], "cuda_note": why_no_cuda,
            "roofline": roofline(), "gpus": GPUS,
            "prediction_note": "roofline figures are predictions from published peaks, not measurements"}


def format_report(d: dict) -> str:
    header = ["source", "kernel", "config", "sm", "threads", "regs", "spills", "local B", "smem B", "occupancy",
              "HMMA", "HGMMA"]
    body = []
    for k in d["kernels"]:
        occ = f"{100 * k['occupancy']:.0f}% ({k['occupancy_limiter']})" if k["occupancy"] is not None else "-"
        body.append([k["source"], k["kernel"], k["config"], str(k["arch"]), str(k["threads"] or "?"), str(k["regs"]),
                     "yes" if k["spills"] else "no", str(k["local_bytes"] + k["stack_bytes"]), str(k["smem_bytes"]),
                     occ, str(k["hmma"]), str(k["hgmma"])])
    lines = ["Kernels (compiled for the target without a GPU; read from the cubins)", _columns(header, body)]
    if d["cuda_note"]:
        lines.append(f"CUDA kernels: none ({d['cuda_note']})")
    if any(k["source"] == "cuda" for k in d["kernels"]):
        lines.append("note: CUDA kernels show static shared memory only (dynamic shared memory is a launch "
                     "parameter), and their occupancy leaves it out")
    for note in sorted({f"{k['kernel']}: {k['notes']}" for k in d["kernels"] if k["notes"]}):
        lines.append(f"note: {note}")
    lines += ["", "Roofline PREDICTION (published peaks; nothing was run on a GPU):"]
    body = [[r["op"], r["problem"], r["gpu"], r["bound"], f"{r['predicted_ms']:.3g}", f"{r['predicted_gbps']:.0f}",
             f"{r['predicted_tflops']:.3g}"] for r in d["roofline"]]
    lines.append(_columns(["op", "problem", "gpu", "bound", "ms", "GB/s", "TFLOP/s"], body))
    lines += [f"  {g['name']}" for g in d["gpus"].values()]
    return "\n".join(lines)


def _columns(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body])


def main(args) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: inspect compiles the Triton kernels for real GPUs; unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    d = collect(tuple(args.arch) if args.arch else ARCHS)
    print(json.dumps(d, indent=2) if args.json else format_report(d))
    return 0
