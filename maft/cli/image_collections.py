"""The images `maft segment` works through: image files (given one by one, found in folders or by glob patterns, or
listed in text files) or a `datasets` dataset (saved with `save_to_disk`, or on the Hub, optionally streamed). Each
image has a position (its place in the collection), an output name and a source (what the outputs record it came
from); images are read only when they are segmented, so a streamed dataset is read as it goes."""

import glob
import io
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.hub import hub_is_offline, is_hub_id
from ..utils.output_files import distinct_output_names


IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
PATH_LIST_SUFFIXES = (".txt", ".lst")
GLOB_CHARACTERS = "*?["
STREAM_READ_SIZE = 16  # rows a stream is read by


@dataclass(frozen=True)
class CollectionImage:
    """One image of a collection, not yet read: `payload` is what `read_image` decodes (a path, or a dataset's
    image cell)."""

    position: int
    name: str
    source: str
    payload: Any


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def read_path_list(path: Path) -> list[Path]:
    """The image paths a text file lists, one a line (relative ones from the current folder); blank lines and lines
    starting with # are ignored."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    paths = [Path(line) for line in lines if line and not line.startswith("#")]
    if not paths:
        raise ValueError(f"the path list {path} names no images")
    return paths


def find_image_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files that `inputs` name, in order: a folder gives the files in it and its subfolders whose suffix
    is one of `IMAGE_SUFFIXES` (sorted by path), a pattern with * ? or [ the image files it matches (sorted; ** goes
    into subfolders), a .txt or .lst file the paths it lists, anything else itself. A folder or pattern without
    images, or an empty path list, is an error; a missing image file is not (it fails when it is read)."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(candidate for candidate in path.rglob("*") if is_image_file(candidate))
            if not found:
                raise FileNotFoundError(f"the folder {path} holds no images (files ending in {', '.join(IMAGE_SUFFIXES)})")
        elif path.suffix.lower() in PATH_LIST_SUFFIXES and path.is_file():
            found = read_path_list(path)
        elif not path.exists() and any(character in str(item) for character in GLOB_CHARACTERS):
            found = sorted(Path(match) for match in glob.glob(str(item), recursive=True) if is_image_file(Path(match)))
            if not found:
                raise FileNotFoundError(f"the pattern {str(item)!r} matches no images (files ending in {', '.join(IMAGE_SUFFIXES)})")
        else:
            found = [path]
        files.extend(found)
    return files


def read_image(payload: Any) -> np.ndarray:
    """The (H, W, 3) uint8 pixels of an image given as a path, a PIL image or array, or a `datasets` image cell read
    without decoding ({"bytes": ..., "path": ...})."""
    from PIL import Image

    from ..processing_maft import to_rgb_array

    if isinstance(payload, dict):
        payload = Image.open(io.BytesIO(payload["bytes"])) if payload.get("bytes") else payload.get("path")
    return to_rgb_array(payload, input_data_format="channels_last")


class ImageCollection:
    """The images to segment, in order. `size` is their number (None for a stream, whose length is unknown), and
    `images(take)` yields those whose position `take` accepts, reading nothing else than what a stream must pass."""

    description: str
    size: int | None

    def images(self, take: Callable[[int], bool]) -> Iterator[CollectionImage]:
        raise NotImplementedError


class FileCollection(ImageCollection):
    """Image files, named as `distinct_output_names` names them (file name without suffix, -N where names repeat)."""

    def __init__(self, paths: Sequence[Path], description: str):
        self.paths = list(paths)
        self.names = distinct_output_names(self.paths)
        self.description = description
        self.size = len(self.paths)

    def images(self, take: Callable[[int], bool]) -> Iterator[CollectionImage]:
        for position, (path, name) in enumerate(zip(self.paths, self.names)):
            if take(position):
                yield CollectionImage(position, name, str(path), path)


def output_name(value: Any) -> str:
    """An output name from a value of the id column: its text, with path separators replaced by _."""
    name = str(value).replace("/", "_").replace(os.sep, "_")
    if not name.strip() or name.startswith("."):
        raise ValueError(f"the id {value!r} cannot name output files: ids must be non-empty and not start with '.'")
    return name


def position_name(position: int) -> str:
    return f"{position:06d}"


class DatasetCollection(ImageCollection):
    """The images of a `datasets.Dataset` (read by row, so each process reads only its own) or `IterableDataset`
    (read in order, each process skipping the others' images), named by `id_column` or else by their position
    (000000, 000001...). An image column of the `Image` feature is read undecoded and decoded where it is segmented."""

    def __init__(self, dataset, image_column: str, id_column: str | None, description: str):
        import datasets

        columns = dataset.column_names
        if columns is not None:
            missing = [column for column in (image_column, id_column) if column is not None and column not in columns]
            if missing:
                raise ValueError(f"{description} has no column {', '.join(map(repr, missing))}: its columns are {columns}")
        features = dataset.features
        if features is not None and isinstance(features.get(image_column), datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset.select_columns([column for column in (image_column, id_column) if column is not None])
        self.image_column, self.id_column, self.description = image_column, id_column, description
        self.streaming = isinstance(dataset, datasets.IterableDataset)
        self.size = None if self.streaming else len(dataset)
        if id_column is not None and not self.streaming:
            names = [output_name(value) for value in self.dataset[id_column]]
            duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
            if duplicates:
                raise ValueError(f"the id column {id_column!r} of {description} repeats {', '.join(duplicates[:5])}: ids must be distinct")

    def image(self, position: int, row: dict) -> CollectionImage:
        name = output_name(row[self.id_column]) if self.id_column else position_name(position)
        return CollectionImage(position, name, f"{self.description}[{position}]", row[self.image_column])

    def images(self, take: Callable[[int], bool]) -> Iterator[CollectionImage]:
        if self.streaming:
            # `iter` rather than `for row in dataset`: in a DataLoader worker, the latter reads only the worker's share
            # of the dataset's files, and positions would not be those of the whole stream
            rows = (dict(zip(batch, values)) for batch in self.dataset.iter(STREAM_READ_SIZE) for values in zip(*batch.values()))
            for position, row in enumerate(rows):
                if take(position):
                    yield self.image(position, row)
        else:
            for position in range(self.size):
                if take(position):
                    yield self.image(position, self.dataset[position])


def load_image_dataset(name_or_path: str, split: str | None, streaming: bool):
    """A dataset saved with `save_to_disk` (a folder; `streaming` reads it as an `IterableDataset`) or a Hub dataset
    (`streaming`: read as it goes, never downloaded whole); a dataset with several splits needs `split`."""
    import datasets

    path = Path(name_or_path)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        dataset = datasets.load_from_disk(str(path))
    elif path.exists() or not is_hub_id(name_or_path):
        raise FileNotFoundError(f"{name_or_path} is not a dataset saved with save_to_disk (nor a Hub dataset name)")
    else:
        try:
            dataset = datasets.load_dataset(name_or_path, split=split, streaming=streaming)
        except ConnectionError as error:
            reason = "the Hub is offline (HF_HUB_OFFLINE is set)" if hub_is_offline() else str(error).strip().splitlines()[0]
            raise ConnectionError(f"cannot load the dataset {name_or_path!r}: there is no such folder, and from the Hub: {reason}") from error
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split is None or split not in dataset:
            raise ValueError(f"{name_or_path} has the splits {', '.join(dataset)}: choose one with --split")
        dataset = dataset[split]
    if streaming and isinstance(dataset, datasets.Dataset):
        dataset = dataset.to_iterable_dataset()
    return dataset


def open_collection(images: Sequence[str] = (), dataset: str | None = None, split: str | None = None,
                    streaming: bool = False, image_column: str = "image", id_column: str | None = None) -> ImageCollection:
    """The collection the command line names: image files, folders, patterns and path lists (`images`), or a dataset."""
    if bool(images) == (dataset is not None):
        raise ValueError("give images (files, folders, glob patterns or path lists) or --dataset, not both or neither")
    if dataset is None:
        if streaming or id_column:
            raise ValueError("--streaming and --id-column are for --dataset")
        return FileCollection(find_image_files(images), description=" ".join(map(str, images)))
    return DatasetCollection(load_image_dataset(dataset, split, streaming), image_column, id_column, description=dataset)


__all__ = ["CollectionImage", "DatasetCollection", "FileCollection", "ImageCollection", "find_image_files", "open_collection", "read_image"]
