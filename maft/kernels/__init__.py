"""Multi-scale deformable attention (Deformable DETR), as used by MAFT's pixel decoder (DESIGN.md §7): a PyTorch reference,
a CPU kernel and a CUDA kernel compiled just in time with ninja, and the layer that uses them."""

from .extension import KernelBuildError, load_extension
from .functional import multi_scale_deformable_attention, multi_scale_deformable_attention_pytorch
from .modules import MultiScaleDeformableAttention


__all__ = [
    "KernelBuildError",
    "MultiScaleDeformableAttention",
    "load_extension",
    "multi_scale_deformable_attention",
    "multi_scale_deformable_attention_pytorch",
]
