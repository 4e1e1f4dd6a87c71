"""The multi-scale deformable attention layer (Deformable DETR), with the original parameter names."""

import math
from collections.abc import Sequence

import torch
from torch import nn

from .functional import BACKENDS, SpatialShapes, multi_scale_deformable_attention


class MultiScaleDeformableAttention(nn.Module):
    """
    Multi-scale deformable attention (Deformable DETR) with the original parameter names (`sampling_offsets`,
    `attention_weights`, `value_proj`, `output_proj`), so that original checkpoints convert by name.
    """

    def __init__(
        self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
        im2col_step: int = 64, backend: str = "auto",
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"`embed_dim` ({embed_dim}) must be divisible by `num_heads` ({num_heads}).")
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {', '.join(BACKENDS)}; got {backend!r}.")
        self.embed_dim, self.num_heads, self.num_levels, self.num_points = embed_dim, num_heads, num_levels, num_points
        self.im2col_step, self.backend = im2col_step, backend
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start as each head looking in its own direction, at distance point index + 1 (DESIGN.md §7)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        offsets = directions[:, None, None, :].repeat(1, self.num_levels, self.num_points, 1)
        offsets *= torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(offsets.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.zeros_(projection.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: SpatialShapes,
        level_start_index: torch.Tensor | Sequence[int] | None = None,
        value_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        query (N, Lq, C); reference_points (N, Lq, L, 2) normalised (x, y), or (N, Lq, L, 4) boxes (x, y, w, h);
        value (N, S, C); spatial_shapes (L, 2) (H, W) as an int64 tensor or a list of int pairs (no host sync);
        level_start_index (L,), or None to derive it from the shapes; value_padding_mask (N, S) with True at padding.
        Returns (N, Lq, C).
        """
        batch_size, num_queries, _ = query.shape
        head_dim = self.embed_dim // self.num_heads
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(batch_size, -1, self.num_heads, head_dim)
        offsets = self.sampling_offsets(query).view(batch_size, num_queries, self.num_heads, self.num_levels, self.num_points, 2)
        weights = self.attention_weights(query).view(batch_size, num_queries, self.num_heads, self.num_levels * self.num_points)
        weights = weights.softmax(-1).view(batch_size, num_queries, self.num_heads, self.num_levels, self.num_points)
        if reference_points.shape[-1] == 2:
            if isinstance(spatial_shapes, torch.Tensor):
                normaliser = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], dim=-1).to(offsets)
            else:
                normaliser = torch.tensor([(width, height) for height, width in spatial_shapes]).to(offsets)
            locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.num_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(f"`reference_points` must end in 2 (points) or 4 (boxes), got {tuple(reference_points.shape)}.")
        output = multi_scale_deformable_attention(
            value, spatial_shapes, level_start_index, locations, weights, self.im2col_step, self.backend
        )
        return self.output_proj(output)
