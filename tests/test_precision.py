"""mixprec.prepare on models built like transformers' (which is not installed, and must not become a dependency):
normalization layers of any library stay fp32, non-persistent buffers (rotary inv_freq) are left alone, and
transformers' Conv1D (GPT-2) runs on mixprec's GEMM with its checkpoint layout unchanged.

The look-alike classes below follow transformers' own definitions (LlamaRMSNorm, LlamaRotaryEmbedding,
pytorch_utils.Conv1D): the attributes, buffer registration and forward math that prepare() meets in a real model.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mixprec
import mixprec.nn
from mixprec import _ext, precision
from mixprec.testing import GEMM_TOL, max_rel_err

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

HALF = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
BACKENDS = ["triton", "reference"] + (["cpu"] if _ext.available() else [])


# ------------------------------------------------------------------------------------------------ look-alikes

class LlamaRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: weight, variance_epsilon, the statistics in fp32, the result scaled by the
    weight after a cast back to the input's dtype."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(input_dtype)


class LlamaRotaryEmbedding(nn.Module):
    """transformers' LlamaRotaryEmbedding: inv_freq computed in fp32 and registered persistent=False; the angles
    computed in fp32 whatever the activations' dtype, cos and sin returned in x's dtype."""

    def __init__(self, dim, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x, position_ids):
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: a linear layer with the weight stored [nx, nf] (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class TinyLlama(nn.Module):
    """One Llama decoder layer: RMSNorm, attention with rotary embeddings, RMSNorm, SwiGLU MLP, final RMSNorm."""

    def __init__(self, vocab=50, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.rotary_emb = LlamaRotaryEmbedding(dim // heads)
        self.input_layernorm = LlamaRMSNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.post_attention_layernorm = LlamaRMSNorm(dim)
        self.gate_proj, self.up_proj = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
        self.down_proj = nn.Linear(2 * dim, dim, bias=False)
        self.norm = LlamaRMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        b, t = ids.shape
        h = self.embed_tokens(ids)
        cos, sin = self.rotary_emb(h, torch.arange(t)[None].expand(b, t))
        x = self.input_layernorm(h)
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = (y * cos[:, None] + _rotate_half(y) * sin[:, None] for y in (q, k))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.o_proj(a.transpose(1, 2).reshape(b, t, -1))
        x = self.post_attention_layernorm(h)
        h = h + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.lm_head(self.norm(h))


class GPT2Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.c_attn, self.c_proj = Conv1D(3 * dim, dim), Conv1D(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (y.view(b, t, self.heads, -1).transpose(1, 2) for y in self.c_attn(x).split(d, dim=2))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(a.transpose(1, 2).reshape(b, t, d))


class GPT2MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(4 * dim, dim), Conv1D(dim, 4 * dim)

    def forward(self, x):
        return self.c_proj(nn.functional.gelu(self.c_fc(x), approximate="tanh"))


class TinyGPT2(nn.Module):
    """GPT-2's layout (wte/wpe, pre-norm blocks of Conv1D attention and MLP, ln_f) with one block."""

    def __init__(self, vocab=50, dim=32, heads=2, positions=64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(positions, dim)
        self.ln_1, self.attn = nn.LayerNorm(dim), GPT2Attention(dim, heads)
        self.ln_2, self.mlp = nn.LayerNorm(dim), GPT2MLP(dim)
        self.ln_f, self.lm_head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        h = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        h = h + self.attn(self.ln_1(h))
        h = h + self.mlp(self.ln_2(h))
        return self.lm_head(self.ln_f(h))


def _conv1ds(model):
    return {name: m for name, m in model.named_modules() if type(m).__name__ == "Conv1D"}


# ------------------------------------------------------------------------------------------------ normalization

@pytest.mark.parametrize("dtype", HALF)
def test_prepare_keeps_another_librarys_rmsnorm_in_fp32(dtype):
    torch.manual_seed(0)
    model, optimizer, scaler = mixprec.prepare(TinyLlama(), dtype=dtype)
    norms = {"input_layernorm", "post_attention_layernorm", "norm"}
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name.split(".")[0] in norms else dtype), name
    seen = {}
    model.input_layernorm.register_forward_hook(lambda m, a, o: seen.update(io=(a[0].dtype, o.dtype)))
    out = model(torch.randint(0, 50, (2, 9)))
    assert seen["io"] == (torch.float32, dtype)  # computes in fp32, hands the next layer `dtype`
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


class _Named(nn.Module):
    def __init__(self, child=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))
        if child is not None:
            self.child = child


def _named(name, child=None, base=_Named):
    return type(name, (base,), {})(child)


@pytest.mark.parametrize("name, expected", [
    ("T5LayerNorm", True), ("FusedRMSNorm", True), ("MixedFusedLayerNorm", True), ("RMSNormGated", True),
    ("LayerNorm2d", True), ("Norm", True), ("LayerNormalization", True),
    ("Normal", False), ("Normalize", False), ("NormalizedEmbedding", False), ("Linear", False),
])
def test_normalization_is_recognized_by_class_name(name, expected):
    assert precision.looks_like_normalization(_named(name)) is expected


def test_normalization_rule_reads_base_classes_and_skips_blocks_with_weights():
    assert precision.looks_like_normalization(type("Scaled", (LlamaRMSNorm,), {})(4))  # a subclass
    # a block named PreNorm holding a Linear is not a normalization layer; one holding only an activation is
    assert not precision.looks_like_normalization(_named("PreNorm", nn.Linear(4, 4)))
    assert precision.looks_like_normalization(_named("RMSNormAct", nn.SiLU()))


def test_keep_fp32_takes_classes_and_predicates():
    torch.manual_seed(1)
    nothing, _, _ = mixprec.prepare(TinyLlama(), dtype=torch.float16, keep_fp32=())
    assert nothing.norm.weight.dtype == torch.float16
    more, _, _ = mixprec.prepare(TinyLlama(), dtype=torch.float16,
                                 keep_fp32=(*precision.DEFAULT_KEEP_FP32, lambda m: isinstance(m, nn.Embedding)))
    assert more.norm.weight.dtype == more.embed_tokens.weight.dtype == torch.float32
    assert more.lm_head.weight.dtype == torch.float16 and more(torch.randint(0, 50, (2, 5))).dtype == torch.float32
    with pytest.raises(TypeError, match=r"keep_fp32 must hold nn.Module subclasses or predicates.*int"):
        mixprec.prepare(TinyLlama(), dtype=torch.float16, keep_fp32=(int,))


# ------------------------------------------------------------------------------------------------ buffers

@pytest.mark.parametrize("dtype", HALF)
def test_prepare_leaves_rotary_inv_freq_in_fp32(dtype):
    """inv_freq is a non-persistent buffer: left exactly as the module made it, so the rotary angles at long
    positions stay right. Bound: cos/sin rounded once to `dtype` (eps/2 relative, at most eps/2 absolute) plus
    the fp32 angle's error (p * inv_freq * 2^-23 < 1e-3 rad at p < 4096); an fp16 inv_freq is off by up to
    2^-11 relative, about a radian at p = 2048."""
    torch.manual_seed(2)
    fresh = TinyLlama()
    inv_freq = fresh.rotary_emb.inv_freq.clone()
    model, _, _ = mixprec.prepare(fresh, dtype=dtype)
    assert model.rotary_emb.inv_freq.dtype == torch.float32 and torch.equal(model.rotary_emb.inv_freq, inv_freq)
    assert "rotary_emb.inv_freq" not in model.state_dict()
    positions = torch.arange(0, 4096, 7)[None]
    cos, sin = model.rotary_emb(torch.zeros(1, dtype=dtype), positions)
    angle = positions[0, :, None].double() * inv_freq.double()
    angle = torch.cat((angle, angle), -1)
    tol = torch.finfo(dtype).eps / 2 + 1e-3
    assert cos.dtype == dtype
    assert (cos[0].double() - angle.cos()).abs().max() <= tol and (sin[0].double() - angle.sin()).abs().max() <= tol


def test_prepare_casts_persistent_buffers_only():
    class WithBuffers(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("offset", torch.randn(4))  # model state: cast, as model.half() does
            self.register_buffer("table", torch.randn(4), persistent=False)  # a derived constant: left alone
            self.register_buffer("index", torch.arange(4))  # integer: never cast

        def forward(self, x):
            return self.lin(x) + self.offset

    model, _, _ = mixprec.prepare(WithBuffers(), dtype=torch.bfloat16)
    assert model.offset.dtype == torch.bfloat16 and model.table.dtype == torch.float32
    assert model.index.dtype == torch.int64
    assert model(torch.randn(3, 4)).dtype == torch.float32


# ------------------------------------------------------------------------------------------------ Conv1D

def test_conv1d_is_recognized_by_name_and_layout():
    assert mixprec.nn.is_conv1d_like(Conv1D(5, 3))
    assert not mixprec.nn.is_conv1d_like(nn.Conv1d(3, 5, 1))  # torch's convolution
    assert not mixprec.nn.is_conv1d_like(mixprec.nn.Conv1D(5, 3))  # already swapped
    renamed = type("Projection", (Conv1D,), {})(5, 3)  # a subclass may have its own forward
    assert not mixprec.nn.is_conv1d_like(renamed)
    odd = Conv1D(5, 3)
    odd.nf = 4  # nf must be the weight's second dim
    assert not mixprec.nn.is_conv1d_like(odd)
    with pytest.raises(TypeError, match="conv must be a transformers-style Conv1D"):
        mixprec.nn.Conv1D.from_conv1d(nn.Linear(3, 5))


def _fp64_conv1d(conv, x, grad):
    """Outputs and gradients of the look-alike Conv1D in fp64, for the same (exact) half inputs."""
    ref = copy.deepcopy(conv).double()
    xd = x.detach().double().requires_grad_()
    y = ref(xd.contiguous())
    y.backward(grad.double())
    return y, xd.grad, ref.weight.grad, ref.bias.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(2, 7, 33), (5, 33), (33,)], ids=["batch", "2-D", "1-D"])
def test_mixprec_conv1d_matches_transformers_conv1d(shape, dtype, backend):
    """Forward and every gradient against the look-alike's in fp64, within the GEMM bounds; the weight's gradient
    arrives in the weight's [nx, nf] layout (contiguous), so nothing is transposed or copied for it."""
    torch.manual_seed(3)
    conv = Conv1D(17, 33)
    with torch.no_grad():
        conv.bias.normal_()  # transformers initialises it to zeros, which would check nothing
    half = mixprec.nn.Conv1D.from_conv1d(copy.deepcopy(conv).to(dtype))
    half.backend = backend
    x = torch.randn(shape).to(dtype).requires_grad_()
    grad = torch.randn(*shape[:-1], 17).to(dtype)
    y = half(x)
    y.backward(grad)
    y_ref, dx, dw, db = _fp64_conv1d(conv.to(dtype), x, grad)
    for what, got, want in (("y", y, y_ref), ("dx", x.grad, dx), ("dw", half.weight.grad, dw),
                            ("db", half.bias.grad, db)):
        assert got.dtype == dtype and got.shape == want.shape, what
        assert max_rel_err(got, want) <= GEMM_TOL[dtype], f"{what}: {max_rel_err(got, want):.2e}"
    assert half.weight.grad.is_contiguous()


def test_mixprec_conv1d_in_fp32_is_transformers_conv1d():
    """Outside fp16/bf16 (an fp32 model before conversion) the layer runs the same addmm: bit for bit."""
    torch.manual_seed(4)
    conv = Conv1D(6, 5)
    ours = mixprec.nn.Conv1D.from_conv1d(conv)
    x = torch.randn(3, 4, 5)
    assert torch.equal(ours(x), conv(x))
    assert ours.weight is conv.weight and ours.bias is conv.bias and (ours.nf, ours.nx) == (6, 5)
    fresh = mixprec.nn.Conv1D(6, 5)
    assert fresh.weight.shape == (5, 6) and fresh.bias.shape == (6,) and fresh.state_dict().keys() == {"weight",
                                                                                                      "bias"}


@pytest.mark.parametrize("dtype", HALF)
def test_prepare_swaps_conv1d_keeping_the_checkpoint_layout(dtype):
    torch.manual_seed(5)
    net = TinyGPT2()
    checkpoint = {k: v.clone() for k, v in net.state_dict().items()}
    before = dict(net.named_parameters())
    model, _, _ = mixprec.prepare(net, dtype=dtype)
    assert {type(m) for m in _conv1ds(model).values()} == {mixprec.nn.Conv1D} and len(_conv1ds(model)) == 4
    assert all(p is before[name] for name, p in model.named_parameters())  # the optimizer holds the same objects
    state = model.state_dict()
    assert state.keys() == checkpoint.keys()
    assert all(state[k].shape == v.shape for k, v in checkpoint.items())
    model.load_state_dict(checkpoint)  # an fp32 checkpoint of the unprepared model (a Hugging Face one) loads
    assert model.attn.c_attn.weight.dtype == dtype and torch.equal(model.attn.c_attn.weight,
                                                                   checkpoint["attn.c_attn.weight"].to(dtype))
    untouched, _, _ = mixprec.prepare(TinyGPT2(), dtype=dtype, swap_linear=False)
    assert {type(m) for m in _conv1ds(untouched).values()} == {Conv1D}


def _train(model, optimizer, scaler, ids, steps):
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype", HALF)
def test_tiny_gpt2_trains_on_mixprec_gemms(dtype):
    """A GPT-2 block through prepare(): every Conv1D on mixprec's GEMM, steps taken (none skipped), and the losses
    follow the same model trained in fp32 by torch.optim.AdamW (0.01 relative: the fp16/bf16 forward's rounding
    in a 32-wide model; the loss itself falls by far more)."""
    torch.manual_seed(6)
    ids = torch.randint(0, 50, (4, 17))
    fp32 = TinyGPT2()
    half = copy.deepcopy(fp32)
    want = _train(fp32, torch.optim.AdamW(fp32.parameters(), lr=1e-2), None, ids, 8)
    calls = []
    model, optimizer, scaler = mixprec.prepare(half, dtype=dtype, optimizer_kwargs={"lr": 1e-2},
                                               scaler_kwargs={"init_scale": 256.0} if dtype == torch.float16 else None)
    for conv in _conv1ds(model).values():
        conv.register_forward_hook(lambda m, a, o: calls.append(type(m)))
    got = _train(model, optimizer, scaler, ids, 8)
    assert set(calls) == {mixprec.nn.Conv1D} and len(calls) == 4 * 8
    assert scaler.get_scale() == (256.0 if dtype == torch.float16 else 1.0), "a step was skipped"
    assert got[-1] < 0.9 * got[0], got
    for step, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= 1e-2 * w, f"step {step}: loss {g} in {dtype}, {w} in fp32"


def test_mixprec_conv1d_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break; aot_eager traces the op's registered backward."""
    torch.manual_seed(7)
    conv = mixprec.nn.Conv1D.from_conv1d(Conv1D(6, 5).half())
    x = torch.randn(3, 4, 5).half().requires_grad_()
    y = torch.compile(conv, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(y, conv(x))
    y.float().sum().backward()
    assert x.grad.shape == x.shape and conv.weight.grad.shape == (5, 6) and conv.weight.grad.is_contiguous()
