"""The Triton kernels, installed as mixprec.kernels."""
from mixprec._backend import triton_interpreter_enabled

if triton_interpreter_enabled():
    from ._interpreter import repair

    repair()  # triton 3.6's interpreter with NumPy >= 2.4: see _interpreter.py
