"""The restricted-attention op of the project: its specification, a PyTorch path for CPUs and fused Triton kernels."""
from .local_attention import local_attention, local_attention_dense, local_attention_triton
from .local_attention_cpu import local_attention_cpu

__all__ = ["local_attention", "local_attention_cpu", "local_attention_dense", "local_attention_triton"]
