"""A model's semantic-segmentation metrics on a dataset (DESIGN.md §5)."""

from collections.abc import Sequence

import numpy as np
import torch

from .metrics import StreamingConfusionMatrix


def evaluate_on_dataset(model, processor, dataset, class_names: Sequence[str], ignore_index: int = 255,
                        unseen_class_names: Sequence[str] = (), device: str = "cpu") -> dict[str, float]:
    """Segments every example of `dataset` (columns image and label) into `class_names` at test-time resolution and
    returns `StreamingConfusionMatrix.compute` over all of them; a progress bar shows the way. The vocabulary is
    encoded once."""
    from tqdm.auto import tqdm

    model = model.to(device).eval()
    matrix = StreamingConfusionMatrix(len(class_names), ignore_index)
    text_inputs = {key: value.to(device) for key, value in processor.tokenize_class_names(list(class_names)).items()}
    with torch.inference_mode():
        text_embeds = model.get_text_embeddings(**text_inputs)
    for example in tqdm(dataset, desc="evaluating", unit="image"):
        reference = np.array(example["label"])  # a writable copy, for torch
        inputs = processor(images=example["image"]).to(device)
        with torch.inference_mode():
            outputs = model(**inputs, text_embeds=text_embeds)
        matrix.update(processor.post_process_semantic_segmentation(outputs, target_sizes=[reference.shape])[0].cpu(), reference)
    return matrix.compute(list(class_names), list(unseen_class_names))


__all__ = ["evaluate_on_dataset"]
