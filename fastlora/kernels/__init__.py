"""Triton kernels and their launchers, one module per op.

They live apart from ``fastlora.ops`` so that importing an op never imports Triton:
a kernel module is imported only when dispatch has chosen the Triton backend.
"""
