"""Segmentation datasets as `datasets.Dataset`: an `image` column and a `label` column (label maps of class indices),
with the class names and the ignore index kept in the dataset's description, so they survive `save_to_disk`,
`load_from_disk` and `push_to_hub`. Panoptic datasets have, in the COCO panoptic layout, a `panoptic` column (PNGs of
segment ids, id = R + 256 G + 256^2 B, 0 void) and a `segments_info` column (per image `[{"id", "category_id",
"iscrowd", "area"}]`, category ids indexing the class names), and record which classes are things."""

import json
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np

from ..utils.visualization import segment_ids_to_rgb


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
METADATA_KEY = "maft_segmentation"
PANOPTIC_SEGMENTS_FEATURE = datasets.List(
    {"id": datasets.Value("int64"), "category_id": datasets.Value("int64"), "iscrowd": datasets.Value("int64"), "area": datasets.Value("int64")}
)


def with_segmentation_metadata(dataset: datasets.Dataset, class_names: Sequence[str], ignore_index: int = 255,
                               thing_class_names: Sequence[str] | None = None) -> datasets.Dataset:
    """The dataset with its class names (in label order), ignore index and, for panoptic data, the names of its thing
    classes (the others are stuff) recorded in its description."""
    metadata = {"class_names": list(class_names), "ignore_index": ignore_index}
    if thing_class_names is not None:
        unknown = sorted(set(thing_class_names) - set(class_names))
        if unknown:
            raise ValueError(f"Thing classes not among the class names: {unknown}.")
        metadata["thing_class_names"] = list(thing_class_names)
    dataset.info.description = json.dumps({METADATA_KEY: metadata})
    return dataset


def _recorded_metadata(dataset: datasets.Dataset) -> dict:
    try:
        return json.loads(dataset.info.description or "")[METADATA_KEY]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(
            "This dataset does not record its class names: give them explicitly, or record them once with "
            "maft.data.segmentation_data.with_segmentation_metadata(dataset, class_names)."
        ) from None


def segmentation_metadata(dataset: datasets.Dataset) -> tuple[list[str], int]:
    """(class names, ignore index) recorded by `with_segmentation_metadata`."""
    metadata = _recorded_metadata(dataset)
    return metadata["class_names"], metadata["ignore_index"]


def recorded_thing_class_names(dataset: datasets.Dataset) -> list[str] | None:
    """The thing classes recorded by `with_segmentation_metadata`; None for a dataset that records none."""
    try:
        return _recorded_metadata(dataset).get("thing_class_names")
    except ValueError:
        return None


def has_panoptic_annotations(dataset) -> bool:
    return {"panoptic", "segments_info"} <= set(getattr(dataset, "column_names", None) or ())


def rgb_to_segment_ids(panoptic) -> np.ndarray:
    """A COCO panoptic PNG (PIL image, path or (H, W, 3) array) -> (H, W) int64 segment ids; an (H, W) array of ids is
    returned as it is."""
    if isinstance(panoptic, (str, os.PathLike)):
        from PIL import Image

        with Image.open(panoptic) as opened:
            panoptic = opened.convert("RGB")
    array = np.asarray(panoptic).astype(np.int64)
    if array.ndim == 2:
        return array
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"A panoptic map must be an RGB image of segment ids or (H, W) ids, got shape {array.shape}.")
    return array[..., 0] + 256 * array[..., 1] + 256**2 * array[..., 2]


def load_coco_panoptic(image_dir: str | os.PathLike, panoptic_dir: str | os.PathLike, annotation_file: str | os.PathLike) -> datasets.Dataset:
    """
    COCO panoptic annotations (`panoptic_{train,val}2017.json` with its folder of PNGs, and the images) as a panoptic
    dataset: columns image, panoptic, segments_info; the categories, sorted by id, become the class names (category i
    of `segments_info` is the i-th), their `isthing` the recorded thing classes. Images are matched by the annotation's
    file name stem.
    """
    annotation = json.loads(Path(annotation_file).read_text(encoding="utf-8"))
    categories = sorted(annotation["categories"], key=lambda category: category["id"])
    class_index = {category["id"]: index for index, category in enumerate(categories)}
    images = {path.stem: path for path in Path(image_dir).iterdir() if path.suffix.lower() in IMAGE_SUFFIXES}
    rows = {"image": [], "panoptic": [], "segments_info": []}
    for entry in sorted(annotation["annotations"], key=lambda entry: entry["file_name"]):
        stem = Path(entry["file_name"]).stem
        if stem not in images:
            raise ValueError(f"No image {stem}.* in {image_dir} for the panoptic annotation {entry['file_name']}.")
        unknown = sorted({segment["category_id"] for segment in entry["segments_info"]} - set(class_index))
        if unknown:
            raise ValueError(f"The annotation {entry['file_name']} uses category ids {unknown} that are not in the categories.")
        rows["image"].append(str(images[stem]))
        rows["panoptic"].append(str(Path(panoptic_dir) / entry["file_name"]))
        rows["segments_info"].append([
            {"id": segment["id"], "category_id": class_index[segment["category_id"]], "iscrowd": int(segment.get("iscrowd", 0)),
             "area": int(segment.get("area", 0))}
            for segment in entry["segments_info"]
        ])
    if not rows["image"]:
        raise ValueError(f"{annotation_file} has no annotations.")
    features = datasets.Features({"image": datasets.Image(), "panoptic": datasets.Image(), "segments_info": PANOPTIC_SEGMENTS_FEATURE})
    dataset = datasets.Dataset.from_dict(rows, features=features)
    return with_segmentation_metadata(dataset, [category["name"] for category in categories],
                                      thing_class_names=[category["name"] for category in categories if category.get("isthing")])


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
    """A dataset saved with `save_to_disk` (a directory) or on the Hub (a name), with the columns renamed to image/label
    (a panoptic dataset may have no label column)."""
    path = Path(name_or_path)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
        dataset = datasets.load_from_disk(str(path))
    else:
        dataset = datasets.load_dataset(str(name_or_path), split=split)
    if isinstance(dataset, datasets.DatasetDict):
        if split is None:
            raise ValueError(f"{name_or_path} has the splits {list(dataset)}: choose one with `split`.")
        dataset = dataset[split]
    required = {image_column} if has_panoptic_annotations(dataset) else {image_column, label_column}
    missing = required - set(dataset.column_names)
    if missing:
        raise ValueError(f"{name_or_path} has no column {sorted(missing)}; its columns are {dataset.column_names}.")
    renames = {old: new for old, new in ((image_column, "image"), (label_column, "label"))
               if old != new and old in dataset.column_names}
    return dataset.rename_columns(renames) if renames else dataset


def panoptic_thing_class_ids(dataset) -> list[int]:
    """The class indices of the thing classes of a dataset with panoptic annotations (columns panoptic and
    segments_info, whose category ids index the recorded class names), from its metadata; an error that says what is
    missing otherwise."""
    if not has_panoptic_annotations(dataset):
        columns = getattr(dataset, "column_names", None)
        raise ValueError(f"panoptic targets and metrics need a dataset with the columns panoptic and segments_info (COCO "
                         f"panoptic layout); this one has {columns}")
    thing_names = recorded_thing_class_names(dataset)
    if thing_names is None:
        raise ValueError("this panoptic dataset does not record its thing classes: record them with "
                         "maft.data.segmentation_data.with_segmentation_metadata(dataset, class_names, thing_class_names=...)")
    class_names, _ = segmentation_metadata(dataset)
    return [class_names.index(name) for name in thing_names]


__all__ = [
    "PANOPTIC_SEGMENTS_FEATURE",
    "has_panoptic_annotations",
    "load_coco_panoptic",
    "load_image_folder_pairs",
    "load_segmentation_dataset",
    "panoptic_thing_class_ids",
    "recorded_thing_class_names",
    "rgb_to_segment_ids",
    "segment_ids_to_rgb",
    "segmentation_metadata",
    "with_segmentation_metadata",
]
