"""Multi-scale deformable attention: the PyTorch reference, the compiled kernels' autograd function, and the choice
between them (DESIGN.md §7)."""

import os
import warnings

import torch
from torch.nn import functional as F

from .extension import KernelBuildError, load_extension


BACKENDS = ("auto", "cuda", "cpu", "pytorch")
BACKEND_ENVIRONMENT_VARIABLE = "MAFT_DEFORMABLE_ATTENTION_BACKEND"
COMPILED_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float16, torch.bfloat16)}

_warned_fallback: set[str] = set()


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


class _CompiledMultiScaleDeformableAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, extension, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        ctx.extension = extension
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return extension.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    @staticmethod
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = ctx.extension.backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output.contiguous()
        )
        return None, grad_value, None, None, grad_locations, grad_weights


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
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    im2col_step: int = 64,
    backend: str = "auto",
) -> torch.Tensor:
    """
    Multi-scale deformable attention (shapes as `multi_scale_deformable_attention_pytorch`), differentiable in value,
    sampling locations and attention weights. `backend`: "cuda" / "cpu" demand the compiled kernel for that device
    (`KernelBuildError` if it cannot be built), "pytorch" the reference, "auto" the compiled kernel of the tensors'
    device where it builds and supports the dtype, else the reference after one warning saying why.
    `MAFT_DEFORMABLE_ATTENTION_BACKEND` overrides `backend`. (`im2col_step` is accepted for compatibility with the
    original signature; the kernels need no batching.)
    """
    backend = resolve_backend(backend)
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if backend == "pytorch":
        return multi_scale_deformable_attention_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
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
            return multi_scale_deformable_attention_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
        backend = device_type
    if backend != device_type:
        raise ValueError(f"backend {backend!r} was asked for tensors on {value.device}; use the backend of their device.")
    if value.dtype not in COMPILED_DTYPES[backend]:
        supported = ", ".join(str(dtype).removeprefix("torch.") for dtype in COMPILED_DTYPES[backend])
        raise ValueError(f"the {backend} kernel supports {supported}; got {value.dtype}.")
    extension = load_extension(backend)
    tensors = [tensor.contiguous() for tensor in (value, sampling_locations, attention_weights)]
    shapes = spatial_shapes.to(device=value.device, dtype=torch.long).contiguous()
    starts = level_start_index.to(device=value.device, dtype=torch.long).contiguous()
    return _CompiledMultiScaleDeformableAttention.apply(extension, tensors[0], shapes, starts, tensors[1], tensors[2])


def _why_not_compiled(device_type: str, dtype: torch.dtype) -> str | None:
    """Why "auto" cannot use a compiled kernel here, or None when it can."""
    if device_type not in COMPILED_DTYPES:
        return f"there is no compiled kernel for {device_type} tensors"
    if dtype not in COMPILED_DTYPES[device_type]:
        return f"the {device_type} kernel does not support {dtype}"
    try:
        load_extension(device_type)
    except KernelBuildError as error:
        return f"{error} (install ninja and a C++ compiler{' and the CUDA toolkit, with CUDA_HOME set' if device_type == 'cuda' else ''})"
    return None


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    if value.dim() != 4:
        raise ValueError(f"`value` must be (batch, sum of H*W, heads, channels), got shape {tuple(value.shape)}.")
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
    dtypes = {tensor.dtype for tensor in (value, sampling_locations, attention_weights)}
    if len(dtypes) > 1:
        raise ValueError(f"`value`, `sampling_locations` and `attention_weights` must share one dtype, got {dtypes}.")
