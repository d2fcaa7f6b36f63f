"""Triton kernels of fastpatch (installed as ``fastpatch.kernels``) and their launch-config tables.

Only ``@triton.jit`` functions and plain config tables live here; host launchers are in
:mod:`fastpatch.launchers`.
"""
