"""The Triton kernels, installed as mixprec.kernels."""
import os

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # as mixprec._backend.triton_interpreter_enabled
    from ._interpreter import repair

    repair()  # triton 3.6's interpreter with NumPy >= 2.4: see _interpreter.py
