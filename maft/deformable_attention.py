"""Multi-scale deformable attention (Deformable DETR), as used by MAFT's pixel decoder (DESIGN.md §7): the layer, the
PyTorch reference, and the choice between it and maft's compiled kernels (`maft.kernels`).

This module is one of the files a saved model carries as remote code, so it imports maft only in the `try` below: where
maft is not installed (a model loaded with transformers alone), "auto" warns once and uses the reference, and asking
for a compiled backend raises `KernelBuildError`."""

import math
import operator
import os
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


try:
    from maft.kernels import KernelBuildError, load_extension, multi_scale_deformable_attention_compiled

    KERNELS_MISSING = None
except ModuleNotFoundError as error:
    if error.name not in ("maft", "maft.kernels"):
        raise
    KERNELS_MISSING = (
        "maft's compiled kernels are not installed (this model's code runs without the maft package; "
        "`pip install maft` brings them)"
    )

    class KernelBuildError(RuntimeError):
        """A compiled multi-scale deformable attention kernel could not be built or loaded; the message says why."""


BACKENDS = ("auto", "cuda", "cpu", "pytorch")
BACKEND_ENVIRONMENT_VARIABLE = "MAFT_DEFORMABLE_ATTENTION_BACKEND"
COMPILED_DEVICES = ("cpu", "cuda")
# Both kernels read half and bfloat16 as float32 and accumulate in float32 (float64 for float64).
COMPILED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

SpatialShapes = torch.Tensor | Sequence[tuple[int, int]]

_warned_fallback: set[str] = set()


def multi_scale_deformable_attention_pytorch(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """
    The reference formulation with `grid_sample` (bilinear, zero padding, `align_corners=False`).

    value (N, S, M, D) with S the sum over levels of H_l * W_l; spatial_shapes (L, 2) as (H, W), a tensor or a list of
    (H, W) int pairs; sampling_locations (N, Lq, M, L, P, 2) as normalised (x, y) in [0, 1]; attention_weights
    (N, Lq, M, L, P). Returns (N, Lq, M * D). A sample whose location is NaN or infinite contributes nothing (nor does
    its attention weight) and gets zero gradients, as in the compiled kernels and the original CUDA op.
    """
    batch_size, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = [(int(height), int(width)) for height, width in spatial_shapes]
    value_per_level = value.split([height * width for height, width in shapes], dim=1)
    finite = torch.isfinite(sampling_locations).all(-1)
    # -1 lies outside every level, so grid_sample's zero padding makes those samples contribute exactly zero.
    sampling_grids = 2 * sampling_locations.masked_fill(~finite[..., None], -1.0) - 1
    attention_weights = attention_weights.masked_fill(~finite, 0.0)
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


def resolve_backend(backend: str) -> str:
    """The backend asked for: `MAFT_DEFORMABLE_ATTENTION_BACKEND` overrides the argument; both must be in BACKENDS."""
    from_environment = os.environ.get(BACKEND_ENVIRONMENT_VARIABLE)
    chosen = from_environment or backend
    if chosen not in BACKENDS:
        source = BACKEND_ENVIRONMENT_VARIABLE if from_environment else "`backend`"
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {chosen!r}.")
    return chosen


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: torch.Tensor | Sequence[int] | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    im2col_step: int = 64,
    backend: str = "auto",
) -> torch.Tensor:
    """
    Multi-scale deformable attention (shapes as `multi_scale_deformable_attention_pytorch`), differentiable in value,
    sampling locations and attention weights.

    `spatial_shapes` is an int tensor (L, 2) or, as transformers' deformable models pass it, a list of (H, W) int
    pairs; `level_start_index` the offsets of the levels in `value`, checked against the shapes, or None to derive
    them. With a list and None the call never waits for the GPU (no host sync), which suits `torch.compile`.

    `backend`: "cuda" / "cpu" demand the compiled kernel for that device (`KernelBuildError` if it cannot be built),
    "pytorch" the reference, "auto" the compiled kernel of the tensors' device where it builds and supports the dtype,
    else the reference after one warning saying why. `MAFT_DEFORMABLE_ATTENTION_BACKEND` overrides `backend`. All
    backends skip samples at NaN or infinite locations. (`im2col_step` is accepted for compatibility with the
    original signature; the kernels need no batching.)
    """
    backend = resolve_backend(backend)
    shapes = _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if backend == "pytorch":
        return multi_scale_deformable_attention_pytorch(value, shapes, sampling_locations, attention_weights)
    device_type = value.device.type
    if backend == "auto":
        reason = _why_not_compiled(device_type, value.dtype)
        if reason is not None:
            if reason not in _warned_fallback:
                _warned_fallback.add(reason)
                warnings.warn(
                    f"maft: multi-scale deformable attention falls back to the PyTorch reference (slower): {reason}. "
                    f"Set backend='pytorch' or {BACKEND_ENVIRONMENT_VARIABLE}=pytorch to choose it and silence this.",
                    stacklevel=2,
                )
            return multi_scale_deformable_attention_pytorch(value, shapes, sampling_locations, attention_weights)
        backend = device_type
    if backend != device_type:
        raise ValueError(f"backend {backend!r} was asked for tensors on {value.device}; use the backend of their device.")
    if value.dtype not in COMPILED_DTYPES:
        supported = ", ".join(str(dtype).removeprefix("torch.") for dtype in COMPILED_DTYPES)
        raise ValueError(f"the {backend} kernel supports {supported}; got {value.dtype}.")
    if KERNELS_MISSING is not None:
        raise KernelBuildError(f"the {backend} kernel cannot be used: {KERNELS_MISSING}; or use backend='pytorch'")
    tensors = [tensor.contiguous() for tensor in (value, sampling_locations, attention_weights)]
    if isinstance(spatial_shapes, torch.Tensor):
        shapes_tensor = spatial_shapes.to(device=value.device, dtype=torch.long).contiguous()
    else:
        shapes_tensor = torch.tensor(shapes, dtype=torch.long, device=value.device)
    starts = torch.tensor(_level_starts(shapes), dtype=torch.long, device=value.device)
    return multi_scale_deformable_attention_compiled(tensors[0], shapes_tensor, starts, tensors[1], tensors[2])


@torch.compiler.assume_constant_result
def _why_not_compiled(device_type: str, dtype: torch.dtype) -> str | None:
    """Why "auto" cannot use a compiled kernel here, or None when it can (constant in a process, so torch.compile
    calls it once while tracing instead of tracing the build)."""
    if device_type not in COMPILED_DEVICES:
        return f"there is no compiled kernel for {device_type} tensors"
    if dtype not in COMPILED_DTYPES:
        return f"the {device_type} kernel does not support {dtype}"
    if KERNELS_MISSING is not None:
        return KERNELS_MISSING
    try:
        load_extension(device_type)
    except KernelBuildError as error:
        return f"{error} (install ninja and a C++ compiler{' and the CUDA toolkit, with CUDA_HOME set' if device_type == 'cuda' else ''})"
    return None


def _level_starts(shapes: list[tuple[int, int]]) -> list[int]:
    starts = [0]
    for height, width in shapes[:-1]:
        starts.append(starts[-1] + height * width)
    return starts


def _spatial_shapes_as_list(spatial_shapes: SpatialShapes, num_levels: int) -> list[tuple[int, int]]:
    """`spatial_shapes` as (H, W) int pairs, one per level, each at least 1 x 1; ValueError saying what is wrong."""
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.is_floating_point() or spatial_shapes.is_complex() or spatial_shapes.dtype == torch.bool:
            raise ValueError(f"`spatial_shapes` must hold integers, got {spatial_shapes.dtype}.")
        if spatial_shapes.shape != (num_levels, 2):
            raise ValueError(f"`spatial_shapes` must be (levels, 2) = ({num_levels}, 2), got {tuple(spatial_shapes.shape)}.")
        spatial_shapes = spatial_shapes.tolist()
    try:
        shapes = [(operator.index(height), operator.index(width)) for height, width in spatial_shapes]
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"`spatial_shapes` must be an int tensor (levels, 2) or a list of (height, width) int pairs, got {spatial_shapes!r}."
        ) from error
    if len(shapes) != num_levels:
        raise ValueError(f"`spatial_shapes` must be (levels, 2) = ({num_levels}, 2), got {len(shapes)} levels.")
    for level, (height, width) in enumerate(shapes):
        if height < 1 or width < 1:
            raise ValueError(f"`spatial_shapes` must be positive (height, width) pairs; level {level} is {(height, width)}.")
    return shapes


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> list[tuple[int, int]]:
    """Validates the inputs (only tensor metadata and Python ints, unless given tensors of shapes or starts must be
    read); returns the spatial shapes as (H, W) int pairs."""
    if value.dim() != 4:
        raise ValueError(f"`value` must be (batch, sum of H*W, heads, channels), got shape {tuple(value.shape)}.")
    if not value.is_floating_point():
        raise ValueError(f"`value` must be a floating-point tensor, got {value.dtype}.")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "`sampling_locations` must be (batch, queries, heads, levels, points, 2), "
            f"got shape {tuple(sampling_locations.shape)}."
        )
    if sampling_locations.shape[0] != value.shape[0] or sampling_locations.shape[2] != value.shape[2]:
        raise ValueError(
            f"`sampling_locations` {tuple(sampling_locations.shape)} and `value` {tuple(value.shape)} disagree on batch "
            "size or number of heads."
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"`attention_weights` must be {tuple(sampling_locations.shape[:-1])} to match `sampling_locations`, "
            f"got {tuple(attention_weights.shape)}."
        )
    shapes = _spatial_shapes_as_list(spatial_shapes, sampling_locations.shape[3])
    positions = sum(height * width for height, width in shapes)
    if positions != value.shape[1]:
        raise ValueError(f"`value` has {value.shape[1]} positions but `spatial_shapes` sum to {positions} ({shapes}).")
    if level_start_index is not None:
        given = level_start_index.tolist() if isinstance(level_start_index, torch.Tensor) else list(level_start_index)
        if given != _level_starts(shapes):
            raise ValueError(
                f"`level_start_index` must be {_level_starts(shapes)} for these `spatial_shapes`, got {given}."
            )
    devices = {tensor.device for tensor in (value, sampling_locations, attention_weights)}
    if len(devices) > 1:
        raise ValueError(f"`value`, `sampling_locations` and `attention_weights` must be on one device, got {devices}.")
    dtypes = {tensor.dtype for tensor in (value, sampling_locations, attention_weights)}
    if len(dtypes) > 1:
        raise ValueError(f"`value`, `sampling_locations` and `attention_weights` must share one dtype, got {dtypes}.")
    return shapes


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
        Returns (N, Lq, C). In half precision the projections run in it, and the sampling (locations, attention
        weights, values) in float32, as Mask2Former runs its kernel under mixed precision: bfloat16 locations would
        be off by a third of a pixel on an 80-pixel map.
        """
        batch_size, num_queries, _ = query.shape
        head_dim = self.embed_dim // self.num_heads
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        sampling_dtype = torch.promote_types(value.dtype, torch.float32)
        value = value.view(batch_size, -1, self.num_heads, head_dim).to(sampling_dtype)
        reference_points = reference_points.to(sampling_dtype)
        offsets = self.sampling_offsets(query).to(sampling_dtype)
        offsets = offsets.view(batch_size, num_queries, self.num_heads, self.num_levels, self.num_points, 2)
        weights = self.attention_weights(query).to(sampling_dtype)
        weights = weights.view(batch_size, num_queries, self.num_heads, self.num_levels * self.num_points).softmax(-1)
        weights = weights.view(batch_size, num_queries, self.num_heads, self.num_levels, self.num_points)
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
        return self.output_proj(output.to(query.dtype))
