"""A repair of triton's interpreter (TRITON_INTERPRET=1), made only where the interpreter needs it.

note: triton 3.6's interpreter turns a scalar into a Python int (``tensor.__index__``, which a ``range`` over a
run-time bound calls: the K loop of kernels/gemm.py) with ``int()`` of a one-element 1-d numpy array, which NumPy
2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); triton 3.8 squeezes the array first.
`repair()` tries the interpreter's own ``__index__`` on a one-element scalar and, only if that raises, wraps the
function that installs it at every launch (``_patch_lang_tensor``) so that it installs the squeezing one, as triton
3.8 does. Feature-detected, not keyed on versions: nothing changes where the interpreter works, and nothing is
touched when interpreting is off (compiled kernels never reach this code) or when triton's internals are not the
ones probed here.
"""
from __future__ import annotations

import operator

_done = False


def _index_fails(interp, tl, np) -> bool:
    """True when the interpreter's __index__ raises on a one-element int32 scalar (the probe restores what it
    patched)."""
    scope = interp._LangPatchScope()
    try:
        interp._patch_lang_tensor(tl.tensor, scope)
        scalar = tl.tensor(interp.TensorHandle(np.array([3], dtype=np.int32), tl.int32), tl.int32)
        try:
            return operator.index(scalar) != 3
        except TypeError:
            return True
    finally:
        scope.restore()


def repair() -> bool:
    """Installs the squeezing __index__ if the interpreter's own fails; True if it did (once per process)."""
    global _done
    if _done:
        return False
    _done = True
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as interp

        if not _index_fails(interp, tl, np):
            return False
        original = interp._patch_lang_tensor
    except (ImportError, AttributeError, TypeError):  # another interpreter than the one probed: leave it alone
        return False

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interp._patch_lang_tensor = _patch_lang_tensor
    return True
