"""Batches of segmentation examples -> MaftModel inputs with labels (for the Accelerate loop and `transformers.Trainer`)."""

import copy
from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset
from transformers import BatchFeature

from ..processing_maft import MaftProcessor, to_label_array, to_rgb_array
from .augmentation import AugmentationConfig, augment


EXAMPLE_KEY = "maft_example_key"


class EpochIndexedDataset(Dataset):
    """
    A map-style dataset whose examples (dicts) also carry `(epoch, index)` under `EXAMPLE_KEY`, set with `set_epoch`.
    `MaftTrainingCollator` seeds each example's augmentation from it, so that the augmentation of an example depends
    only on the seed, the epoch and the example: not on the process, the worker, the batch or an interruption.
    """

    def __init__(self, dataset):
        self.dataset, self.epoch = dataset, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], EXAMPLE_KEY: (self.epoch, index)}


class MaftTrainingCollator:
    """
    Turns examples `{"image": ..., "label": ...}` (PIL images or arrays; the label a map of class indices, with the
    processor's ignore index for unlabelled pixels) into padded model inputs with `labels`. The class names' text
    embeddings are not part of a batch: the training code computes them once (`MaftModel.get_text_embeddings`).
    With `augmentation`, each example is augmented first (DESIGN.md §4): from a generator seeded with `seed` and the
    example's `EXAMPLE_KEY` when it has one (`EpochIndexedDataset`, as `train` uses), else from one generator seeded
    with `seed` for all examples. `label_ignore_index`, when the dataset marks unlabelled pixels with another value
    than the processor (e.g. 65535 in 16-bit label maps), is mapped to the processor's. With `num_classes`, a label
    outside `0..num_classes - 1` (and not the ignore index) raises a ValueError naming the example.
    """

    def __init__(self, processor: MaftProcessor, do_resize: bool = False, image_column: str = "image",
                 label_column: str = "label", augmentation: AugmentationConfig | None = None, seed: int = 0,
                 label_ignore_index: int | None = None, num_classes: int | None = None):
        self.processor, self.do_resize = processor, do_resize
        self.image_column, self.label_column = image_column, label_column
        self.augmentation, self.seed, self.rng = augmentation, seed, np.random.default_rng(seed)
        self.label_ignore_index, self.num_classes = label_ignore_index, num_classes

    def checking_labels(self, num_classes: int) -> "MaftTrainingCollator":
        """This collator, checking labels against a vocabulary of `num_classes` classes."""
        checking = copy.copy(self)
        checking.num_classes = num_classes
        return checking

    def example_rng(self, example: dict) -> np.random.Generator:
        """The generator of one example's augmentation."""
        return np.random.default_rng([self.seed, *example[EXAMPLE_KEY]]) if EXAMPLE_KEY in example else self.rng

    def check_label(self, label: np.ndarray, example: dict, ignore_index: int) -> None:
        values = np.unique(label)
        wrong = values[((values < 0) | (values >= self.num_classes)) & (values != ignore_index)]
        if wrong.size:
            where = f"Training example {example[EXAMPLE_KEY][1]}" if EXAMPLE_KEY in example else "A training example"
            raise ValueError(f"{where} has label values {wrong[:10].tolist()} outside the vocabulary: labels must be class "
                             f"indices 0..{self.num_classes - 1} or the ignore index {ignore_index}.")

    def __call__(self, examples: Sequence[dict]) -> BatchFeature:
        missing = {self.image_column, self.label_column} - set(examples[0])
        if missing:
            raise KeyError(f"Training examples need the columns {sorted(missing)}; they have {sorted(examples[0])}.")
        images = [example[self.image_column] for example in examples]
        labels = [to_label_array(example[self.label_column]) for example in examples]
        ignore_index = self.processor.image_processor.ignore_index
        if self.label_ignore_index not in (None, ignore_index):
            labels = [np.where(label == self.label_ignore_index, ignore_index, label) for label in labels]
        if self.num_classes is not None:
            for label, example in zip(labels, examples):
                self.check_label(label, example, ignore_index)
        if self.augmentation is not None:
            pairs = [
                augment(to_rgb_array(image), to_label_array(label), self.example_rng(example), self.augmentation, ignore_index)
                for image, label, example in zip(images, labels, examples)
            ]
            images, labels = [image for image, _ in pairs], [label for _, label in pairs]
        return self.processor(images=images, segmentation_maps=labels, do_resize=self.do_resize)
