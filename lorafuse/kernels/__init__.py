"""Fused kernels, one family per module, each with its PyTorch reference beside it."""
