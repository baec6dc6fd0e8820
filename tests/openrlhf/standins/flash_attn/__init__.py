"""Stand-in for flash-attn (CUDA-only). Imported by openrlhf.models.ring_attn_utils."""

__version__ = "0.0.0+standin"
