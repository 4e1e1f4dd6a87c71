"""Segmenting one image with a loaded model into any list of class names."""

import copy
from collections.abc import Collection, Sequence
from types import SimpleNamespace

import numpy as np
import torch

from .processing_maft import ImageLike, to_mask_array, to_rgb_array


def encode_vocabulary(model, processor, class_names: Sequence[str]) -> torch.Tensor:
    """The text embeddings of `class_names` (each in every prompt template), computed once for many images."""
    tokens = processor.tokenize_class_names(list(class_names))
    with torch.inference_mode():
        return model.get_text_embeddings(**{name: value.to(model.device) for name, value in tokens.items()})


def model_outputs(model, processor, image: ImageLike, text_embeds: torch.Tensor) -> tuple:
    """The model's outputs for `image` (a file, a PIL image, or an (H, W[, 3]) channels-last array) and its (H, W)."""
    array = to_rgb_array(image, input_data_format="channels_last")
    inputs = processor(images=array, input_data_format="channels_last", return_tensors="pt").to(model.device)
    with torch.inference_mode():
        outputs = model(**inputs, text_embeds=text_embeds)
    return outputs, array.shape[:2]


def segment_image(model, processor, image: ImageLike, text_embeds: torch.Tensor) -> np.ndarray:
    """The (H, W) label map of `image` (a file, a PIL image, or an (H, W[, 3]) channels-last array; H, W its size): at
    each pixel the index of the class it shows among those `text_embeds` encode (`encode_vocabulary`)."""
    outputs, size = model_outputs(model, processor, image, text_embeds)
    return processor.post_process_semantic_segmentation(outputs, target_sizes=[size])[0].cpu().numpy()


def post_process_objects(
    processor, outputs, task: str, target_sizes: list[tuple[int, int]], stuff_label_ids: Collection[int] = (),
    **options: float | bool,
) -> list[dict]:
    """`processor.post_process_{task}_segmentation` ("instance" or "panoptic") of a batch's `outputs` at `target_sizes`
    (one per image), with `stuff_label_ids` as the classes that are stuff (fused in panoptic, left out of instances) and
    `options`, the function's other arguments (`threshold`, `mask_threshold`, `overlap_mask_area_threshold`; for
    instances also `return_binary_maps`): per image `{"segmentation", "segments_info"}`."""
    if task == "panoptic":
        return processor.post_process_panoptic_segmentation(
            outputs, label_ids_to_fuse=stuff_label_ids, target_sizes=target_sizes, **options
        )
    if task == "instance":
        return processor.post_process_instance_segmentation(
            outputs, stuff_label_ids=stuff_label_ids, target_sizes=target_sizes, **options
        )
    raise ValueError(f"task must be 'instance' or 'panoptic', got {task!r}")


def segment_objects(
    model, processor, image: ImageLike, text_embeds: torch.Tensor, task: str, stuff_label_ids: Collection[int] = (),
    **thresholds: float,
) -> tuple[np.ndarray, list[dict]]:
    """The `task` segmentation of `image` at its size (see `post_process_objects`): the (H, W) segment ids (instance
    ids from 0, -1 where no instance is; panoptic ids from 1, 0 where no segment is) and the segments' infos."""
    outputs, size = model_outputs(model, processor, image, text_embeds)
    (result,) = post_process_objects(processor, outputs, task, [size], stuff_label_ids, **thresholds)
    return result["segmentation"].cpu().numpy(), result["segments_info"]


def name_masks(model, processor, image: ImageLike, masks, text_embeds: torch.Tensor) -> torch.Tensor:
    """IP-CLIP's class logits (K, num_classes + 1) of an image's `masks` (K, H, W at its size; see `to_mask_array`),
    by `MaftModel.classify_masks`."""
    array = to_rgb_array(image, input_data_format="channels_last")
    inputs = processor(images=array, masks=masks, input_data_format="channels_last", return_tensors="pt").to(model.device)
    with torch.inference_mode():
        return model.classify_masks(**inputs, text_embeds=text_embeds).class_logits[0].float().cpu()


def masks_as_proposals(class_logits: torch.Tensor, masks: np.ndarray) -> SimpleNamespace:
    """Named masks as the outputs MAFT's post-processing reads (`MaftModelOutput`'s fields) for one image, so that
    they are turned into segmentations as MAFT's own proposals are: `class_queries_logits` (1, K, C + 1), IP-CLIP's
    class logits with the no-object entry out (as MAFT's final logits with `ensemble_weight=0`), and
    `masks_queries_logits` (1, K, H, W), the masks' logits at the image size, for an image processor whose
    `mask_stride` is 1 (`at_image_size`)."""
    masks = torch.from_numpy(to_mask_array(masks)).float()
    class_queries_logits = torch.cat([class_logits[:, :-1], torch.full_like(class_logits[:, -1:], float("-inf"))], dim=-1)
    return SimpleNamespace(
        class_queries_logits=class_queries_logits[None],
        masks_queries_logits=torch.logit(masks, eps=1e-6)[None],
        image_sizes=torch.tensor([masks.shape[-2:]]),
        padded_sizes=None,
    )


def at_image_size(processor):
    """The image processor of `processor` for masks given at the image size (`masks_as_proposals`): mask stride 1."""
    image_processor = copy.copy(getattr(processor, "image_processor", processor))
    image_processor.mask_stride = 1
    return image_processor


def segment_with_masks(
    model, processor, image: ImageLike, masks: np.ndarray, text_embeds: torch.Tensor, task: str = "semantic",
    stuff_label_ids: Collection[int] = (), **thresholds: float,
):
    """
    `image` segmented with given class-agnostic `masks` (K, H, W booleans, e.g. Segment Anything's) as the proposals,
    each named by IP-CLIP (`name_masks`), then post-processed as MAFT's own proposals: for `task` "semantic", the
    (H, W) label map (the pixels no mask covers form one more mask, named like the others, so that every pixel has a
    class); for "instance" or "panoptic", the segment ids and infos as `segment_objects` gives them.
    """
    masks = np.asarray(masks, dtype=bool)
    if task == "semantic":
        uncovered = ~masks.any(axis=0)
        if uncovered.any():
            masks = np.concatenate([masks, uncovered[None]])
    outputs = masks_as_proposals(name_masks(model, processor, image, masks, text_embeds), masks)
    size = tuple(masks.shape[-2:])
    if task == "semantic":
        return at_image_size(processor).post_process_semantic_segmentation(outputs, target_sizes=[size])[0].numpy()
    (result,) = post_process_objects(at_image_size(processor), outputs, task, [size], stuff_label_ids, **thresholds)
    return result["segmentation"].cpu().numpy(), result["segments_info"]
