"""Segmenting one image with a loaded model into any list of class names."""

from collections.abc import Collection, Sequence

import numpy as np
import torch

from .processing_maft import ImageLike, to_rgb_array


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
    processor, outputs, task: str, target_size: tuple[int, int], stuff_label_ids: Collection[int] = (), **thresholds: float
) -> dict:
    """`processor.post_process_{task}_segmentation` ("instance" or "panoptic") of a one-image output at `target_size`,
    with `stuff_label_ids` as the classes that are stuff (fused in panoptic, left out of instances) and `thresholds`
    (`threshold`, `mask_threshold`, `overlap_mask_area_threshold`): `{"segmentation", "segments_info"}`."""
    if task == "panoptic":
        (result,) = processor.post_process_panoptic_segmentation(
            outputs, label_ids_to_fuse=stuff_label_ids, target_sizes=[target_size], **thresholds
        )
    elif task == "instance":
        (result,) = processor.post_process_instance_segmentation(
            outputs, stuff_label_ids=stuff_label_ids, target_sizes=[target_size], **thresholds
        )
    else:
        raise ValueError(f"task must be 'instance' or 'panoptic', got {task!r}")
    return result


def segment_objects(
    model, processor, image: ImageLike, text_embeds: torch.Tensor, task: str, stuff_label_ids: Collection[int] = (),
    **thresholds: float,
) -> tuple[np.ndarray, list[dict]]:
    """The `task` segmentation of `image` at its size (see `post_process_objects`): the (H, W) segment ids (instance
    ids from 0, -1 where no instance is; panoptic ids from 1, 0 where no segment is) and the segments' infos."""
    outputs, size = model_outputs(model, processor, image, text_embeds)
    result = post_process_objects(processor, outputs, task, size, stuff_label_ids, **thresholds)
    return result["segmentation"].cpu().numpy(), result["segments_info"]
