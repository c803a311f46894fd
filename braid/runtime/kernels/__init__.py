"""Triton kernels, each with a torch reference beside it.

Every kernel's wrapper asserts shapes, dtypes, devices and strides before it launches; the
reference is the semantics (and the fallback where Triton cannot run). Triton is imported
guarded, so these modules import on machines without it.
"""
