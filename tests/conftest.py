import os

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter; it must be on before any kernel is decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(params=["avx512", "avx2", "portable"])
def cpu_simd(request, monkeypatch):
    """Runs a CPU-kernel test with each CPU kernel: AVX-512, AVX2 and portable (skipping those the CPU lacks)."""
    from tests.helpers import use_cpu_simd

    use_cpu_simd(f"cpu-{request.param}", monkeypatch)
    return request.param


@pytest.fixture
def one_thread():
    """Runs a test with one torch thread: the end-to-end models are tiny (one thread is faster, and on a busy
    2-core machine much faster), and bit-for-bit comparisons between runs need one fixed thread count
    (it changes the GEMM blocking, hence the rounding)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
