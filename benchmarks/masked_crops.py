"""The per-mask baseline of naming masks: CLIP once per mask, on a masked crop of the image (as two-stage
open-vocabulary segmenters before MAFT classify their proposals), shared by benchmarks/mask_naming.py (speed) and
benchmarks/mask_naming_accuracy.py (accuracy)."""

import numpy as np
import torch
from torch.nn import functional as F


def clip_normalized(image_processor, image: np.ndarray) -> torch.Tensor:
    """An (H, W, 3) RGB image as CLIP sees it, at its own size: (3, H, W), normalised as the processor's CLIP view."""
    return torch.from_numpy(image_processor.rescale_and_normalize(
        image, image_processor.clip_image_mean, image_processor.clip_image_std, do_rescale=image_processor.do_rescale,
        rescale_factor=image_processor.rescale_factor, do_normalize=image_processor.do_normalize))


def masked_crops(clip_image: torch.Tensor, masks: torch.Tensor, size: int) -> torch.Tensor:
    """
    A CLIP-normalised image (3, H, W) and masks (K, H, W) in [0, 1] -> (K, 3, size, size): per mask, the image times
    the mask (0 outside it: CLIP's mean colour) cut to the mask's bounding box (its pixels >= 0.5; the whole image for
    an empty mask), zero-padded to a square around its centre and resized bilinearly to `size`.
    """
    crops = []
    for mask in masks:
        rows, columns = torch.nonzero(mask >= 0.5, as_tuple=True)
        if len(rows) == 0:
            top, bottom, left, right = 0, mask.shape[0], 0, mask.shape[1]
        else:
            top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(columns.min()), int(columns.max()) + 1
        crop = (clip_image * mask)[:, top:bottom, left:right]
        height, width = crop.shape[-2:]
        side = max(height, width)
        crop = F.pad(crop, ((side - width) // 2, side - width - (side - width) // 2, (side - height) // 2, side - height - (side - height) // 2))
        crops.append(F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False)[0])
    return torch.stack(crops) if crops else clip_image.new_zeros((0, 3, size, size))


def masked_crop_class_logits(model, clip_image: torch.Tensor, masks: torch.Tensor, text_embeds: torch.Tensor,
                             crops_per_pass: int = 32) -> torch.Tensor:
    """
    The per-mask baseline with a `MaftModel`'s IP-CLIP as plain CLIP (no mask proposals, at its native input size):
    (K, num_classes + 1) logits `logit_scale * cos(CLIP(crop_k), [T; no-object])`, as `MaftModel.class_logits`.
    `text_embeds` (num_classes, D); the crops go through CLIP `crops_per_pass` at a time.
    """
    size = model.config.vision_config.image_size
    embeds = [
        model.ip_clip(masked_crops(clip_image, masks[start : start + crops_per_pass], size)).image_embeds
        for start in range(0, len(masks), crops_per_pass)
    ]
    embeds = torch.cat(embeds) if embeds else text_embeds.new_zeros((0, text_embeds.shape[-1]))
    return model.class_logits(embeds[None], text_embeds[None])[0]
