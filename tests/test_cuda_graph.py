"""A whole mixed precision training step captured in one CUDA graph and replayed: forward and backward through
mixprec.nn.Linear, scaler.scale / step(FusedAdamW) / update, with the loss scale, found_inf, the grad norm for
clipping and lr all on the device. Capture fails on any host sync, so a capture that succeeds is the proof that the
step never waits for the device; the replays must then give the eager run's params and scale bit for bit, an
overflowing step (inf in the input) skipped in both.

Known difference, not compared: GradScaler's history ring buffer row is chosen on the host, so replays keep
writing the row of the captured step (history() is a diagnostic; skipped_steps() counts on the device and is
compared).
"""
import pytest
import torch

import mixprec

pytestmark = pytest.mark.cuda

STEPS = 6
WARMUP = 3  # eager steps first, on a side stream: they create the optimizer state and the scaler's tensors
POISONED = 4  # this replayed step sees inf in its input


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(mixprec.nn.Linear(64, 128), torch.nn.GELU(),
                               mixprec.nn.Linear(128, 16)).cuda().half()


def _inputs():
    gen = torch.Generator(device="cuda").manual_seed(1)
    xs = [torch.randn(32, 64, device="cuda", generator=gen).half() for _ in range(WARMUP + STEPS)]
    xs[WARMUP + POISONED][3, 5] = float("inf")
    return xs, torch.randint(0, 16, (32,), device="cuda", generator=gen)


def _parts(model):
    opt = mixprec.optim.FusedAdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), max_grad_norm=1.0)
    return opt, mixprec.amp.GradScaler("cuda", init_scale=2.0**12, growth_interval=2)


def _step(model, opt, scaler, x, target):
    loss = torch.nn.functional.cross_entropy(model(x).float(), target)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def test_scaler_and_optimizer_step_capture_and_replay_match_eager():
    xs, target = _inputs()

    eager = _model()
    opt, scaler = _parts(eager)
    for x in xs:
        opt.zero_grad(set_to_none=True)
        _step(eager, opt, scaler, x, target)

    graphed = _model()
    g_opt, g_scaler = _parts(graphed)
    static_x = xs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in xs[:WARMUP]:
            g_opt.zero_grad(set_to_none=True)
            static_x.copy_(x)
            _step(graphed, g_opt, g_scaler, static_x, target)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    g_opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        _step(graphed, g_opt, g_scaler, static_x, target)
    for x in xs[WARMUP:]:
        static_x.copy_(x)
        graph.replay()
    torch.cuda.synchronize()

    for (name, p), q in zip(eager.named_parameters(), graphed.parameters()):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16)), f"{name}: replayed params differ from eager"
    for p, q in zip(eager.parameters(), graphed.parameters()):
        assert torch.equal(opt.state[p]["master_param"], g_opt.state[q]["master_param"])
        assert opt.state[p]["step"].item() == g_opt.state[q]["step"].item() == WARMUP + STEPS - 1  # one skipped
    assert scaler.get_scale() == g_scaler.get_scale()
    assert scaler.skipped_steps() == g_scaler.skipped_steps() == 1
