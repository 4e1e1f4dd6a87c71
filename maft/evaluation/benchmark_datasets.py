"""The six benchmarks MAFT reports (COCO-Stuff-171, ADE20K-150 and -847, Pascal Context-59 and -459, Pascal VOC-20):
their class names and ignore index as the original code registers them (`maft/data/benchmark_classes.json`), and loaders
that read them, as `datasets.Dataset`s, from the folders the original's prepare scripts leave under a data root:

    root/
      coco/train2017, val2017, stuffthingmaps_detectron2/{train2017,val2017}
      ade/ADEChallengeData2016/images/{training,validation}, annotations_detectron2/{training,validation}
      ade/ADE20K_2021_17_01/images_detectron2/{training,validation}, annotations_detectron2/{training,validation} (.tif)
      VOCdevkit/VOC2012/JPEGImages, annotations_ovs/val
      VOCdevkit/VOC2010/JPEGImages (or val/image), annotations_detectron2_ovs/pc59_val, pc459_val (.tif)

(https://github.com/jiaosiyu1999/MAFT, datasets/README.md). Label value i is class i; the ignore index (65535 for the
16-bit TIFF label maps of ADE20K-847 and Pascal Context-459, 255 elsewhere, including VOC's background) is left out of
training and evaluation."""

import json
import os
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import datasets

from ..data.segmentation_data import load_image_folder_pairs


BENCHMARKS = ("coco_stuff_171", "ade20k_150", "ade20k_847", "pascal_context_59", "pascal_context_459", "pascal_voc_20")
CLASSES_RESOURCE = "data/benchmark_classes.json"
ORIGINAL_REPOSITORY = "https://github.com/jiaosiyu1999/MAFT"


@dataclass(frozen=True)
class FolderLayout:
    """Where one split of a benchmark lives under the data root: folders relative to the root, the first the documented
    one and the others places the original code also uses, and the original script that writes the label maps."""

    image_dirs: tuple[str, ...]
    label_dirs: tuple[str, ...]
    prepare_script: str


def _ade_layouts(dataset_folder: str, image_folder: str, prepare_script: str,
                 extra_image_roots: tuple[str, ...] = ()) -> dict[str, FolderLayout]:
    # The prepare scripts write under root/ade/; the original registers the datasets directly under the root.
    return {
        split: FolderLayout(
            image_dirs=tuple(f"{base}/{dataset_folder}/{image_folder}/{folder}" for base in ("ade", *extra_image_roots))
            + (f"{dataset_folder}/{image_folder}/{folder}",),
            label_dirs=(f"ade/{dataset_folder}/annotations_detectron2/{folder}",
                        f"{dataset_folder}/annotations_detectron2/{folder}"),
            prepare_script=prepare_script,
        )
        for split, folder in (("train", "training"), ("val", "validation"))
    }


# Pascal Context: the original registers VOC2010/val/image; its datasets/README.md lays the images out in JPEGImages.
_PASCAL_CONTEXT_IMAGES = ("VOCdevkit/VOC2010/val/image", "VOCdevkit/VOC2010/JPEGImages")

LAYOUTS: dict[str, dict[str, FolderLayout]] = {
    "coco_stuff_171": {
        split: FolderLayout((f"coco/{folder}",), (f"coco/stuffthingmaps_detectron2/{folder}",),
                            "datasets/prepare_coco_stuff_sem_seg.py")
        for split, folder in (("train", "train2017"), ("val", "val2017"))
    },
    "ade20k_150": _ade_layouts("ADEChallengeData2016", "images", "datasets/prepare_ade20k_sem_seg.py"),
    # The original prepare script writes the resized ADE20K-847 images under root/ade20k/ (a typo it keeps).
    "ade20k_847": _ade_layouts("ADE20K_2021_17_01", "images_detectron2", "datasets/prepare_ade20k_full_sem_seg.py",
                               extra_image_roots=("ade20k",)),
    "pascal_context_59": {
        "val": FolderLayout(_PASCAL_CONTEXT_IMAGES, ("VOCdevkit/VOC2010/annotations_detectron2_ovs/pc59_val",),
                            "datasets/prepare_pascal_ctx_sem_seg.py"),
    },
    "pascal_context_459": {
        "val": FolderLayout(_PASCAL_CONTEXT_IMAGES, ("VOCdevkit/VOC2010/annotations_detectron2_ovs/pc459_val",),
                            "datasets/prepare_pascal_ctx_full_sem_seg.py"),
    },
    "pascal_voc_20": {
        "val": FolderLayout(("VOCdevkit/VOC2012/JPEGImages",), ("VOCdevkit/VOC2012/annotations_ovs/val",),
                            "datasets/prepare_voc_sem_seg.py"),
    },
}


@cache
def _benchmark_classes() -> dict:
    with resources.files("maft").joinpath(CLASSES_RESOURCE).open("r", encoding="utf-8") as file:
        return json.load(file)


def _entry(name: str) -> dict:
    if name not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}: choose one of {', '.join(BENCHMARKS)}.")
    return _benchmark_classes()[name]


def benchmark_class_names(name: str) -> list[str]:
    """The benchmark's class names in label order (label value i is class i), as the original registers them."""
    return list(_entry(name)["class_names"])


def benchmark_ignore_index(name: str) -> int:
    """The label value the benchmark leaves out of training and evaluation: 65535 for ADE20K-847 and Pascal
    Context-459 (16-bit label maps), 255 for the others (for Pascal VOC-20 that is the background)."""
    return int(_entry(name)["ignore_index"])


def coco_stuff_unseen_class_names() -> list[str]:
    """The 15 COCO-Stuff classes held out in the zero-shot setting (trained on the other 156, tested on all 171)."""
    return list(_entry("coco_stuff_171")["unseen"])


def _find_folder(root: Path, candidates: tuple[str, ...], what: str, name: str, split: str, prepare_script: str) -> Path:
    for candidate in candidates:
        if (root / candidate).is_dir():
            return root / candidate
    others = f" (also accepted: {', '.join(str(root / c) for c in candidates[1:])})" if len(candidates) > 1 else ""
    raise ValueError(
        f"No {what} for {name} split {split!r}: expected the folder {root / candidates[0]}{others}. "
        f"Prepare it as the original MAFT does ({ORIGINAL_REPOSITORY}, datasets/README.md): download the dataset, then "
        f"run its {prepare_script}."
    )


def load_benchmark(name: str, root: str | os.PathLike, split: str = "val") -> datasets.Dataset:
    """One split of a benchmark, read from the original MAFT folder layout under `root` (the folder holding `coco/`,
    `ade/` and `VOCdevkit/`), with its class names and ignore index recorded as segmentation metadata. Images without a
    label map are left out, as the original does (VOC's JPEGImages holds every split; the COCO prepare script skips
    label maps that are all ignore)."""
    class_names, ignore_index = benchmark_class_names(name), benchmark_ignore_index(name)
    layouts = LAYOUTS[name]
    if split not in layouts:
        raise ValueError(f"Unknown split {split!r} for {name}: choose one of {', '.join(layouts)}.")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"The data root {root} is not a directory: give the folder holding coco/, ade/ and VOCdevkit/.")
    layout = layouts[split]
    image_dir = _find_folder(root, layout.image_dirs, "images", name, split, layout.prepare_script)
    label_dir = _find_folder(root, layout.label_dirs, "label maps", name, split, layout.prepare_script)
    return load_image_folder_pairs(image_dir, label_dir, class_names, ignore_index, skip_unlabelled_images=True)


__all__ = [
    "BENCHMARKS",
    "LAYOUTS",
    "FolderLayout",
    "benchmark_class_names",
    "benchmark_ignore_index",
    "coco_stuff_unseen_class_names",
    "load_benchmark",
]
