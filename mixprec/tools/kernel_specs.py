"""What `python -m mixprec inspect` and the static tests compile and predict for each Triton kernel module: the
ahead-of-time compile specs (AOT_SPECS), the roofline problems (ROOFLINE) and the benchmark shapes they share with
benchmarks/bench_gemm.py. Kept here, next to the tool that reads them, so that kernels/*.py hold only kernels.

AOT_SPECS[module] is a list of entries
    {"kernel": <@triton.jit fn>, "config": "fp16",       # label of this configuration
     "signature": {"x_ptr": "*fp16", "n": "i64", "BLOCK": "constexpr", ...},
     "constexprs": {"BLOCK": 4096}, "options": {"num_warps": 4, "num_stages": 3},
     "aligned": ["x_ptr"]}   # args the launcher guarantees 16-byte aligned (default: all pointers), or ints
                             # 16-divisible, as the JIT specializes them at run time; other keys are selectors
                             # the tests use (inspect ignores them)
ROOFLINE is a list of {"op", "problem", "bytes", "flops"}: the least traffic and the arithmetic an op must do.
"""
from __future__ import annotations

GPT2_SMALL = 124_439_808  # parameters of GPT-2 small: the size of the unscale and Adam problems

# (name, M tokens, N out features, K in features): square and the GEMMs of a 4096-wide LLM layer (LLaMA-7B-like)
LLM_SHAPES = [
    ("square 4096^3", 4096, 4096, 4096),
    ("QKV projection, 8192 tokens", 8192, 12288, 4096),
    ("MLP down projection, 8192 tokens", 8192, 4096, 11008),
    ("decode, 16 tokens", 16, 4096, 4096),
]


def _unscale_specs() -> list[dict]:
    from mixprec.kernels import unscale

    # n compiles as i32 below 2^31 elements, what nearly every gradient is; offsets are int64 regardless. The JIT
    # specializes n on 16-divisibility: a 16-divisible n (every gradient of GPT-2 and LLaMA-like models) gets the
    # 16-byte vector accesses, any other n element-wise ones; both are compiled.
    return [
        {"kernel": unscale._unscale_kernel, "config": f"{name}, {'n%16==0' if n16 else 'any n'}, BLOCK={unscale.BLOCK}",
         "n16": n16,
         "signature": {"g_ptr": f"*{name}", "n": "i32", "inv_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
                       "tensor_flag_ptr": "*fp32", "partial_ptr": "*fp32", "BLOCK": "constexpr",
                       "CHECK_ONLY": "constexpr"},
         "constexprs": {"BLOCK": unscale.BLOCK, "CHECK_ONLY": False}, "options": {"num_warps": unscale.NUM_WARPS},
         # per_tensor_inf[i:i + 1] (tensor_flag_ptr) is any element of a tensor: not 16-byte aligned
         "aligned": ["g_ptr", "inv_scale_ptr", "found_inf_ptr", "partial_ptr"] + (["n"] if n16 else [])}
        for name in ("fp32", "fp16", "bf16") for n16 in (True, False)
    ]


# Adam AOT variants: name -> (param type, master kind, state kind, amsgrad, stochastic rounding); every optional
# input present. "fp32 streams" below: the variants moving fp32 per element (masters or fp32 moments), whose
# accesses are 16-byte vectors.
ADAM_VARIANTS = {
    "fp16-master": ("fp16", "fp32", "fp32", True, False),
    "bf16-sr": ("bf16", "none", "fp32", True, True),
    "bf16-remainder": ("bf16", "remainder", "fp32", True, False),
    "bf16-remainder-bf16state": ("bf16", "remainder", "bf16", True, False),
    "bf16-remainder-int8state": ("bf16", "remainder", "int8", False, False),
    "bf16-sr-int8state": ("bf16", "none", "int8", False, True),
}


def adam_has_fp32_streams(variant: str) -> bool:
    _, master, state, _, _ = ADAM_VARIANTS[variant]
    return master == "fp32" or state == "fp32"


def _adam_specs() -> list[dict]:
    """The fused-AdamW specializations of ADAM_VARIANTS (the master and state kinds as constexprs of the one
    kernel), each for a 16-divisible n (vector accesses) and for any other n (element-wise), as the JIT
    specializes n."""
    from mixprec.kernels import adam

    masters = {"none": adam.MASTER_NONE, "fp32": adam.MASTER_FP32, "remainder": adam.MASTER_REMAINDER}
    specs = []
    for variant, (half, master, state, amsgrad, stochastic) in ADAM_VARIANTS.items():
        flags = dict(MASTER=masters[master], INT8=state == "int8", AMSGRAD=amsgrad, DECOUPLED=True, MAXIMIZE=False,
                     HAS_WD=True, HAS_SCALE=True, HAS_FOUND=True, HAS_CLIP=True, STOCHASTIC=stochastic,
                     BLOCK=adam.BLOCK)
        m, v = {"fp32": ("*fp32", "*fp32"), "bf16": ("*bf16", "*bf16"), "int8": ("*i8", "*u8")}[state]
        signature = {"p_ptr": f"*{half}", "g_ptr": f"*{half}", "m_ptr": m, "v_ptr": v, "vmax_ptr": v,
                     "w_ptr": "*fp32", "r_ptr": "*i16", "m_scale_ptr": "*fp32", "v_scale_ptr": "*fp32",
                     "step_ptr": "*fp32", "lr_ptr": "*fp32", "scale_ptr": "*fp32", "found_ptr": "*fp32",
                     "clip_ptr": "*fp32", "hyper_ptr": "*fp64", "n": "i32", "beta1_f": "fp32",
                     "one_minus_beta1_f": "fp32", "beta2_f": "fp32", "one_minus_beta2_f": "fp32", "eps_f": "fp32",
                     "wd_f": "fp32", "seed": "i32", "stream": "i32", **{k: "constexpr" for k in flags}}
        for n16 in (True, False):
            specs.append({"kernel": adam._adam_kernel, "variant": variant, "n16": n16,
                          "config": f"{variant}, {'n%16==0' if n16 else 'any n'}, BLOCK={adam.BLOCK}",
                          "signature": signature, "constexprs": flags,
                          "options": {"num_warps": adam.NUM_WARPS, "enable_fp_fusion": False},
                          # the per-element streams are whole tensors (16-byte aligned), and so are the block
                          # scales; the scalars' pointers need not be
                          "aligned": ["p_ptr", "g_ptr", "m_ptr", "v_ptr", "vmax_ptr", "w_ptr", "r_ptr",
                                      "m_scale_ptr", "v_scale_ptr", *(["n"] if n16 else [])]})
    return specs


def _gemm_specs() -> list[dict]:
    """One entry per (mode, dtype, autotune config of that mode); ACCUMULATE is a constexpr, so accumulate mode is
    a separate specialization with its own registers and SASS.

    Each mode is compiled for the layout the linear layer gives it, with what the JIT specializes at run time for
    such tensors: strides equal to 1 become constants, 16-divisible sizes and strides carry the divisibility hint
    ("aligned"). Batch strides are i64 (the launcher passes them as int64 products when a batch is large).
      forward y = x W^T (+ bias): a = x (K-contiguous), b = W^T (K-contiguous), c half (N-contiguous), bias of x's
        dtype
      weight gradient main_grad += dY^T X: a = dY^T (M-contiguous), b = X (N-contiguous), c fp32 (N-contiguous)
    """
    from mixprec.kernels import gemm

    specs = []
    for accumulate in (False, True):
        for dtype in ("fp16", "bf16"):
            for cfg in gemm.ACCUMULATE_CONFIGS if accumulate else gemm.GPU_CONFIGS:
                half = f"*{dtype}"
                if accumulate:
                    strides = {"stride_am": 1, "stride_ak": "i32", "stride_bk": "i32", "stride_bn": 1}
                else:
                    strides = {"stride_am": "i32", "stride_ak": 1, "stride_bk": 1, "stride_bn": "i32"}
                c = "*fp32" if accumulate else half
                # without a bias the launcher passes c as bias_ptr (never read): its type is c's
                signature = {"a_ptr": half, "b_ptr": half, "c_ptr": c, "bias_ptr": c if accumulate else half,
                             "M": "i32", "N": "i32", "K": "i32", "stride_ab": "i64",
                             **{name: "constexpr" if kind == 1 else kind for name, kind in strides.items()},
                             "stride_cb": "i64", "stride_cm": "i32", "stride_cn": "constexpr",
                             "HAS_BIAS": "constexpr", "ACCUMULATE": "constexpr", "UPCAST_DOT": "constexpr",
                             "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                             "GROUP_M": "constexpr"}
                constexprs = {**{name: 1 for name, kind in strides.items() if kind == 1}, "stride_cn": 1,
                              "HAS_BIAS": not accumulate, "ACCUMULATE": accumulate, "UPCAST_DOT": False,
                              **cfg.kwargs}
                aligned = ["a_ptr", "b_ptr", "c_ptr", "M", "N", "K", "stride_cm"]
                aligned += [n for n, kind in strides.items() if kind != 1] + ([] if accumulate else ["bias_ptr"])
                k = cfg.kwargs
                mode = "accumulate (dW)" if accumulate else "forward+bias"
                tile = f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}"
                # "dtype" and "accumulate" select entries in tests/test_gemm_static.py
                specs.append({"kernel": gemm._gemm_kernel, "dtype": dtype, "accumulate": accumulate,
                              "config": f"{dtype} {mode} {tile}", "signature": signature, "constexprs": constexprs,
                              "aligned": aligned,
                              "options": {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}})
    return specs


_AOT_BUILDERS = {"adam": _adam_specs, "gemm": _gemm_specs, "unscale": _unscale_specs}


def aot_specs(module: str) -> list[dict]:
    """The AOT compile specs of kernels/<module>.py (importing the module: triton must be importable)."""
    return _AOT_BUILDERS[module]()


def modules() -> list[str]:
    """The kernel modules with specs, by name."""
    return sorted(_AOT_BUILDERS)


ROOFLINE = [
    # fp16 params with fp32 masters: read grad 2, master 4, m 4, v 4; write master 4, m 4, v 4, param 2
    # (28 B/param); ~20 flops per param (moments, sqrt, divide, decay, unscale and clip) is an estimate:
    # memory-bound either way
    {"op": "adam_step_", "problem": "GPT-2 small params, fp16 + fp32 masters (124.4M)", "bytes": 28 * GPT2_SMALL,
     "flops": 20 * GPT2_SMALL},
    # bf16 params with int16 remainders: read grad 2, param 2, remainder 2, write param 2, remainder 2; moments
    # read and written: fp32 4 + 4 each way (26 B/param), bf16 2 + 2 (18 B), int8 1 + 1 plus two fp32 scales per
    # 256 elements (14 B + 16/256)
    {"op": "adam_step_", "problem": "GPT-2 small params, bf16 + remainders, fp32 states (124.4M)",
     "bytes": 26 * GPT2_SMALL, "flops": 20 * GPT2_SMALL},
    {"op": "adam_step_", "problem": "GPT-2 small params, bf16 + remainders, bf16 states (124.4M)",
     "bytes": 18 * GPT2_SMALL, "flops": 20 * GPT2_SMALL},
    {"op": "adam_step_", "problem": "GPT-2 small params, bf16 + remainders, int8 states (124.4M)",
     "bytes": 14 * GPT2_SMALL + 16 * GPT2_SMALL // 256, "flops": 30 * GPT2_SMALL},
    # fp16 operands and output: 2*M*N*K flops (an FMA counted as 2), each of A, B, C moved once (2 bytes/element):
    # the least traffic any kernel can get away with. The weight-gradient entry reads and writes an fp32 C instead.
    *({"op": "matmul", "problem": f"{name} (MxNxK {m}x{n}x{k}), fp16", "flops": 2 * m * n * k,
       "bytes": (m * k + k * n + m * n) * 2} for name, m, n, k in LLM_SHAPES),
    {"op": "matmul_accumulate_", "problem": "weight gradient 4096x4096 over 8192 tokens, fp16 into fp32",
     "flops": 2 * 4096 * 4096 * 8192, "bytes": (4096 * 8192 + 8192 * 4096) * 2 + 4096 * 4096 * 8},
    # fp16: read 2 B + write 2 B per element; flops: the multiply and the square-accumulate (an FMA counted as 2)
    {"op": "unscale_and_check_", "problem": "GPT-2 small grads, fp16 (124.4M)", "bytes": 4 * GPT2_SMALL,
     "flops": 3 * GPT2_SMALL},
]
