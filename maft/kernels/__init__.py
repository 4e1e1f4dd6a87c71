"""The compiled multi-scale deformable attention kernels (Deformable DETR) used by MAFT's pixel decoder (DESIGN.md §7):
a CPU and a CUDA kernel compiled just in time with ninja, as torch custom operators. The layer and the PyTorch
reference that chooses between them live in `maft.deformable_attention`, which a model's remote code carries; this
package (with the C++/CUDA sources) comes only with an installed maft."""

from .extension import KernelBuildError, load_extension
from .ops import multi_scale_deformable_attention_compiled


__all__ = ["KernelBuildError", "load_extension", "multi_scale_deformable_attention_compiled"]
