"""The compiled multi-scale deformable attention kernels as torch custom operators, so that torch.compile captures them
in its graph (their fake implementations give the output shapes) and autograd differentiates them."""

import torch

from .extension import load_extension


@torch.library.custom_op("maft::multi_scale_deformable_attention_forward", mutates_args=())
def multi_scale_deformable_attention_compiled(
    value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The compiled kernel of the tensors' device on contiguous inputs: value (N, S, M, D), spatial_shapes (L, 2) and
    level_start_index (L,) int64 on that device, sampling_locations (N, Lq, M, L, P, 2), attention_weights
    (N, Lq, M, L, P) -> (N, Lq, M * D). `maft.deformable_attention.multi_scale_deformable_attention` checks the
    inputs and chooses between this and the PyTorch reference."""
    extension = load_extension(value.device.type)
    return extension.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@multi_scale_deformable_attention_compiled.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    batch_size, _, num_heads, head_dim = value.shape
    return value.new_empty(batch_size, sampling_locations.shape[1], num_heads * head_dim)


@torch.library.custom_op("maft::multi_scale_deformable_attention_backward", mutates_args=())
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


multi_scale_deformable_attention_compiled.register_autograd(_differentiate, setup_context=_save_inputs)
