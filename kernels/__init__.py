"""Fused Triton kernels of the project, each beside its plain PyTorch reference."""
from .local_attention import local_attention, local_attention_ref, local_attention_triton

__all__ = ["local_attention", "local_attention_ref", "local_attention_triton"]
