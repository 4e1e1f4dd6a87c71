"""Segmenting one image with a loaded model into any list of class names."""

from collections.abc import Sequence

import numpy as np
import torch

from .processing_maft import ImageLike, to_rgb_array


def encode_vocabulary(model, processor, class_names: Sequence[str]) -> torch.Tensor:
    """The text embeddings of `class_names` (each in every prompt template), computed once for many images."""
    tokens = processor.tokenize_class_names(list(class_names))
    with torch.inference_mode():
        return model.get_text_embeddings(**{name: value.to(model.device) for name, value in tokens.items()})


def segment_image(model, processor, image: ImageLike, text_embeds: torch.Tensor) -> np.ndarray:
    """The (H, W) label map of `image` (a file, a PIL image, or an (H, W[, 3]) channels-last array; H, W its size): at
    each pixel the index of the class it shows among those `text_embeds` encode (`encode_vocabulary`)."""
    array = to_rgb_array(image, input_data_format="channels_last")
    inputs = processor(images=array, input_data_format="channels_last", return_tensors="pt").to(model.device)
    with torch.inference_mode():
        outputs = model(**inputs, text_embeds=text_embeds)
    return processor.post_process_semantic_segmentation(outputs, target_sizes=[array.shape[:2]])[0].cpu().numpy()
