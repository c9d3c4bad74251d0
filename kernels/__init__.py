"""Triton kernels (CUDA) with their launchers, and the plain-torch references they are tested against.

The C++ CPU kernels sit in ``kernels/cpu`` and are built into ``saliency_r1/_C*.so`` by setup.py.
Installed as ``saliency_r1.kernels``.
"""
