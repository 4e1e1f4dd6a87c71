"""Segmentation datasets as `datasets.Dataset`: an `image` column and a `label` column (label maps of class indices),
with the class names and the ignore index kept in the dataset's description, so they survive `save_to_disk`,
`load_from_disk` and `push_to_hub`."""

import json
import os
from collections.abc import Sequence
from pathlib import Path

import datasets


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
METADATA_KEY = "maft_segmentation"


def with_segmentation_metadata(dataset: datasets.Dataset, class_names: Sequence[str], ignore_index: int = 255) -> datasets.Dataset:
    """The dataset with its class names (in label order) and ignore index recorded in its description."""
    dataset.info.description = json.dumps({METADATA_KEY: {"class_names": list(class_names), "ignore_index": ignore_index}})
    return dataset


def segmentation_metadata(dataset: datasets.Dataset) -> tuple[list[str], int]:
    """(class names, ignore index) recorded by `with_segmentation_metadata`."""
    try:
        metadata = json.loads(dataset.info.description or "")[METADATA_KEY]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(
            "This dataset does not record its class names: give them explicitly, or record them once with "
            "maft.data.segmentation_data.with_segmentation_metadata(dataset, class_names)."
        ) from None
    return metadata["class_names"], metadata["ignore_index"]


def load_image_folder_pairs(image_dir: str | os.PathLike, label_dir: str | os.PathLike, class_names: Sequence[str],
                            ignore_index: int = 255, skip_unlabelled_images: bool = False) -> datasets.Dataset:
    """Images and label maps (PNG, or 16-bit TIFF for more than 255 classes, of class indices) matched by file name stem.

    With `skip_unlabelled_images`, images without a label map are left out instead of being an error (as detectron2's
    `load_sem_seg` does), for image folders shared by several splits such as VOC's JPEGImages."""
    images = {path.stem: path for path in sorted(Path(image_dir).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES}
    labels = {path.stem: path for path in sorted(Path(label_dir).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES}
    if skip_unlabelled_images:
        if not labels:
            raise ValueError(f"No label maps found in {label_dir}.")
        images = {stem: path for stem, path in images.items() if stem in labels}
    if images.keys() != labels.keys():
        only_images, only_labels = sorted(images.keys() - labels.keys()), sorted(labels.keys() - images.keys())
        raise ValueError(
            f"Images and label maps must match by name: {len(only_images)} images without a label map (e.g. "
            f"{only_images[:3]}), {len(only_labels)} label maps without an image (e.g. {only_labels[:3]})."
        )
    if not images:
        raise ValueError(f"No images found in {image_dir}.")
    stems = sorted(images)
    dataset = datasets.Dataset.from_dict(
        {"image": [str(images[stem]) for stem in stems], "label": [str(labels[stem]) for stem in stems]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Image()}),
    )
    return with_segmentation_metadata(dataset, class_names, ignore_index)


def load_segmentation_dataset(name_or_path: str | os.PathLike, split: str | None = None, image_column: str = "image",
                              label_column: str = "label") -> datasets.Dataset:
    """A dataset saved with `save_to_disk` (a directory) or on the Hub (a name), with the columns renamed to image/label."""
    path = Path(name_or_path)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
        dataset = datasets.load_from_disk(str(path))
    else:
        dataset = datasets.load_dataset(str(name_or_path), split=split)
    if isinstance(dataset, datasets.DatasetDict):
        if split is None:
            raise ValueError(f"{name_or_path} has the splits {list(dataset)}: choose one with `split`.")
        dataset = dataset[split]
    missing = {image_column, label_column} - set(dataset.column_names)
    if missing:
        raise ValueError(f"{name_or_path} has no column {sorted(missing)}; its columns are {dataset.column_names}.")
    renames = {old: new for old, new in ((image_column, "image"), (label_column, "label")) if old != new}
    return dataset.rename_columns(renames) if renames else dataset


__all__ = ["load_image_folder_pairs", "load_segmentation_dataset", "segmentation_metadata", "with_segmentation_metadata"]
