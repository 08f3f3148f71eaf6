"""The test helpers live in the package (mixprec/testing.py) because `python -m mixprec selftest` uses them too."""
from mixprec.testing import DTYPES, assert_bitwise_equal, assert_close, random_grad, special_values  # noqa: F401

# MIXPREC_CPU_SIMD for each CPU kernel, and the CPU flags it needs (csrc/cpu/cpu_features.h)
CPU_SIMD = {
    "cpu-avx512": ("avx512", {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl"}),
    "cpu-avx2": ("avx2", {"avx2", "fma", "f16c"}),
    "cpu-portable": ("0", set()),
}


def use_cpu_simd(name: str, monkeypatch) -> None:
    """Sets MIXPREC_CPU_SIMD so that the named CPU kernel ("cpu-avx512", "cpu-avx2", "cpu-portable") runs; skips
    when the CPU lacks its instructions."""
    import pytest

    from mixprec.tools.info import cpu_flags

    env, flags = CPU_SIMD[name]
    if not flags <= cpu_flags():
        pytest.skip(f"CPU lacks {', '.join(sorted(flags - cpu_flags()))}")
    monkeypatch.setenv("MIXPREC_CPU_SIMD", env)


def use_backend(name: str, monkeypatch) -> str:
    """The backend argument for a test parameter: the CPU_SIMD names all give "cpu", with MIXPREC_CPU_SIMD set
    so that that CPU kernel runs (skips when the CPU lacks its instructions)."""
    if name in CPU_SIMD:
        use_cpu_simd(name, monkeypatch)
        return "cpu"
    return name
