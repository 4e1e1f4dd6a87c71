"""Segmenting one image with a loaded model into any list of class names."""

from collections.abc import Sequence

import numpy as np
import torch

from .processing_maft import ImageLike, shortest_edge_size, to_rgb_array


def check_resizable(image: np.ndarray, image_processor) -> None:
    """Refuses an image so thin that the processor's resize would leave it no pixels across (e.g. 1x10000)."""
    if not image_processor.do_resize:
        return
    height, width = image.shape[:2]
    resized = shortest_edge_size(height, width, image_processor.shortest_edge, image_processor.longest_edge)
    if min(resized) < 1:
        raise ValueError(
            f"the image is {width}x{height} pixels, too thin to segment: resized so its long side is at most "
            f"{image_processor.longest_edge} pixels, it would be {resized[1]}x{resized[0]}"
        )


def encode_vocabulary(model, processor, class_names: Sequence[str]) -> torch.Tensor:
    """The text embeddings of `class_names` (each in every prompt template), computed once for many images."""
    tokens = processor.tokenize_class_names(list(class_names))
    with torch.inference_mode():
        return model.get_text_embeddings(**{name: value.to(model.device) for name, value in tokens.items()})


def segment_image(model, processor, image: ImageLike, text_embeds: torch.Tensor) -> np.ndarray:
    """The (H, W) label map of `image` (anything `to_rgb_array` reads; H, W its size): at each pixel the index of the
    class it shows among those `text_embeds` encode (`encode_vocabulary`)."""
    array = to_rgb_array(image)
    check_resizable(array, processor.image_processor)
    inputs = processor(images=array, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        outputs = model(**inputs, text_embeds=text_embeds)
    return processor.post_process_semantic_segmentation(outputs, target_sizes=[array.shape[:2]])[0].cpu().numpy()
