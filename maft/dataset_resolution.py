"""Which dataset to train or evaluate on, and its vocabulary: a saved or Hub dataset, or a benchmark in the original
MAFT layout, with its class names and ignore index taken from what is given, else from what the dataset records."""

import os
from collections.abc import Sequence
from pathlib import Path

from .hub import hub_is_offline, is_hub_id


DEFAULT_IGNORE_INDEX = 255


def recorded_classes(dataset, default_class_names: Sequence[str] | None = None, ignore_index: int | None = None) -> tuple[list[str], int]:
    """(class names, ignore index) recorded in the dataset's metadata; without metadata, `default_class_names` (an
    error if there are none) and 255. A given `ignore_index` replaces either."""
    from .segmentation_data import segmentation_metadata

    try:
        class_names, recorded_ignore_index = segmentation_metadata(dataset)
    except ValueError:
        if default_class_names is None:
            raise
        class_names, recorded_ignore_index = list(default_class_names), DEFAULT_IGNORE_INDEX
    return class_names, recorded_ignore_index if ignore_index is None else ignore_index


def panoptic_thing_class_ids(dataset) -> list[int]:
    """The class indices of the thing classes of a dataset with panoptic annotations (columns panoptic and
    segments_info, whose category ids index the recorded class names), from its metadata; an error that says what is
    missing otherwise."""
    from .segmentation_data import has_panoptic_annotations, recorded_thing_class_names, segmentation_metadata

    if not has_panoptic_annotations(dataset):
        columns = getattr(dataset, "column_names", None)
        raise ValueError(f"panoptic targets and metrics need a dataset with the columns panoptic and segments_info (COCO "
                         f"panoptic layout); this one has {columns}")
    thing_names = recorded_thing_class_names(dataset)
    if thing_names is None:
        raise ValueError("this panoptic dataset does not record its thing classes: record them with "
                         "maft.segmentation_data.with_segmentation_metadata(dataset, class_names, thing_class_names=...)")
    class_names, _ = segmentation_metadata(dataset)
    return [class_names.index(name) for name in thing_names]


def load_labelled_dataset(name_or_path: str | os.PathLike, split: str | None = None, image_column: str = "image", label_column: str = "label"):
    """A dataset saved with `save_to_disk` (a folder) or on the Hub (a name), columns renamed to image/label; a missing
    folder, or a Hub name that cannot be reached, is an error that says so."""
    from .segmentation_data import load_segmentation_dataset

    if not Path(name_or_path).exists() and not is_hub_id(name_or_path):
        raise FileNotFoundError(f"the dataset folder {name_or_path} does not exist")
    try:
        return load_segmentation_dataset(name_or_path, split, image_column, label_column)
    except ConnectionError as error:
        reason = "the Hub is offline (HF_HUB_OFFLINE is set)" if hub_is_offline() else str(error).strip().splitlines()[0]
        raise ConnectionError(
            f"cannot load the dataset {str(name_or_path)!r}: there is no such folder, and from the Hub: {reason}"
        ) from error


def load_dataset_and_classes(
    name_or_path: str | os.PathLike | None = None,
    *,
    benchmark: str | None = None,
    data_root: str | os.PathLike | None = None,
    split: str | None = None,
    default_split: str = "val",
    image_column: str = "image",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    ignore_index: int | None = None,
):
    """(dataset with columns image/label, class names, ignore index): from `name_or_path` (a saved or Hub dataset), or
    from `benchmark` read under `data_root` in the original layout (split `split`, else `default_split`). The class
    names are `class_names` when given, else the dataset's recorded ones; the ignore index is `ignore_index` when
    given, else the recorded one, else 255."""
    from .evaluation.benchmark_datasets import load_benchmark

    if (name_or_path is None) == (benchmark is None):
        raise ValueError("give either a dataset (name or folder) or a benchmark, not both or neither")
    if benchmark is not None:
        if data_root is None:
            raise ValueError(f"the benchmark {benchmark} needs its data root, the folder holding coco/, ade/ and VOCdevkit/")
        dataset = load_benchmark(benchmark, data_root, split or default_split)
    else:
        dataset = load_labelled_dataset(name_or_path, split, image_column, label_column)
    recorded_names, resolved_ignore_index = recorded_classes(dataset, class_names, ignore_index)
    return dataset, list(class_names) if class_names else recorded_names, resolved_ignore_index
