"""Crash-safe checkpoints: atomic writes and a content digest checked on load.

save(state, path) writes torch.save({"format": FORMAT, "sha256": ..., "state": state}) to a temporary file in
the same directory, fsyncs it, renames it over `path` (os.replace is atomic on POSIX) and fsyncs the directory
so the rename itself survives a power loss. A crash at any point leaves either the previous checkpoint or the
new one at `path`, never a mix; at worst a stray `.<name>.tmp-<pid>` file next to it.

load(path) reads with torch.load(weights_only=True) (no arbitrary code runs) and recomputes the digest:
torch.load notices a truncated file but not flipped bytes inside tensor data, so the digest covers every
tensor's dtype, shape and bytes and every other value in the state. Any mismatch, truncation or unreadable
file raises CheckpointError naming the path.

`state` is any nest of dicts, lists and tuples over tensors, numbers, strings, bools and None: what
model.state_dict(), optimizer.state_dict() (with master weights) and scaler.state_dict() return.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import zipfile

import torch

FORMAT = "mixprec.checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint file that is truncated, corrupt or not written by mixprec.checkpoint.save."""


def _digest(state) -> str:
    h = hashlib.sha256()

    def visit(obj, where: str):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
            # reinterpret as bytes: numpy has no bf16, and the bits are what must survive
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            h.update(f"D{len(obj)}|".encode())
            for k, v in obj.items():
                h.update(f"K{k!r}|".encode())
                visit(v, f"{where}[{k!r}]")
        elif isinstance(obj, (list, tuple)):
            h.update(f"L{type(obj).__name__}{len(obj)}|".encode())
            for i, v in enumerate(obj):
                visit(v, f"{where}[{i}]")
        elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
            h.update(f"V{type(obj).__name__}{obj!r}|".encode())
        else:
            raise TypeError(f"state{where}: cannot checkpoint a {type(obj).__name__} (tensors, numbers, "
                            f"strings, None and dicts/lists/tuples of them only)")

    visit(state, "")
    return h.hexdigest()


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(state, path: str | os.PathLike) -> None:
    """Writes `state` to `path` atomically (see the module docstring)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    record = {"format": FORMAT, "sha256": _digest(state), "state": state}
    try:
        with open(tmp, "wb") as f:
            torch.save(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # an exception (not a crash): leave no temporary behind; `path` still holds the previous checkpoint
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def load(path: str | os.PathLike, map_location=None):
    """The state saved at `path`, verified; CheckpointError if the file is truncated, corrupt or foreign."""
    path = os.fspath(path)
    try:
        record = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path!r} is truncated or corrupt: torch.load failed with "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not (isinstance(record, dict) and record.get("format") == FORMAT and "sha256" in record):
        raise CheckpointError(f"checkpoint {path!r} was not written by mixprec.checkpoint.save "
                              f"(no {FORMAT!r} record); load it with torch.load")
    if _digest(record["state"]) != record["sha256"]:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: its content does not match the sha256 recorded "
                              f"when it was saved")
    return record["state"]
