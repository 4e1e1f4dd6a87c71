"""Multi-scale deformable attention (Deformable DETR), as used by MAFT's pixel decoder (DESIGN.md §7)."""

import math
import os

import torch
from torch import nn
from torch.nn import functional as F


BACKENDS = ("auto", "cuda", "cpu", "pytorch")
BACKEND_ENVIRONMENT_VARIABLE = "MAFT_DEFORMABLE_ATTENTION_BACKEND"


class KernelBuildError(RuntimeError):
    """A compiled multi-scale deformable attention kernel could not be built or loaded."""


def load_extension(device_type: str):
    """The compiled kernel for `device_type` ("cpu" or "cuda"). Not available in this version: raises KernelBuildError."""
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"`device_type` must be 'cpu' or 'cuda', got {device_type!r}.")
    raise KernelBuildError(
        f"maft has no compiled {device_type} kernel for multi-scale deformable attention yet; use backend='pytorch' "
        "(or 'auto', which does)."
    )


def resolve_backend(backend: str) -> str:
    """The backend to use: the environment variable overrides the argument; both must be one of BACKENDS."""
    chosen = os.environ.get(BACKEND_ENVIRONMENT_VARIABLE) or backend
    if chosen not in BACKENDS:
        source = BACKEND_ENVIRONMENT_VARIABLE if os.environ.get(BACKEND_ENVIRONMENT_VARIABLE) else "backend"
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {chosen!r}.")
    return chosen


def multi_scale_deformable_attention_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """
    The reference formulation with `grid_sample` (bilinear, zero padding, `align_corners=False`).

    value (N, S, M, D) with S the sum over levels of H_l * W_l; spatial_shapes (L, 2) as (H, W); sampling_locations
    (N, Lq, M, L, P, 2) as normalised (x, y) in [0, 1]; attention_weights (N, Lq, M, L, P). Returns (N, Lq, M * D).
    """
    batch_size, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = [(int(height), int(width)) for height, width in spatial_shapes]
    value_per_level = value.split([height * width for height, width in shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampled_per_level = []
    for level, (height, width) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        level_value = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch_size * num_heads, head_dim, height, width)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        level_grid = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled_per_level.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(batch_size * num_heads, 1, num_queries, num_levels * num_points)
    output = (torch.stack(sampled_per_level, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(batch_size, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    im2col_step: int = 64,
    backend: str = "auto",
) -> torch.Tensor:
    """
    Multi-scale deformable attention (shapes as `multi_scale_deformable_attention_pytorch`). `backend` "cuda"/"cpu"
    demand the compiled kernel for that device, "pytorch" the reference; "auto" uses the compiled kernel where one
    builds, else the reference. `MAFT_DEFORMABLE_ATTENTION_BACKEND` overrides `backend`.
    """
    backend = resolve_backend(backend)
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if backend in ("cuda", "cpu"):
        load_extension(backend)
    return multi_scale_deformable_attention_pytorch(value, spatial_shapes, sampling_locations, attention_weights)


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    if value.dim() != 4:
        raise ValueError(f"`value` must be (batch, sum of H*W, heads, channels), got shape {tuple(value.shape)}.")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "`sampling_locations` must be (batch, queries, heads, levels, points, 2), "
            f"got shape {tuple(sampling_locations.shape)}."
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"`attention_weights` must be {tuple(sampling_locations.shape[:-1])} to match `sampling_locations`, "
            f"got {tuple(attention_weights.shape)}."
        )
    if spatial_shapes.shape != (sampling_locations.shape[3], 2):
        raise ValueError(
            f"`spatial_shapes` must be (levels, 2) = ({sampling_locations.shape[3]}, 2), got {tuple(spatial_shapes.shape)}."
        )
    sizes = spatial_shapes.prod(dim=1)
    if int(sizes.sum()) != value.shape[1]:
        raise ValueError(f"`value` has {value.shape[1]} positions but `spatial_shapes` sum to {int(sizes.sum())}.")
    expected_start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    if level_start_index.shape != expected_start.shape or not torch.equal(level_start_index.to(expected_start), expected_start):
        raise ValueError(
            f"`level_start_index` must be {expected_start.tolist()} for these `spatial_shapes`, got {level_start_index.tolist()}."
        )
    devices = {tensor.device for tensor in (value, sampling_locations, attention_weights)}
    if len(devices) > 1:
        raise ValueError(f"`value`, `sampling_locations` and `attention_weights` must be on one device, got {devices}.")


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
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        value_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        query (N, Lq, C); reference_points (N, Lq, L, 2) normalised (x, y), or (N, Lq, L, 4) boxes (x, y, w, h);
        value (N, S, C); spatial_shapes (L, 2) int64 (H, W); level_start_index (L,); value_padding_mask (N, S) with
        True at padding. Returns (N, Lq, C).
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
            normaliser = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], dim=-1).to(offsets)
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


__all__ = [
    "KernelBuildError",
    "MultiScaleDeformableAttention",
    "load_extension",
    "multi_scale_deformable_attention",
    "multi_scale_deformable_attention_pytorch",
]
