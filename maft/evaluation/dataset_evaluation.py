"""A model's semantic-segmentation metrics on a dataset (DESIGN.md §5), in one process or sharded across the processes
of `accelerate launch`."""

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env, reduce

from .metrics import StreamingConfusionMatrix


def distributed_state() -> PartialState:
    """The processes `accelerate launch` started (one without it), on the CPU when ACCELERATE_USE_CPU is set, as
    `Accelerator` reads it (a bare `PartialState()` takes CPU processes for one)."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


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
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    state = distributed_state()
    model = model.to(device).eval()
    matrix = StreamingConfusionMatrix(len(class_names), ignore_index)
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
            references = [np.array(example["label"]) for example in examples]  # writable copies, for torch
            inputs = processor(images=[example["image"] for example in examples]).to(device)
            with torch.inference_mode():
                outputs = model(**inputs, text_embeds=text_embeds)
            predictions = processor.post_process_semantic_segmentation(outputs, target_sizes=[label.shape for label in references])
            for prediction, reference in zip(predictions, references):
                matrix.update(prediction.cpu(), reference)
            progress.update(len(examples))
        progress.close()
    if state.num_processes > 1:
        matrix.matrix = reduce(matrix.matrix.to(state.device), reduction="sum").cpu()
    return matrix.compute(list(class_names), list(unseen_class_names))


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


__all__ = ["EvaluationSet", "distributed_state", "evaluate_on_dataset"]
