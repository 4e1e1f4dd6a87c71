"""Batches of segmentation examples -> MaftModel inputs with labels (for the Accelerate loop and `transformers.Trainer`)."""

import copy
from collections.abc import Collection, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset
from transformers import BatchFeature

from ..processing_maft import MaftProcessor, to_label_array, to_rgb_array
from ..data.segmentation_data import rgb_to_segment_ids
from .augmentation import AugmentationConfig, augment


EXAMPLE_KEY = "maft_example_key"
# Panoptic examples travel through augmentation and padding as one map, class + INSTANCE_STRIDE * instance number, so
# that both are cropped, flipped and resized alike; padding (the ignore index) unpacks to ignored, instance 0.
INSTANCE_STRIDE = 2**16


def panoptic_training_maps(panoptic, segments_info: Sequence[Mapping], thing_class_ids: Collection[int],
                           ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """
    A COCO-panoptic annotation (`panoptic` segment ids as an RGB PNG or (H, W) array, `segments_info` with `id`,
    `category_id` (class index), `iscrowd`) -> (labels, instances), both (H, W) int64: labels the class of every pixel,
    `ignore_index` on void and crowd segments; instances n > 0 on the n-th thing segment, 0 elsewhere (stuff classes
    are one region each). Stage 1 makes one target mask per instance and one per stuff class of these.
    """
    segment_ids = rgb_to_segment_ids(panoptic)
    labels = np.full(segment_ids.shape, ignore_index, dtype=np.int64)
    instances = np.zeros(segment_ids.shape, dtype=np.int64)
    thing_class_ids = set(thing_class_ids)
    things = 0
    for segment in segments_info:
        if segment.get("iscrowd", 0):
            continue
        inside = segment_ids == segment["id"]
        labels[inside] = segment["category_id"]
        if segment["category_id"] in thing_class_ids:
            things += 1
            instances[inside] = things
    return labels, instances


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

    With `thing_class_ids`, the targets are panoptic: examples carry COCO-panoptic annotations (columns `panoptic` and
    `segments_info`, see `panoptic_training_maps`) instead of a label map, and batches also hold `instance_labels`
    (B, H, W) beside the class `labels` (crowd and void ignored), from which stage 1 makes one target per thing
    instance and one per stuff class.
    """

    def __init__(self, processor: MaftProcessor, do_resize: bool = False, image_column: str = "image",
                 label_column: str = "label", augmentation: AugmentationConfig | None = None, seed: int = 0,
                 label_ignore_index: int | None = None, num_classes: int | None = None,
                 thing_class_ids: Collection[int] | None = None):
        self.processor, self.do_resize = processor, do_resize
        self.image_column, self.label_column = image_column, label_column
        self.augmentation, self.seed, self.rng = augmentation, seed, np.random.default_rng(seed)
        self.label_ignore_index, self.num_classes = label_ignore_index, num_classes
        self.thing_class_ids = None if thing_class_ids is None else sorted(thing_class_ids)

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
        panoptic = self.thing_class_ids is not None
        label_columns = ("panoptic", "segments_info") if panoptic else (self.label_column,)
        missing = {self.image_column, *label_columns} - set(examples[0])
        if missing:
            raise KeyError(f"Training examples need the columns {sorted(missing)}; they have {sorted(examples[0])}.")
        images = [example[self.image_column] for example in examples]
        ignore_index = self.processor.image_processor.ignore_index
        if panoptic:
            maps = [panoptic_training_maps(example["panoptic"], example["segments_info"], self.thing_class_ids, ignore_index)
                    for example in examples]
            labels = [label for label, _ in maps]
        else:
            labels = [to_label_array(example[self.label_column]) for example in examples]
        if self.label_ignore_index not in (None, ignore_index):
            labels = [np.where(label == self.label_ignore_index, ignore_index, label) for label in labels]
        if self.num_classes is not None:
            for label, example in zip(labels, examples):
                self.check_label(label, example, ignore_index)
        if panoptic:
            labels = [label + INSTANCE_STRIDE * instances for label, (_, instances) in zip(labels, maps)]
        if self.augmentation is not None:
            pairs = [
                augment(to_rgb_array(image), to_label_array(label), self.example_rng(example), self.augmentation, ignore_index)
                for image, label, example in zip(images, labels, examples)
            ]
            images, labels = [image for image, _ in pairs], [label for _, label in pairs]
        batch = self.processor(images=images, segmentation_maps=labels, do_resize=self.do_resize)
        if panoptic:
            batch["labels"], batch["instance_labels"] = batch["labels"] % INSTANCE_STRIDE, batch["labels"] // INSTANCE_STRIDE
        return batch
