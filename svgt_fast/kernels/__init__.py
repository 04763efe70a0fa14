"""Triton kernels (one op per file) and their plain PyTorch references (reference.py)."""
