"""A model's semantic-segmentation metrics (DESIGN.md §5), and its panoptic (PQ) and instance (mask AP) metrics, on a
dataset, in one process or sharded across the processes of `accelerate launch`."""

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env, reduce

from ..data.segmentation_data import rgb_to_segment_ids
from ..inference import post_process_objects
from .metrics import StreamingConfusionMatrix
from .panoptic_metrics import StreamingMaskAP, StreamingPanopticQuality


def distributed_state() -> PartialState:
    """The processes `accelerate launch` started (one without it), on the CPU when ACCELERATE_USE_CPU is set, as
    `Accelerator` reads it (a bare `PartialState()` takes CPU processes for one)."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def segmented_shard(model, processor, dataset, class_names: Sequence[str], device: str | torch.device, batch_size: int,
                    label_column: str = "label") -> Iterator[tuple[list[dict], list[tuple[int, int]], Any]]:
    """
    This process's shard of `dataset` (see `evaluate_on_dataset`) segmented `batch_size` images at a time into
    `class_names` (encoded once): yields (examples, their reference sizes (H, W) taken from `label_column`, model
    outputs), with a progress bar on the main process.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    state = distributed_state()
    model = model.to(device).eval()
    text_inputs = {key: value.to(device) for key, value in processor.tokenize_class_names(list(class_names)).items()}
    with torch.inference_mode():
        text_embeds = model.get_text_embeddings(**text_inputs)
    with state.split_between_processes(list(range(len(dataset)))) as indices:
        if state.num_processes > 1:
            print(f"maft: process {state.process_index} of {state.num_processes} evaluates {len(indices)} of {len(dataset)} "
                  "examples", file=sys.stderr, flush=True)
        progress = tqdm(total=len(indices), desc="evaluating", unit="image", disable=not state.is_main_process)
        for start in range(0, len(indices), batch_size):
            examples = [dataset[index] for index in indices[start : start + batch_size]]
            sizes = [tuple(np.asarray(example[label_column]).shape[:2]) for example in examples]
            inputs = processor(images=[example["image"] for example in examples]).to(device)
            with torch.inference_mode():
                outputs = model(**inputs, text_embeds=text_embeds)
            yield examples, sizes, outputs
            progress.update(len(examples))
        progress.close()


def evaluate_on_dataset(model, processor, dataset, class_names: Sequence[str], ignore_index: int = 255,
                        unseen_class_names: Sequence[str] = (), device: str | torch.device = "cpu",
                        batch_size: int = 1) -> dict[str, float]:
    """
    Segments every example of `dataset` (columns image and label) into `class_names` at test-time resolution and
    returns `StreamingConfusionMatrix.compute` over all of them. The vocabulary is encoded once.

    `batch_size` images go through the model at a time; the model segments each at its own padded size and each
    prediction is resized to its label map, so every batch size gives the metrics of one image at a time (as the
    original evaluates).

    Under `accelerate launch`, every process must call this: each takes a contiguous shard of the dataset (the first
    `len(dataset) % num_processes` processes one example more; a process may get none), and the confusion matrices are
    summed across processes, so each example counts once and every process returns the metrics of the whole dataset,
    equal to those of one process with the same batches. Each process then writes one line to stderr saying how many
    examples it evaluated; the progress bar is the main process's.
    """
    matrix = StreamingConfusionMatrix(len(class_names), ignore_index)
    for examples, sizes, outputs in segmented_shard(model, processor, dataset, class_names, device, batch_size):
        predictions = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
        for prediction, example in zip(predictions, examples):
            matrix.update(prediction.cpu(), np.array(example["label"]))  # a writable copy, for torch
    state = distributed_state()
    if state.num_processes > 1:
        matrix.matrix = reduce(matrix.matrix.to(state.device), reduction="sum").cpu()
    return matrix.compute(list(class_names), list(unseen_class_names))


# Scores below which a prediction is dropped, by task: Mask2Former's panoptic default; none for instance AP, which
# ranks every detection by score (a low-scored one can only add recall), as detectron2's instance evaluation does.
DEFAULT_THRESHOLDS = {"panoptic": 0.5, "instance": 0.0}


def evaluate_panoptic_on_dataset(model, processor, dataset, class_names: Sequence[str], thing_class_ids: Sequence[int],
                                 task: str = "panoptic", unseen_class_names: Sequence[str] = (),
                                 device: str | torch.device = "cpu", batch_size: int = 1,
                                 threshold: float | None = None) -> dict[str, float]:
    """
    Panoptic (`task="panoptic"`: `StreamingPanopticQuality`, PQ / SQ / RQ) or instance (`task="instance"`:
    `StreamingMaskAP`, mask AP over the thing classes) metrics of the model on a dataset with COCO-panoptic
    annotations (columns image, panoptic, segments_info whose category ids index `class_names`). Predictions come
    from `post_process_panoptic_segmentation` (the classes not in `thing_class_ids` fused as stuff) or
    `post_process_instance_segmentation` (binary maps, which may overlap; stuff classes left out) with score `threshold` (default:
    `DEFAULT_THRESHOLDS[task]`), at the reference's size. Sharded under `accelerate launch` as `evaluate_on_dataset`;
    every process returns the metrics of the whole dataset.
    """
    if task not in DEFAULT_THRESHOLDS:
        raise ValueError(f"`task` must be one of {', '.join(DEFAULT_THRESHOLDS)}, got {task!r}.")
    threshold = DEFAULT_THRESHOLDS[task] if threshold is None else threshold
    stuff_class_ids = sorted(set(range(len(class_names))) - set(thing_class_ids))
    metric = (StreamingPanopticQuality if task == "panoptic" else StreamingMaskAP)(len(class_names), thing_class_ids)
    # mask AP wants every instance's whole mask, overlaps included
    binary_maps = {"return_binary_maps": True} if task == "instance" else {}
    for examples, sizes, outputs in segmented_shard(model, processor, dataset, class_names, device, batch_size, "panoptic"):
        predictions = post_process_objects(processor.image_processor, outputs, task, sizes, stuff_class_ids,
                                           threshold=threshold, **binary_maps)
        for prediction, example in zip(predictions, examples):
            metric.update(prediction, rgb_to_segment_ids(example["panoptic"]), example["segments_info"])
    state = distributed_state()
    if state.num_processes > 1:
        if task == "panoptic":
            metric.counts = reduce(metric.counts.to(state.device), reduction="sum").cpu()
        else:
            metric.images = [image for images in gather_object([metric.images]) for image in images]
    return metric.compute(list(class_names), list(unseen_class_names))


@dataclass
class EvaluationSet:
    """A labelled dataset and its vocabulary, to evaluate a model on with `evaluate_on_dataset` (e.g. during
    training: `maft.training.train(..., evaluator=EvaluationSet(...))`)."""

    dataset: Any
    class_names: Sequence[str]
    ignore_index: int = 255
    unseen_class_names: Sequence[str] = ()
    batch_size: int = 1

    def __call__(self, model, processor, device: str | torch.device) -> dict[str, float]:
        return evaluate_on_dataset(model, processor, self.dataset, self.class_names, self.ignore_index,
                                   self.unseen_class_names, device, self.batch_size)


__all__ = ["EvaluationSet", "distributed_state", "evaluate_on_dataset", "evaluate_panoptic_on_dataset", "segmented_shard"]
