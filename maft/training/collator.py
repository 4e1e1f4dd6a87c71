"""Batches of segmentation examples -> MaftModel inputs with labels (for the Accelerate loop and `transformers.Trainer`)."""

from collections.abc import Sequence

import numpy as np
from transformers import BatchFeature

from ..processing_maft import MaftProcessor, to_label_array, to_rgb_array
from .augmentation import AugmentationConfig, augment


class MaftTrainingCollator:
    """
    Turns examples `{"image": ..., "label": ...}` (PIL images or arrays; the label a map of class indices, with the
    processor's ignore index for unlabelled pixels) into padded model inputs, with the vocabulary `class_names`
    tokenised into every batch (the model caches its embeddings, so this costs nothing after the first batch).
    With `augmentation`, each example is augmented first (DESIGN.md §4), drawing from a generator seeded with `seed`.
    """

    def __init__(self, processor: MaftProcessor, class_names: Sequence[str], do_resize: bool = False,
                 image_column: str = "image", label_column: str = "label",
                 augmentation: AugmentationConfig | None = None, seed: int = 0):
        processor.tokenize_class_names(list(class_names))  # fail early on a bad vocabulary
        self.processor, self.class_names, self.do_resize = processor, list(class_names), do_resize
        self.image_column, self.label_column = image_column, label_column
        self.augmentation, self.rng = augmentation, np.random.default_rng(seed)

    def __call__(self, examples: Sequence[dict]) -> BatchFeature:
        missing = {self.image_column, self.label_column} - set(examples[0])
        if missing:
            raise KeyError(f"Training examples need the columns {sorted(missing)}; they have {sorted(examples[0])}.")
        images = [example[self.image_column] for example in examples]
        labels = [example[self.label_column] for example in examples]
        if self.augmentation is not None:
            pairs = [augment(to_rgb_array(image), to_label_array(label), self.rng, self.augmentation) for image, label in zip(images, labels)]
            images, labels = [image for image, _ in pairs], [label for _, label in pairs]
        return self.processor(images=images, segmentation_maps=labels, text=self.class_names, do_resize=self.do_resize)
