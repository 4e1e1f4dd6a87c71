"""Straightforward formulations of IP-CLIP, shared by the tests and benchmarks/ipclip.py."""

import torch
from torch.nn import functional as F

from maft import MaftClipVisionModel


def dense_mask_proposal_embeds(
    model: MaftClipVisionModel, pixel_values: torch.Tensor, masks: torch.Tensor, interpolate: bool
) -> torch.Tensor:
    """The original formulation: one sequence [proposals; patches] with a dense (Q+L)x(Q+L) attention mask."""
    config = model.config
    hidden = model.pre_layrnorm(model.embeddings(pixel_values, interpolate_pos_encoding=interpolate))
    for layer in model.encoder.layers[: config.mask_start_layer]:
        hidden = layer(hidden, None)
    grid = (pixel_values.shape[-2] // config.patch_size, pixel_values.shape[-1] // config.patch_size)
    resized = F.interpolate(masks.to(pixel_values.dtype), size=grid, mode="bilinear", align_corners=False)
    keep = (resized >= config.mask_threshold).flatten(2)
    batch_size, num_proposals, num_patches = keep.shape
    allowed = torch.zeros(batch_size, num_proposals + num_patches, num_proposals + num_patches, dtype=torch.bool)
    allowed[:, :num_proposals, :num_proposals] = torch.eye(num_proposals, dtype=torch.bool)
    allowed[:, :num_proposals, num_proposals:] = keep
    allowed[:, num_proposals:, num_proposals:] = True
    additive_mask = torch.zeros(allowed.shape, dtype=pixel_values.dtype).masked_fill(~allowed, float("-inf"))
    tokens = torch.cat([hidden[:, :1].expand(-1, num_proposals, -1), hidden[:, 1:]], dim=1)
    for layer in model.encoder.layers[config.mask_start_layer :]:
        tokens = layer(tokens, additive_mask[:, None])
    return model.visual_projection(model.post_layernorm(tokens[:, :num_proposals]))


def per_mask_image_embeds(
    model: MaftClipVisionModel, pixel_values: torch.Tensor, masks: torch.Tensor, size: int = 224
) -> torch.Tensor:
    """The per-mask baseline: CLIP once per proposal on the masked image resized to `size` x `size` (B, Q, P)."""
    batch_size, num_proposals = masks.shape[:2]
    masks = F.interpolate(masks.to(pixel_values.dtype), size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
    masked_images = (pixel_values[:, None] * masks[:, :, None]).flatten(0, 1)
    masked_images = F.interpolate(masked_images, size=(size, size), mode="bilinear", align_corners=False)
    embeds = model(masked_images, interpolate_pos_encoding=True).image_embeds
    return embeds.view(batch_size, num_proposals, -1)
