"""The test helpers live in the package (mixprec/testing.py) because `python -m mixprec selftest` uses them too."""
from mixprec.testing import DTYPES, assert_bitwise_equal, assert_close, random_grad, special_values  # noqa: F401


def use_backend(name: str, monkeypatch) -> str:
    """The backend argument for a test parameter: "cpu-avx2" and "cpu-portable" both give "cpu", with
    MIXPREC_CPU_SIMD set so that the one or the other CPU kernel runs (skips when the CPU lacks AVX2)."""
    if name.startswith("cpu"):
        import pytest

        from mixprec.tools.info import cpu_flags

        if name == "cpu-avx2" and not {"avx2", "fma", "f16c"} <= cpu_flags():
            pytest.skip("CPU lacks AVX2/FMA/F16C")
        monkeypatch.setenv("MIXPREC_CPU_SIMD", "1" if name == "cpu-avx2" else "0")
        return "cpu"
    return name
