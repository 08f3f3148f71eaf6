"""fp16/bf16 GEMM with fp32 accumulation in Triton: ``c = a @ b (+ bias)`` or ``c += a @ b`` (fp32 c).

Three layers, as every Triton op here: the private ``@triton.jit`` kernel ``_gemm_kernel``, the launcher
``gemm`` (shapes, strides, batch folding, grid) and the public functions in ``mixprec.ops.gemm``.

note: bf16 under the interpreter. triton 3.8's interpreter stores bf16 as raw uint16 and its ``tl.dot`` calls
``np.matmul`` on those arrays, so a bf16 ``tl.dot`` multiplies the *bit patterns* as integers (results of 1e10
or inf). Under TRITON_INTERPRET=1 (and only there) the kernel widens bf16 tiles to fp32 before ``tl.dot``.
Widening bf16 -> fp32 is exact (done on the bits by _rounding.to_float32: the interpreter's own bf16 -> fp32
cast gets subnormals wrong) and the interpreter's fp32 ``np.matmul`` accumulates in fp32, so the result is
the same math the tensor cores do (exact products, fp32 sums) up to summation order. On a GPU the widening would
change the instruction (tf32/fp32 mma instead of bf16 mma), which is why it is keyed on interpret mode. fp16
``tl.dot`` is correct in the interpreter and is left alone.
"""
import torch
import triton
import triton.language as tl

from mixprec._backend import triton_interpreter_enabled as interpreting

from ._rounding import round_to, to_float32

# Only configs whose sm_80 and sm_90 builds are spill-free (tests/test_gemm_static.py checks every one, through the
# AOT specs in mixprec/tools/kernel_specs.py): 128x128 tiles for large GEMMs, 64-row tiles for skinny LLM shapes
# (few tokens). note: 128x256 / 256x128 tiles (what Hopper wants for peak) spill with this kernel in triton 3.8 and
# were left out; see the README.
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
    for bm, bn, bk, s, w in [
        (128, 128, 64, 4, 8),
        (128, 128, 64, 3, 8),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
    ]
]


# note: accumulate mode (c += a @ b, fp32 c) holds an fp32 C tile beside the accumulator in its epilogue: with
# 128-row tiles that spills on sm_80 (255 registers + 32 B of stack, for every 128x128 and 128x64 variant tried,
# found when the AOT specs came to cover this mode), so it tunes over the 64-row tiles only. Whether a small spill
# with 128x128 tiles would beat spill-free 64-row tiles has not been measured (no GPU here).
ACCUMULATE_CONFIGS = [c for c in GPU_CONFIGS if c.kwargs["BLOCK_M"] == 64]


def _configs(accumulate: bool = False):
    if interpreting():
        # note: one config under the interpreter. Autotuning there would run every config on every new shape
        # (minutes of numpy); large tiles also mean fewer interpreted programs, which is what costs time.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=1)]
    return ACCUMULATE_CONFIGS if accumulate else GPU_CONFIGS


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr,
    M, N, K,
    stride_ab, stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M consecutive programs walk down a column of tiles, so a group shares the
    # same B tiles (and nearby A rows) while they are in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    batch = tl.program_id(1).to(tl.int64)

    # note: int64 where it matters. The tile's base offset is computed in int64 (a batched activation can exceed
    # 2^31 elements); offsets inside a tile stay int32 (the launcher checks stride * block < 2^31), because a
    # 64-bit offset per element doubles the registers of the pointer tensors and made the big configs spill.
    a_ptr += batch * stride_ab + (pid_m * BLOCK_M).to(tl.int64) * stride_am
    b_ptr += (pid_n * BLOCK_N).to(tl.int64) * stride_bn
    c_ptr += batch * stride_cb + (pid_m * BLOCK_M).to(tl.int64) * stride_cm + (pid_n * BLOCK_N).to(tl.int64) * stride_cn
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge are clamped (wrapped) instead of masked: they load valid memory, only
    # feed accumulators the store mask drops, and keep the loads free of per-row predicates. Only K is masked.
    rm_load = (pid_m * BLOCK_M + rm) % M - pid_m * BLOCK_M
    rn_load = (pid_n * BLOCK_N + rn) % N - pid_n * BLOCK_N
    a_ptrs = a_ptr + rm_load[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + rn_load[None, :] * stride_bn
    mask_m = pid_m * BLOCK_M + rm < M
    mask_n = pid_n * BLOCK_N + rn < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST_DOT:  # interpreter only, see the module note
            a = to_float32(a)
            b = to_float32(b)
        acc = tl.dot(a, b, acc, out_dtype=tl.float32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue in fp32, one rounding at the store.
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    mask_c = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += to_float32(tl.load(bias_ptr + pid_n * BLOCK_N + rn, mask=mask_n, other=0.0))[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask_c, other=0.0)
    tl.store(c_ptrs, round_to(acc, c_ptr.dtype.element_ty), mask=mask_c)


_KEY = ["M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn"]
# Two tuned entry points over the one kernel: in accumulate mode every timed trial run adds into c again, so
# the autotuner must restore c after each one (restore_value); the plain mode must not pay for that copy.
_gemm = triton.autotune(configs=_configs(), key=_KEY)(_gemm_kernel)
_gemm_accumulate = triton.autotune(configs=_configs(accumulate=True), key=_KEY, restore_value=["c_ptr"])(_gemm_kernel)


def _batched(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[..., rows, cols] -> [B, rows, cols]; a view unless the batch dims cannot be merged (then reshape copies)."""
    return x.reshape(-1, rows, cols)


def _foldable(x3: torch.Tensor) -> bool:
    """True when the batch of x3 [B, rows, cols] can be read as rows B*rows with one row stride."""
    return x3.shape[0] == 1 or x3.stride(0) == x3.shape[1] * x3.stride(1)


def _fold(x3: torch.Tensor) -> torch.Tensor:
    b, rows, cols = x3.shape
    return x3.as_strided((1, b * rows, cols), (b * rows * x3.stride(1), x3.stride(1), x3.stride(2)))


def gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None,
         accumulate: bool = False) -> torch.Tensor:
    """Launch the kernel for validated inputs: a [..., M, K] and b [K, N] of one half dtype, out [..., M, N]
    (fp16/bf16/fp32; fp32 and read first when accumulate), bias [N] or None. Any strides on a, b and bias; out
    must be viewable as [B, M, N] (it is written in place) with no two elements at one address (the caller checks)."""
    M, K = a.shape[-2], a.shape[-1]
    N = b.shape[-1]
    if out.numel() == 0 or (accumulate and K == 0):
        return out
    if K == 0:
        # no k-loop at all: c = bias (or zeros), rounded once; keeps the kernel free of a K == 0 special case
        out.copy_(bias.float().expand(out.shape) if bias is not None else torch.zeros_like(out))
        return out
    if bias is not None and N > 1 and bias.stride(0) != 1:
        # note: the kernel reads the bias at unit stride (one vector load per tile). A strided or expanded [N] view
        # (stride 0: one stored element) is copied to a contiguous [N] here: N elements, nothing beside the GEMM,
        # and it keeps the stride (and its int32/int64 question) out of the kernel and its AOT specs.
        bias = bias.contiguous()
    a3 = _batched(a, M, K)
    out3 = out.view(-1, M, N)
    # One big GEMM over B*M rows keeps the tiles full (batched activations of a linear layer are the usual case).
    if _foldable(a3) and _foldable(out3):
        a3, out3 = _fold(a3), _fold(out3)
    grid = lambda meta: (triton.cdiv(a3.shape[1], meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), a3.shape[0])
    largest = max(abs(s) for s in (*a3.stride()[1:], *b.stride(), *out3.stride()[1:]))
    if largest * 256 >= 2**31:  # see the note on int64 in the kernel
        raise NotImplementedError(f"strides above {2**31 // 256} elements are not supported by the Triton GEMM")
    fn = _gemm_accumulate if accumulate else _gemm
    fn[grid](
        a3, b, out3, bias if bias is not None else out3,
        a3.shape[1], N, K,
        a3.stride(0), a3.stride(1), a3.stride(2),
        b.stride(0), b.stride(1),
        out3.stride(0), out3.stride(1), out3.stride(2),
        HAS_BIAS=bias is not None,
        ACCUMULATE=accumulate,
        UPCAST_DOT=interpreting() and a.dtype == torch.bfloat16,
    )
    return out
