"""unscale_and_check_ on the fp16 gradient list of GPT-2 small (124.4M elements, 249 MB: far out of cache).

Ours (unscale + overflow check + sum of squares in one pass) against torch's unscale alone, and against torch's
unscale followed by the norm a user needs for clipping (torch._foreach_norm, as clip_grad_norm_ does it); GB/s
from the bytes the op must move (read 2 B + write 2 B per element) against a streaming ceiling with the same
in-place mix at the same size, timed in the same rounds as ours and the peers (timing.measure_interleaved).
"""
from __future__ import annotations

import torch

import mixprec
from mixprec import _backend, _ext
from mixprec.benchmarks.ceiling import cpu_stream, cuda_copy_gbps, gbps
from mixprec.benchmarks.rows import row, run_on_device
from mixprec.benchmarks.timing import measure_gpu, measure_interleaved, reduced

OP = "unscale_and_check_"


def gpt2_grad_shapes(vocab: int = 50257, context: int = 1024, width: int = 768, layers: int = 12) -> list[tuple]:
    """Parameter shapes of GPT-2 (Hugging Face layout: Conv1D weights are in x out), in model order."""
    ln = [(width,), (width,)]
    block = [*ln, (width, 3 * width), (3 * width,), (width, width), (width,),  # ln_1, attn.c_attn, attn.c_proj
             *ln, (width, 4 * width), (4 * width,), (4 * width, width), (width,)]  # ln_2, mlp.c_fc, mlp.c_proj
    return [(vocab, width), (context, width), *block * layers, *ln]


def _problem() -> tuple[list[tuple], str]:
    if reduced():
        shapes = gpt2_grad_shapes(vocab=1000, context=64, width=64, layers=2)
        return shapes, "GPT-2-shaped, tiny"
    return gpt2_grad_shapes(), "GPT-2 small"


def _grads(shapes, device) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(s, generator=gen, device=device, dtype=torch.float32).half() for s in shapes]


# (label, inv_scales cycled through, bytes read and written per fp16 element). Unscaling by 2 and 1/2 in turn
# is exact in fp16, so the values neither drift to inf nor to zero however many repeats run; inv_scale == 1 only
# reads, in the kernels' read-only loop, the one the scaler's check pass before a fused optimizer step runs too
# (check_only=True by 1/scale: the same instructions, another multiplier), and torch's check pass.
PASSES = [("unscale", (2.0, 0.5), 2, 2), ("check pass, inv_scale=1", (1.0,), 2, 0)]


def _contenders(grads, device, scales):
    """ours(backend) -> fn(i), and the peers as {name: fn(i)}, cycling through `scales`."""
    inv_scales = [torch.tensor([s], device=device) for s in scales]
    found_inf = torch.zeros(1, device=device)
    norm_sq = torch.zeros(1, device=device)

    def torch_unscale(i):
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scales[i % len(scales)])

    def torch_unscale_norm(i):
        torch_unscale(i)
        # what torch.nn.utils.clip_grad_norm_ computes before it clips
        torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

    def ours(backend):
        return lambda i: mixprec.ops.unscale_and_check_(grads, inv_scales[i % len(scales)], found_inf, norm_sq,
                                                        backend=backend)

    peers = {"torch unscale": torch_unscale, "torch unscale+foreach_norm": torch_unscale_norm}
    return ours, peers


def _shape(label, grads, n, pass_label):
    return f"{label}: {len(grads)} tensors, {n / 1e6:.1f}M" + ("" if pass_label == "unscale" else f"; {pass_label}")


def _run_cpu(quick: bool) -> list[dict]:
    if not _ext.available():
        raise RuntimeError(f"mixprec._C is not built ({_ext.LOAD_ERROR})")
    shapes, label = _problem()
    grads = _grads(shapes, "cpu")
    n = sum(g.numel() for g in grads)
    repeats, min_time_s = (3, 0.0) if reduced() else (10, 0.0) if quick else (40, 3.0)
    # note: no buffer rotation: 249 MB is eight times the 32 MB L3 already, and a second copy would cost
    # another 249 MB of RAM shared with the other engineers' builds.
    rows = []
    for pass_label, scales, read, write in PASSES:
        ours, peers = _contenders(grads, "cpu", scales)
        # the ceiling runs in the same rounds as ours and the peers: a load change hits all of them alike
        contenders = {"ours": ours("cpu"), "ceiling": cpu_stream(read * n, write * n), **peers}
        timings = measure_interleaved(contenders, repeats=repeats, min_time_s=min_time_s)
        ceiling = timings.pop("ceiling")
        work = (read + write) * n
        rows.append(row(op=OP, backend="cpu", device="cpu", shape=_shape(label, grads, n, pass_label),
                        dtype="float16", timing=timings.pop("ours"), unit="GB/s", work=work,
                        ceiling=gbps(work, ceiling), peers=timings,
                        notes="with norm_sq; ceiling: stream of the same bytes "
                              f"({'in place' if write else 'read only'}), "
                              f"IQR {ceiling.q25_ms:.3g}-{ceiling.q75_ms:.3g} ms"))
    return rows


def _run_cuda(quick: bool) -> list[dict]:
    shapes, label = _problem()
    grads = _grads(shapes, "cuda")
    n = sum(g.numel() for g in grads)
    # do_bench calls fn() without an argument; a counter keeps the scales cycling.
    counter = iter(range(1 << 62))
    time = lambda fn: measure_gpu(lambda: fn(next(counter)), quick=quick)  # noqa: E731
    backends = (["cuda"] if _ext.has_cuda_kernels() else []) + (["triton"] if _backend.triton_available() else [])
    rows = []
    for pass_label, scales, read, write in PASSES:
        ours, peers = _contenders(grads, "cuda", scales)
        ceiling = cuda_copy_gbps(read * n, write * n, quick=quick)
        peer_timings = {name: time(fn) for name, fn in peers.items()}
        rows += [row(op=OP, backend=b, device="cuda", shape=_shape(label, grads, n, pass_label), dtype="float16",
                     timing=time(ours(b)), unit="GB/s", work=(read + write) * n, ceiling=ceiling.gbps,
                     peers=peer_timings, notes="with norm_sq; ceiling: device-to-device copy of the same bytes")
                 for b in backends]
    return rows


def run(quick: bool, device: str) -> list[dict]:
    return run_on_device(device, quick, cpu=_run_cpu, cuda=_run_cuda)
