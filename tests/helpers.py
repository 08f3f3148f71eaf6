"""The test helpers live in the package (mixprec/testing.py) because `python -m mixprec selftest` uses them too."""
from mixprec.testing import (  # noqa: F401
    CPU_SIMD,
    DTYPES,
    assert_bitwise_equal,
    assert_close,
    random_grad,
    special_values,
)


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
