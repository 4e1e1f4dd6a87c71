"""Writing results to files safely: output folders checked before any work, sets of files written all-or-nothing
(temporary names, then `os.replace`), and the files `maft segment` writes per image, named so that no two inputs
share them."""

import json
import os
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def check_output_folder(folder: str | os.PathLike) -> None:
    """Raises an error naming the problem when `folder` cannot be (or become) a folder to write into: a file in its
    place or on its path, or no permission to write where it is or would be created. Creates nothing."""
    folder = Path(folder)
    existing = next(path for path in (folder, *folder.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{folder} cannot be an output folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into {existing}: permission denied")


def check_output_file(path: str | os.PathLike) -> None:
    """Raises an error naming the problem when the file `path` cannot be written: a folder in its place, or a folder
    it would go in that cannot be written (see `check_output_folder`). Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    check_output_folder(path.parent)


def prepare_output_folder(folder: str | os.PathLike) -> Path:
    """`folder`, created (with its parents) if needed and checked to accept new files; an error names the problem."""
    check_output_folder(folder)
    folder = Path(folder)
    probe = folder / f".maft-write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise OSError(f"cannot write into the output folder {folder}: {error.strerror or error}") from error
    return folder


def temporary_path(path: Path) -> Path:
    """A hidden name beside `path` with the same suffix (so writers that go by the suffix, as PIL does, still can)."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def write_files_atomically(writers: Mapping[Path, Callable[[Path], object]]) -> None:
    """Writes a set of files all-or-nothing: each writer writes its file under a temporary name, and only when all of
    them have succeeded are they renamed into place. A folder standing where a file should go is an error before
    anything is renamed; temporary files never outlive the call."""
    blocked = [str(path) for path in writers if path.is_dir()]
    if blocked:
        raise IsADirectoryError(f"cannot write {', '.join(blocked)}: a folder of that name is in the way")
    temporary = {path: temporary_path(path) for path in writers}
    try:
        for path, write in writers.items():
            write(temporary[path])
        for path in writers:
            os.replace(temporary[path], path)
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)


# zlib level of the PNGs written: 1 compresses a 640x480 overlay 4x as fast as PIL's default 6 (0.03 s instead of
# 0.12 s), into a file about 20% larger; at 6, compressing overlays took most of `maft segment`'s time per image
PNG_COMPRESS_LEVEL = 1


def png_writer(image: Image.Image) -> Callable[[Path], None]:
    """A writer of `image` as a PNG file, for `write_files_atomically`."""
    return lambda path: image.save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def write_json(path: Path, content: dict) -> None:
    """`content` as indented JSON in `path`, written atomically."""
    write_files_atomically({path: lambda temporary: temporary.write_text(json.dumps(content, indent=2))})


def distinct_output_names(image_paths: Sequence[str | os.PathLike]) -> list[str]:
    """The name each image's outputs are given: its file name without suffix, and when several images share that name
    (e.g. a/photo.png and b/photo.jpg), each of them followed by -N, N its position (from 1) among the images."""
    names = [Path(path).stem for path in image_paths]
    while True:  # until no two share a name, case aside (case-insensitive file systems)
        counts = Counter(name.casefold() for name in names)
        if max(counts.values(), default=0) <= 1:
            return names
        names = [f"{name}-{position}" if counts[name.casefold()] > 1 else name for position, name in enumerate(names, 1)]


def segmentation_file_paths(folder: Path, name: str) -> list[Path]:
    """The files `write_segmentation_files` writes for the image named `name`: overlay, label map, summary."""
    return [folder / f"{name}_overlay.png", folder / f"{name}_labels.png", folder / f"{name}.json"]


def write_segmentation_files(folder: Path, name: str, image: np.ndarray, label_map: np.ndarray,
                             class_names: Sequence[str], source: str) -> list[Path]:
    """Writes the set of files `maft segment` makes for one image, all-or-nothing, and returns their paths:
    `{name}_overlay.png` (the image tinted by class, with a legend), `{name}_labels.png` (class indices) and
    `{name}.json` (the source image, the class names and each class's fraction of the image)."""
    from .visualization import class_fractions, label_map_image, render_overlay

    summary = {"image": source, "labels": list(class_names), "fractions": class_fractions(label_map, list(class_names))}
    overlay, labels, summary_path = segmentation_file_paths(folder, name)
    writers = {
        overlay: png_writer(render_overlay(Image.fromarray(image), label_map, list(class_names))),
        labels: png_writer(label_map_image(label_map)),
        summary_path: lambda path: path.write_text(json.dumps(summary, indent=2)),
    }
    write_files_atomically(writers)
    return list(writers)


def coco_categories(class_names: Sequence[str], stuff_label_ids: Collection[int]) -> list[dict]:
    """COCO panoptic's `categories`: each class with id its position in `class_names` from 1 (COCO's ids start at 1),
    its name, and `isthing` 0 for the stuff classes."""
    return [{"id": index + 1, "name": name, "isthing": int(index not in stuff_label_ids)} for index, name in enumerate(class_names)]


def coco_segment(mask: np.ndarray, segment: dict, segment_id: int) -> dict:
    """COCO's entry for a segment (`segment`: `label_id` and `score` from post-processing) of pixels `mask` (H, W)."""
    from .visualization import segment_box_and_area

    box, area = segment_box_and_area(mask)
    return {"id": segment_id, "category_id": segment["label_id"] + 1, "iscrowd": 0, "area": area, "bbox": box,
            "score": round(float(segment["score"]), 6)}


def panoptic_file_paths(folder: Path, name: str) -> list[Path]:
    """The files `write_panoptic_files` writes for the image named `name`: overlay, COCO panoptic PNG, annotation."""
    return [folder / f"{name}_overlay.png", folder / f"{name}_panoptic.png", folder / f"{name}.json"]


def instance_file_paths(folder: Path, name: str) -> list[Path]:
    """The files `write_instance_files` writes for every image named `name`, whatever its instances: overlay and
    summary (the summary lists the instance masks, which are written with it, all-or-nothing)."""
    return [folder / f"{name}_overlay.png", folder / f"{name}.json"]


def write_panoptic_files(folder: Path, name: str, image: np.ndarray, segmentation: np.ndarray, segments_info: list[dict],
                         class_names: Sequence[str], stuff_label_ids: Collection[int], source: str) -> list[Path]:
    """Writes the files `maft segment --task panoptic` makes for one image, all-or-nothing, and returns their paths:
    `{name}_overlay.png` (segments tinted by class and outlined, with a legend), `{name}_panoptic.png` (COCO panoptic:
    segment id = R + 256 G + 256^2 B, 0 where no segment is) and `{name}.json` (COCO panoptic's annotation of the image,
    `file_name` and `segments_info`, with the `categories`; `image` is the source image)."""
    from .visualization import panoptic_image, render_segments_overlay

    overlay_path, panoptic_path, annotation_path = panoptic_file_paths(folder, name)
    annotation = {
        "image": source, "image_id": name, "file_name": panoptic_path.name,
        "segments_info": [coco_segment(segmentation == segment["id"], segment, segment["id"]) for segment in segments_info],
        "categories": coco_categories(class_names, stuff_label_ids),
    }
    overlay = render_segments_overlay(Image.fromarray(image), segmentation, segments_info, list(class_names), nothing=0)
    writers = {
        overlay_path: png_writer(overlay),
        panoptic_path: png_writer(panoptic_image(segmentation)),
        annotation_path: lambda path: path.write_text(json.dumps(annotation, indent=2)),
    }
    write_files_atomically(writers)
    return list(writers)


def write_instance_files(folder: Path, name: str, image: np.ndarray, segmentation: np.ndarray, segments_info: list[dict],
                         class_names: Sequence[str], stuff_label_ids: Collection[int], source: str) -> list[Path]:
    """Writes the files `maft segment --task instance` makes for one image, all-or-nothing, and returns their paths:
    `{name}_overlay.png` (instances tinted by class and outlined, with a legend), one mask per instance
    `{name}_instance-{k}.png` ("L": 255 on the instance, 0 elsewhere; k from 1, best first) and `{name}.json`
    (per instance COCO's `id` k, `category_id`, `iscrowd`, `area`, `bbox`, `score`, and its `mask` file; the
    `categories`; `image` is the source image). `segmentation` holds instance ids from 0, -1 where none is."""
    from .visualization import render_segments_overlay

    instances, writers = [], {}
    for number, segment in enumerate(segments_info, 1):
        mask = segmentation == segment["id"]
        mask_path = folder / f"{name}_instance-{number}.png"
        instances.append({**coco_segment(mask, segment, number), "mask": mask_path.name})
        writers[mask_path] = png_writer(Image.fromarray(mask.astype(np.uint8) * 255))
    summary = {"image": source, "instances": instances, "categories": coco_categories(class_names, stuff_label_ids)}
    overlay = render_segments_overlay(Image.fromarray(image), segmentation, segments_info, list(class_names), nothing=-1)
    overlay_path, summary_path = instance_file_paths(folder, name)
    writers = {
        overlay_path: png_writer(overlay),
        **writers,
        summary_path: lambda path: path.write_text(json.dumps(summary, indent=2)),
    }
    write_files_atomically(writers)
    return list(writers)
