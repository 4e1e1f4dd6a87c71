"""Batches of segmentation examples -> MaftModel inputs with labels (for the Accelerate loop and `transformers.Trainer`)."""

from collections.abc import Sequence

from transformers import BatchFeature

from ..processing_maft import MaftProcessor


class MaftTrainingCollator:
    """
    Turns examples `{"image": ..., "label": ...}` (PIL images or arrays; the label a map of class indices, with the
    processor's ignore index for unlabelled pixels) into padded model inputs, with the vocabulary `class_names`
    tokenised into every batch (the model caches its embeddings, so this costs nothing after the first batch).
    """

    def __init__(self, processor: MaftProcessor, class_names: Sequence[str], do_resize: bool = False,
                 image_column: str = "image", label_column: str = "label"):
        processor.tokenize_class_names(list(class_names))  # fail early on a bad vocabulary
        self.processor, self.class_names, self.do_resize = processor, list(class_names), do_resize
        self.image_column, self.label_column = image_column, label_column

    def __call__(self, examples: Sequence[dict]) -> BatchFeature:
        missing = {self.image_column, self.label_column} - set(examples[0])
        if missing:
            raise KeyError(f"Training examples need the columns {sorted(missing)}; they have {sorted(examples[0])}.")
        return self.processor(
            images=[example[self.image_column] for example in examples],
            segmentation_maps=[example[self.label_column] for example in examples],
            text=self.class_names,
            do_resize=self.do_resize,
        )
