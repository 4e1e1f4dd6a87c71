"""Writing results to files safely: output folders checked before any work, sets of files written all-or-nothing
(temporary names, then `os.replace`), and the files `maft segment` writes per image, named so that no two inputs
share them."""

import json
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
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
        overlay: render_overlay(Image.fromarray(image), label_map, list(class_names)).save,
        labels: label_map_image(label_map).save,
        summary_path: lambda path: path.write_text(json.dumps(summary, indent=2)),
    }
    write_files_atomically(writers)
    return list(writers)
