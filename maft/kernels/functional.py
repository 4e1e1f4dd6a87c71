"""Multi-scale deformable attention: the PyTorch reference, the compiled kernels as torch custom operators, and the
choice between them (DESIGN.md §7)."""

import operator
import os
import warnings
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from .extension import KernelBuildError, load_extension


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


# The compiled kernels as torch custom operators, so that torch.compile captures them in its graph (their fake
# implementations give the output shapes) and autograd differentiates them. Named after this module, so that a second
# copy of it (a model's remote code) registers its own operators instead of clashing.
_OPERATOR = f"maft::{__name__.replace('.', '_')}"


@torch.library.custom_op(f"{_OPERATOR}_forward", mutates_args=())
def _compiled_forward(
    value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    extension = load_extension(value.device.type)
    return extension.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@_compiled_forward.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    batch_size, _, num_heads, head_dim = value.shape
    return value.new_empty(batch_size, sampling_locations.shape[1], num_heads * head_dim)


@torch.library.custom_op(f"{_OPERATOR}_backward", mutates_args=())
def _compiled_backward(
    value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor, grad_output: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    extension = load_extension(value.device.type)
    grad_value, grad_locations, grad_weights = extension.backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output.contiguous()
    )
    return grad_value, grad_locations, grad_weights


@_compiled_backward.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _differentiate(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = _compiled_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
    )
    return grad_value, None, None, grad_locations, grad_weights


_compiled_forward.register_autograd(_differentiate, setup_context=_save_inputs)


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
    tensors = [tensor.contiguous() for tensor in (value, sampling_locations, attention_weights)]
    if isinstance(spatial_shapes, torch.Tensor):
        shapes_tensor = spatial_shapes.to(device=value.device, dtype=torch.long).contiguous()
    else:
        shapes_tensor = torch.tensor(shapes, dtype=torch.long, device=value.device)
    starts = torch.tensor(_level_starts(shapes), dtype=torch.long, device=value.device)
    return _compiled_forward(tensors[0], shapes_tensor, starts, tensors[1], tensors[2])


@torch.compiler.assume_constant_result
def _why_not_compiled(device_type: str, dtype: torch.dtype) -> str | None:
    """Why "auto" cannot use a compiled kernel here, or None when it can (constant in a process, so torch.compile
    calls it once while tracing instead of tracing the build)."""
    if device_type not in COMPILED_DEVICES:
        return f"there is no compiled kernel for {device_type} tensors"
    if dtype not in COMPILED_DTYPES:
        return f"the {device_type} kernel does not support {dtype}"
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
