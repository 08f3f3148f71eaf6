"""Mixed precision training end to end: `python -m mixprec demo` or `python examples/train.py`.

Two small real tasks on data that ships inside installed packages (nothing is downloaded):
- digits: an MLP (BatchNorm and LayerNorm inside) on scikit-learn's bundled 8x8 digits, test accuracy on a
  held-out 30% split;
- text: a tiny character-level transformer on scikit-learn's dataset descriptions (the .rst files under
  sklearn/datasets/descr, about 43 KB of English), next-character accuracy on the last 10% of the text.
Each is trained three ways from the same initial weights and the same batches: fp32 with torch.optim.AdamW,
mixprec fp16 (loss scaling) and mixprec bf16, both through mixprec.prepare. Prints a table and writes a PNG
of the loss curves and the loss scale over steps.

The fp32 loop and the mixed precision loop differ in the three lines marked `# mixprec:` in build() and
train_step().
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import mixprec
from mixprec import checkpoint

MODES = ("fp32", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------ tasks

@dataclass
class Task:
    """A model factory, a batch for every step (a pure function of the step, so a resumed run sees the
    same batches without saving a sampler), an evaluation and the optimizer schedule."""
    name: str
    make_model: Callable[[], nn.Module]
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    evaluate: Callable[[nn.Module], tuple[float, float]]  # (loss, accuracy in %)
    steps: int
    lr: float
    weight_decay: float
    warmup: int

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to zero: the final weights sit at a plateau, not mid-descent."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n, (batch,), generator=g)


@torch.no_grad()
def _classify(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    logits = model(x).float()
    logits = logits.reshape(-1, logits.shape[-1])
    model.train(was_training)
    y = y.reshape(-1)
    return F.cross_entropy(logits, y).item(), 100.0 * (logits.argmax(-1) == y).float().mean().item()


def digits_mlp(hidden: int = 256) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                         nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(),
                         nn.Linear(hidden, 10))


def digits_task(quick: bool = False, seed: int = 0) -> Task:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0 - 0.5
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))  # one fixed split for all runs
    n_test = int(0.3 * len(y))
    test, train = perm[:n_test], perm[n_test:]
    xtr, ytr, xte, yte = x[train], y[train], x[test], y[test]

    def batch(step):
        i = _batch_indices(len(ytr), 64, step, seed)
        return xtr[i], ytr[i]

    return Task("digits", digits_mlp, batch, lambda m: _classify(m, xte, yte),
                steps=300 if quick else 1500, lr=2e-3, weight_decay=0.05, warmup=50)


def text_corpus() -> str:
    """scikit-learn's dataset descriptions, concatenated in file-name order."""
    import sklearn

    files = sorted(glob.glob(os.path.join(os.path.dirname(sklearn.__file__), "datasets", "descr", "*.rst")))
    if not files:
        raise RuntimeError("no sklearn/datasets/descr/*.rst found: the text task needs scikit-learn installed")
    return "\n".join(open(f, encoding="utf-8").read() for f in files)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    # note: small on purpose: at context 64 and width 64, fp16/bf16 steps ran 10x slower than here on this CPU
    # (torch's CPU half-precision GEMM and attention paths), far over the demo's time budget
    def __init__(self, vocab: int, context: int, d: int = 48, heads: int = 4, layers: int = 2):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def text_task(quick: bool = False, seed: int = 0, context: int = 32) -> Task:
    text = text_corpus()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    n_val = len(ids) // 10
    train, val = ids[:-n_val], ids[-n_val:]
    starts = torch.arange(0, len(val) - context - 1, context)  # every non-overlapping window of the val text
    xv = torch.stack([val[s:s + context] for s in starts])
    yv = torch.stack([val[s + 1:s + context + 1] for s in starts])

    def batch(step):
        s = _batch_indices(len(train) - context - 1, 32, step, seed)
        offsets = s[:, None] + torch.arange(context)
        return train[offsets], train[offsets + 1]

    return Task("text", lambda: CharTransformer(len(chars), context), batch, lambda m: _classify(m, xv, yv),
                steps=60 if quick else 800, lr=3e-3, weight_decay=0.01, warmup=30)


TASKS = {"digits": digits_task, "text": text_task}


# -------------------------------------------------------------------------------------------- training

def build(mode: str, model: nn.Module, lr: float, weight_decay: float):
    """(model, optimizer, scaler or None) for `mode`; the mixed precision modes differ by one line."""
    if mode == "fp32":
        return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay), None
    if mode not in _DTYPES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mixprec.prepare(model, dtype=_DTYPES[mode],  # mixprec: line 1 of 3
                           optimizer_kwargs=dict(lr=lr, weight_decay=weight_decay))


def adam_steps_taken(optimizer: torch.optim.Optimizer) -> int:
    """The step count of the optimizer's first stepped param: AdamW's state layout, which mixprec's optimizer
    keeps, and which a step skipped for overflow leaves unchanged."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def train_step(loss: torch.Tensor, optimizer, scaler, poison: Callable[[], None] | None = None) -> bool:
    """backward + step (+ scale update); returns True when the step was skipped for inf/NaN grads.
    `poison`, if given, runs between backward and step (fault injection)."""
    before = adam_steps_taken(optimizer)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()  # mixprec: line 2 of 3
    if poison is not None:
        poison()
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer); scaler.update()  # mixprec: line 3 of 3  # noqa: E702
    return adam_steps_taken(optimizer) == before


@dataclass
class Result:
    task: str
    mode: str
    losses: list[float] = field(default_factory=list)  # training loss per step
    scales: list[float] = field(default_factory=list)  # loss scale per step (1.0 without a scaler)
    skipped: int = 0
    eval_loss: float = float("nan")
    accuracy: float = float("nan")
    wall_s: float = 0.0
    state_bytes_per_param: float = 0.0
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scaler: object = None


def optimizer_state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return state / sum(p.numel() for p in params)


def train(task: Task, mode: str, *, seed: int = 0, poison: Callable[[int, nn.Module], None] | None = None,
          save_at: int | None = None, save_path: str | None = None, resume_from: str | None = None) -> Result:
    """Trains task.make_model() (initialized from `seed`) for task.steps steps in `mode`.

    poison(step, model) runs after each backward, before the step. With save_at and save_path the run writes a
    checkpoint after step `save_at` and stops there; resume_from continues such a checkpoint."""
    torch.manual_seed(seed)
    model, optimizer, scaler = build(mode, task.make_model(), task.lr, task.weight_decay)
    res = Result(task.name, mode)
    start = 0
    if resume_from is not None:
        ck = checkpoint.load(resume_from)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if scaler is not None:
            scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"])
        start, res.losses, res.scales, res.skipped = ck["step"], ck["losses"], ck["scales"], ck["skipped"]
    model.train()
    t0 = time.perf_counter()
    for step in range(start, task.steps):
        for group in optimizer.param_groups:
            group["lr"] = task.lr_at(step)
        x, y = task.batch(step)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        hook = None if poison is None else (lambda: poison(step, model))
        res.skipped += train_step(loss, optimizer, scaler, hook)
        res.losses.append(loss.item())
        res.scales.append(scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0)
        if save_at is not None and step + 1 == save_at:
            checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": None if scaler is None else scaler.state_dict(), "rng": torch.get_rng_state(),
                             "step": step + 1, "losses": res.losses, "scales": res.scales, "skipped": res.skipped},
                            save_path)
            break
    res.wall_s = time.perf_counter() - t0
    res.eval_loss, res.accuracy = task.evaluate(model)
    res.state_bytes_per_param = optimizer_state_bytes_per_param(optimizer)
    res.model, res.optimizer, res.scaler = model, optimizer, scaler
    return res


# ---------------------------------------------------------------------------------------------- report

def format_table(results: list[Result]) -> str:
    head = f"{'task':<7} {'mode':<5} {'eval loss':>9} {'acc %':>6} {'d acc':>6} {'skipped':>7} {'wall s':>7} " \
           f"{'state B/param':>13}"
    fp32 = {r.task: r.accuracy for r in results if r.mode == "fp32"}
    lines = [head, "-" * len(head)]
    for r in results:
        delta = r.accuracy - fp32[r.task] if r.task in fp32 else float("nan")
        lines.append(f"{r.task:<7} {r.mode:<5} {r.eval_loss:>9.4f} {r.accuracy:>6.2f} {delta:>+6.2f} "
                     f"{r.skipped:>7d} {r.wall_s:>7.1f} {r.state_bytes_per_param:>13.1f}")
    return "\n".join(lines)


def plot(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in results))
    fig, axes = plt.subplots(2, len(tasks), figsize=(6 * len(tasks), 7), squeeze=False)
    for col, task in enumerate(tasks):
        for r in (r for r in results if r.task == task):
            window = max(1, len(r.losses) // 50)  # moving average: per-batch losses are noisy
            smooth = torch.tensor(r.losses).unfold(0, window, 1).mean(1) if len(r.losses) >= window else []
            axes[0, col].plot(range(window - 1, len(r.losses)), smooth, label=r.mode)
            if r.mode != "fp32":
                axes[1, col].plot(r.scales, label=r.mode)
        axes[0, col].set(title=f"{task}: training loss", xlabel="step", yscale="log")
        axes[1, col].set(title=f"{task}: loss scale", xlabel="step", yscale="log")
        axes[0, col].legend()
        axes[1, col].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixprec demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps per run (CI): checks the path runs, "
                                                             "not the accuracy claim")
    parser.add_argument("--tasks", default="digits,text", help="comma-separated subset of " + ",".join(TASKS))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="mixprec-demo.png", help="PNG to write ('' for none)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: these models are too small to gain from more, and on a "
                             "busy machine 2 threads ran the digits MLP 4x slower than 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    for name, chosen, allowed in (("--tasks", tasks, TASKS), ("--modes", modes, MODES)):
        if not chosen or any(c not in allowed for c in chosen):
            parser.error(f"{name} must be a comma-separated subset of {','.join(allowed)}, got {chosen}")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seed {args.seed}"
          f"{', quick' if args.quick else ''}")
    results = []
    for name in tasks:
        task = TASKS[name](quick=args.quick, seed=args.seed)
        for mode in modes:
            results.append(train(task, mode, seed=args.seed))
            r = results[-1]
            print(f"  {name}/{mode}: acc {r.accuracy:.2f}%  loss {r.eval_loss:.4f}  {r.wall_s:.1f} s", flush=True)
    print(format_table(results))
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
