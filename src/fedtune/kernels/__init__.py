"""Implementations of the shared-randomness contract (``fedtune.randomness``, version 3).

Three implementations of one definition, which must agree bit for bit:

* ``reference``: numpy, written to be read against the specification (``spec``); slow;
* ``cpu``: numba kernels, compiled on first use and cached, parallel over the torch threads;
* ``gpu``: Triton kernels for CUDA tensors (and, with ``TRITON_INTERPRET=1``, on CPU tensors
  through Triton's interpreter, which is how the CPU-only test suite checks their code).
"""
