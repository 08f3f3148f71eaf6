"""mixprec.ops.unscale_and_check_ against torch's own unscale (bitwise) and mixprec.reference (flags, norm)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixprec
from mixprec import reference
from tests.helpers import DTYPES, assert_bitwise_equal, random_grad

BACKENDS = ["cpu-avx2", "cpu-portable", "triton", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The backend name to pass; the two CPU variants differ only in MIXPREC_CPU_SIMD."""
    name = request.param
    if name.startswith("cpu"):
        from mixprec.info import cpu_flags

        if name == "cpu-avx2" and not {"avx2", "fma", "f16c"} <= cpu_flags():
            pytest.skip("CPU lacks AVX2/FMA/F16C")
        monkeypatch.setenv("MIXPREC_CPU_SIMD", "1" if name == "cpu-avx2" else "0")
        return "cpu"
    return name


def _scalars(inv=1 / 3):
    # 1/3 is not a power of two: every product is rounded, so bitwise equality checks the rounding mode.
    return torch.tensor([inv], dtype=torch.float32), torch.zeros(1), torch.zeros(1)


def _torch_unscale(grads, inv_scale):
    """torch's kernel, on copies; returns (unscaled copies, found_inf)."""
    copies = [g.clone() for g in grads]
    found = torch.zeros(1)
    by_dtype = {}
    for c in copies:  # torch's op wants one dtype per call on the CPU
        by_dtype.setdefault(c.dtype, []).append(c)
    for group in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv_scale)
    return copies, found


def _reference_norm(grads, inv_scale):
    norm = torch.zeros(1)
    reference.unscale_and_check_([g.clone() for g in grads], inv_scale, torch.zeros(1), norm)
    return norm.item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 7, 127, 129, 1000, 65537, 300_001])
@pytest.mark.parametrize("specials", [False, True])
def test_matches_torch_bitwise(backend, dtype, n, specials):
    gen = torch.Generator().manual_seed(n * 7 + DTYPES.index(dtype))
    grads = [random_grad(n, dtype, generator=gen, specials=specials)]
    original = [g.clone() for g in grads]
    inv_scale, found_inf, norm_sq = _scalars()
    expected, expected_found = _torch_unscale(original, inv_scale)
    mixprec.ops.unscale_and_check_(grads, inv_scale, found_inf, norm_sq, backend=backend)
    assert_bitwise_equal(grads[0], expected[0], f"{backend} {dtype} n={n}")
    assert found_inf.item() == expected_found.item() == (1.0 if specials and n > 0 else 0.0)
    ref_norm = _reference_norm(original, inv_scale)
    if specials and n > 0:
        assert not torch.isfinite(norm_sq).item()
    else:
        # fp32 accumulation: partial sums run over at most a few thousand terms, then a fixed tree; 1e-5
        # relative (~170 fp32 ulps) is well above that error bound and far below what any real bug gives.
        assert norm_sq.item() == pytest.approx(ref_norm, rel=1e-5, abs=0.0)
