"""What `python -m mixprec info` prints: versions, what the extension holds, devices, backend choice."""
from __future__ import annotations

import platform

import torch

import mixprec
from mixprec import _backend, _ext


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def info() -> dict:
    """Versions, build, devices and backend choice as a dict (what `python -m mixprec info` prints)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    build = _ext.build_info()
    cuda_ok = torch.cuda.is_available()
    flags = cpu_flags()

    def auto(device_type: str) -> str:
        try:
            return _backend.select("auto", torch.device(device_type))
        except (RuntimeError, ValueError) as exc:
            return f"unavailable ({exc})"

    return {
        "mixprec": mixprec.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "extension_loaded": _ext.available(),
        "extension_error": None if _ext.LOAD_ERROR is None else str(_ext.LOAD_ERROR),
        "built_cpu": build["cpu"],
        "built_cuda": build["cuda"],
        "cuda_archs": build["cuda_archs"],
        "cpu": _cpu_model(),
        "cpu_cores": torch.get_num_threads(),
        "cpu_avx2_fma_f16c": {"avx2", "fma", "f16c"} <= flags,
        "cuda_device": torch.cuda.get_device_name(0) if cuda_ok else None,
        "auto_backend_cpu": auto("cpu"),
        "auto_backend_cuda": auto("cuda") if cuda_ok else None,
        "triton_interpreter": _backend.triton_interpreter_enabled(),
    }


def format_info(d: dict) -> str:
    width = max(len(k) for k in d)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in d.items())
