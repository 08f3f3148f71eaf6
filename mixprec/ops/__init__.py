"""The public functional API of mixprec's kernels. Each op takes backend="auto"|"cuda"|"triton"|"cpu"|"reference"."""
from mixprec.ops.adam import adam_step_
from mixprec.ops.gemm import matmul, matmul_accumulate_
from mixprec.ops.unscale import unscale_and_check_

__all__ = ["adam_step_", "matmul", "matmul_accumulate_", "unscale_and_check_"]
