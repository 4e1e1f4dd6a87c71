"""Multi-scale deformable attention (filled in by the kernels issue)."""
