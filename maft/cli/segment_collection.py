"""`maft segment` over a collection of images (`maft.cli.image_collections`): batched, with images decoded and
preprocessed in DataLoader workers while the model runs, sharded over the processes of `accelerate launch`, and
resumable.

- Sharding: the image at position p is segmented by process p % N (of N); within a process, by DataLoader worker
  (p // N) % W (of W). Every image is segmented once, whatever N and W, and the per-image files do not depend on them.
- Resuming: an image whose files all exist is skipped (unless `overwrite`); files are written atomically, so a job
  killed at any point is finished by running it again. `maft-manifest.json` records the model, the vocabulary and
  the options the outputs depend on; a run with different ones into the same folder is refused, naming them.
- Outputs: the files per image of the chosen `OutputWriter`; with the dataset format also a `datasets` dataset of
  what those files hold, a row per image with the task's columns (`dataset_features`, `write_collection_dataset`),
  optionally pushed to the Hub.
- Progress: each process records its counts in `.maft-progress/`; the main process shows them summed in one bar,
  and at the end a summary of all processes (`CollectionSummary`).
"""

import json
import multiprocessing
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils.output_files import (
    instance_file_paths,
    panoptic_file_paths,
    segmentation_file_paths,
    write_files_atomically,
    write_instance_files,
    write_json,
    write_panoptic_files,
    write_segmentation_files,
)
from . import failure_message, one_line
from .image_collections import CollectionImage, ImageCollection, read_image


MANIFEST = "maft-manifest.json"
FAILURES = "maft-failures.json"
PROGRESS_FOLDER = ".maft-progress"
PARTS_FOLDER = ".maft-dataset-parts"
DATASET_FOLDER = "dataset"  # save_to_disk, for datasets.load_from_disk
PARQUET_FOLDER = "dataset-parquet"  # data/train-*.parquet and README.md, the layout of a Hub dataset
# the manifest's entries that the outputs depend on: a rerun into the same folder must have the same
MANIFEST_CHECKED = ("model", "labels", "dtype", "task", "stuff", "thresholds", "proposals")
SKIPPED_PER_BATCH = 256  # a worker reports already complete images in groups of at most this many
PROGRESS_INTERVAL = 1.0  # seconds between progress records and bar refreshes
MAX_PARQUET_SHARD_BYTES = 500 * 2**20
# the keys of the per-image JSON's segments (panoptic) and instances that the dataset output keeps
PANOPTIC_SEGMENT_KEYS = ("id", "category_id", "iscrowd", "area", "bbox", "score")
INSTANCE_KEYS = ("id", "category_id", "score", "area", "bbox")


@dataclass(frozen=True)
class OutputWriter:
    """How one image's outputs are written: `paths(folder, name)` the files it makes (all present: the image is
    done) and `write(folder, name, image, segmentation, class_names, source=...)` writes them all-or-nothing."""

    task: str
    paths: Callable[[Path, str], list[Path]]
    write: Callable[..., list[Path]]


def write_object_files(write_files: Callable[..., list[Path]], stuff_label_ids: Sequence[int], folder: Path, name: str,
                       image: np.ndarray, segmentation: tuple[np.ndarray, list[dict]], class_names: Sequence[str],
                       source: str) -> list[Path]:
    """`write_files` (`write_panoptic_files` or `write_instance_files`) of one image's (segment ids, segments_info)."""
    segment_ids, segments_info = segmentation
    return write_files(folder, name, image, segment_ids, segments_info, class_names, stuff_label_ids, source=source)


def output_writer(task: str = "semantic", stuff_label_ids: Sequence[int] = ()) -> OutputWriter:
    """The writer of a task's files per image (`maft segment --help` lists them); picklable, for writing processes."""
    if task == "semantic":
        return OutputWriter(task, segmentation_file_paths, write_segmentation_files)
    write_files, paths = {"panoptic": (write_panoptic_files, panoptic_file_paths),
                          "instance": (write_instance_files, instance_file_paths)}[task]
    return OutputWriter(task, paths, partial(write_object_files, write_files, sorted(stuff_label_ids)))


@dataclass(frozen=True)
class SegmentationTask:
    """What each image is segmented into: `task` ("semantic", "instance" or "panoptic"), with the classes that are
    `stuff_label_ids` and the post-processing `thresholds` (`threshold`, `mask_threshold`,
    `overlap_mask_area_threshold`) for instance and panoptic; `sam`, a `SamMaskGenerator` whose masks replace MAFT's
    proposals (each named by IP-CLIP, image by image), or None."""

    task: str = "semantic"
    stuff_label_ids: tuple[int, ...] = ()
    thresholds: dict = field(default_factory=dict)
    sam: Any = None

    def writer(self) -> OutputWriter:
        return output_writer(self.task, self.stuff_label_ids)

    def segment(self, model, processor, inputs, images: Sequence[np.ndarray], text_embeds: torch.Tensor) -> list:
        """Each image's segmentation at its size: the label map (semantic), or (segment ids, segments_info)."""
        from ..inference import post_process_objects, segment_with_masks

        objects = {} if self.task == "semantic" else {"stuff_label_ids": self.stuff_label_ids, **self.thresholds}
        if self.sam is not None:
            return [segment_with_masks(model, processor, image, self.sam(image), text_embeds, self.task, **objects)
                    for image in images]
        with torch.inference_mode():
            outputs = model(**inputs.to(model.device), text_embeds=text_embeds)
        sizes = [tuple(image.shape[:2]) for image in images]
        if self.task == "semantic":
            return [label_map.cpu().numpy() for label_map in processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)]
        results = post_process_objects(processor, outputs, self.task, sizes, **objects)
        return [(result["segmentation"].cpu().numpy(), result["segments_info"]) for result in results]


@dataclass
class SegmentationBatch:
    """What a DataLoader worker hands over: `images` decoded and preprocessed into `inputs` (None without images),
    the `failed` images with their reason, and the `skipped` ones whose outputs were already complete."""

    images: list[CollectionImage] = field(default_factory=list)
    pixels: list[np.ndarray] = field(default_factory=list)
    inputs: Any = None
    failed: list[tuple[CollectionImage, str]] = field(default_factory=list)
    skipped: list[CollectionImage] = field(default_factory=list)


class SegmentationBatches(torch.utils.data.IterableDataset):
    """This process's share of `collection` in batches of at most `batch_size` images, read and preprocessed where
    it is iterated (in DataLoader workers, each taking its own share). Images whose outputs are complete are reported
    as skipped, unless `overwrite`."""

    def __init__(self, collection: ImageCollection, processor, batch_size: int, output: Path, writer: OutputWriter,
                 overwrite: bool, process_index: int = 0, num_processes: int = 1):
        self.collection, self.processor, self.batch_size = collection, processor, batch_size
        self.output, self.writer, self.overwrite = output, writer, overwrite
        self.process_index, self.num_processes = process_index, num_processes

    def is_complete(self, image: CollectionImage) -> bool:
        return not self.overwrite and all(path.is_file() for path in self.writer.paths(self.output, image.name))

    def __iter__(self) -> Iterator[SegmentationBatch]:
        worker = torch.utils.data.get_worker_info()
        worker_index, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)

        def take(position: int) -> bool:
            return position % self.num_processes == self.process_index and (position // self.num_processes) % num_workers == worker_index

        pending, skipped = [], []
        for image in self.collection.images(take):
            if self.is_complete(image):
                skipped.append(image)
            else:
                pending.append(image)
            if len(pending) == self.batch_size or len(skipped) == SKIPPED_PER_BATCH:
                yield self.prepare(pending, skipped)
                pending, skipped = [], []
        if pending or skipped:
            yield self.prepare(pending, skipped)

    def prepare(self, images: list[CollectionImage], skipped: list[CollectionImage]) -> SegmentationBatch:
        batch = SegmentationBatch(skipped=skipped)
        for image in images:
            try:
                batch.pixels.append(read_image(image.payload))
                batch.images.append(image)
            except Exception as error:
                batch.failed.append((image, one_line(error)))
        if batch.images:
            batch.inputs = self.processor(images=batch.pixels, input_data_format="channels_last", return_tensors="pt")
        return batch


@dataclass
class CollectionSummary:
    """What one process (or, summed, all of them) did: images segmented, skipped as complete, failed (position,
    source and reason), seconds spent."""

    done: int = 0
    skipped: int = 0
    failed: list[tuple[int, str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def total(cls, summaries: Sequence["CollectionSummary"]) -> "CollectionSummary":
        return cls(sum(summary.done for summary in summaries), sum(summary.skipped for summary in summaries),
                   sorted(failure for summary in summaries for failure in summary.failed),
                   max((summary.seconds for summary in summaries), default=0.0))

    def counts(self) -> dict:
        return {"done": self.done, "skipped": self.skipped, "failed": len(self.failed)}

    def report(self, output: Path, shown_failures: int = 10) -> str:
        """The lines that close a run: counts, throughput, and the first failures with their reasons."""
        total = self.done + self.skipped + len(self.failed)
        rate = self.done / self.seconds if self.seconds > 0 else 0.0
        lines = [f"segmented {self.done} of {total} images into {output} ({self.skipped} already complete, "
                 f"{len(self.failed)} failed) in {self.seconds:.1f} s: {rate:.2f} images/s"]
        for _, source, reason in self.failed[:shown_failures]:
            lines.append(f"  failed: {source}: {reason}")
        if len(self.failed) > shown_failures:
            lines.append(f"  ... and {len(self.failed) - shown_failures} more, all listed in {output / FAILURES}")
        return "\n".join(lines)


class SharedProgress:
    """Progress over all processes: each records its counts in a file of `folder` at most every
    `PROGRESS_INTERVAL` seconds; on the main process a thread sums them into one bar (images segmented or failed,
    with images/s and the ETA; images skipped as complete come off the total)."""

    def __init__(self, folder: Path, process_index: int, num_processes: int, total: int | None, show: bool):
        self.folder, self.process_index, self.num_processes = folder, process_index, num_processes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.last_record = 0.0
        self.total = total
        self.record(CollectionSummary(), force=True)
        self.stopped = threading.Event()
        self.thread = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="segmenting", unit="image", dynamic_ncols=True)
            self.thread = threading.Thread(target=self.refresh_until_stopped, daemon=True)
            self.thread.start()

    def path(self, process_index: int) -> Path:
        return self.folder / f"process-{process_index}.json"

    def record(self, summary: CollectionSummary, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_record >= PROGRESS_INTERVAL:
            write_json(self.path(self.process_index), summary.counts())
            self.last_record = now

    def read_counts(self) -> dict[str, int]:
        counts = {"done": 0, "skipped": 0, "failed": 0}
        for index in range(self.num_processes):
            try:
                recorded = json.loads(self.path(index).read_text())
            except (OSError, ValueError):  # not written yet (another node, or not started)
                continue
            for key in counts:
                counts[key] += recorded.get(key, 0)
        return counts

    def refresh(self, counts: dict[str, int]) -> None:
        if self.total is not None:
            self.bar.total = self.total - counts["skipped"]
        self.bar.n = counts["done"] + counts["failed"]
        self.bar.set_postfix(complete=counts["skipped"], failed=counts["failed"], refresh=False)
        self.bar.refresh()

    def refresh_until_stopped(self) -> None:
        while not self.stopped.wait(PROGRESS_INTERVAL):
            self.refresh(self.read_counts())

    def close(self, final: CollectionSummary | None = None) -> None:
        """Stops the bar, showing `final` (all processes' summed summary) last."""
        if self.thread is not None:
            self.stopped.set()
            self.thread.join()
            if final is not None:
                self.refresh(final.counts())
            self.bar.close()


def collection_manifest(model: str, labels: Sequence[str], dtype: str, task: SegmentationTask, source: str,
                        output_format: str, proposals: str = "maft") -> dict:
    """What `maft-manifest.json` records of a run; `MANIFEST_CHECKED` are the entries a rerun must share."""
    from importlib.metadata import version

    return {"model": model, "labels": list(labels), "dtype": dtype, "task": task.task,
            "stuff": [labels[index] for index in task.stuff_label_ids], "thresholds": dict(task.thresholds),
            "proposals": proposals, "source": source, "output_format": output_format, "maft_version": version("maft")}


def check_manifest(output: Path, manifest: dict, overwrite: bool) -> None:
    """Refuses to add to outputs that another model, vocabulary or option made (named in the error), unless
    `overwrite` (then every image is segmented again)."""
    path = output / MANIFEST
    if overwrite or not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is corrupt ({error}): remove it, or add --overwrite to segment every image again") from error
    differences = [f"{key} {recorded.get(key)!r} there, {manifest[key]!r} now" for key in MANIFEST_CHECKED
                   if recorded.get(key) != manifest[key]]
    if differences:
        raise ValueError(f"{output} holds the outputs of a different run ({'; '.join(differences)}): choose another "
                         "--output, or add --overwrite to segment every image again")


def image_file(path: Path) -> dict:
    """A file as a `datasets.Image` cell that holds its bytes (so the dataset does not depend on the file)."""
    return {"bytes": path.read_bytes(), "path": None}


def class_indexed(entry: dict, keys: Sequence[str]) -> dict:
    """`keys` of a per-image JSON's segment or instance, its COCO `category_id` (from 1) made a class index (from 0)."""
    return {key: entry[key] - 1 if key == "category_id" else entry[key] for key in keys}


def semantic_columns(paths: list[Path], class_names: Sequence[str]) -> dict:
    """label_map (the PNG of class indices) and class_fractions (every class, absent ones 0)."""
    _, labels_path, summary_path = paths
    fractions = json.loads(summary_path.read_text(encoding="utf-8"))["fractions"]
    return {"label_map": image_file(labels_path),
            "class_fractions": {name: float(fractions.get(name, 0.0)) for name in class_names}}


def panoptic_columns(paths: list[Path], class_names: Sequence[str]) -> dict:
    """panoptic (the COCO panoptic PNG) and segments_info (the annotation's segments)."""
    _, panoptic_path, annotation_path = paths
    segments = json.loads(annotation_path.read_text(encoding="utf-8"))["segments_info"]
    return {"panoptic": image_file(panoptic_path),
            "segments_info": [class_indexed(segment, PANOPTIC_SEGMENT_KEYS) for segment in segments]}


def instance_columns(paths: list[Path], class_names: Sequence[str]) -> dict:
    """instances (the summary's instances) and instance_masks (their mask PNGs, in the same order)."""
    _, summary_path = paths
    instances = json.loads(summary_path.read_text(encoding="utf-8"))["instances"]
    return {"instances": [class_indexed(instance, INSTANCE_KEYS) for instance in instances],
            "instance_masks": [image_file(summary_path.parent / instance["mask"]) for instance in instances]}


TASK_COLUMNS = {"semantic": semantic_columns, "panoptic": panoptic_columns, "instance": instance_columns}


def dataset_row(output: Path, writer: OutputWriter, image: CollectionImage, class_names: Sequence[str]) -> dict:
    """One image's row of the dataset output, read from the files `writer` wrote: id, position, image (its source),
    and the task's columns (`dataset_features`), category ids made class indices from 0."""
    columns = TASK_COLUMNS[writer.task](writer.paths(output, image.name), class_names)
    return {"id": image.name, "position": image.position, "image": image.source, **columns}


def dataset_features(task: str, class_names: Sequence[str]):
    """The dataset output's columns: id, position, image (the source) and, by task, semantic: label_map (Image of
    class indices), class_fractions; panoptic: panoptic (COCO panoptic PNG), segments_info (the loader's
    `PANOPTIC_SEGMENTS_FEATURE` plus bbox and score); instance: instances, instance_masks (an Image per instance)."""
    import datasets

    from ..data.segmentation_data import PANOPTIC_SEGMENTS_FEATURE

    bbox_and_score = {"bbox": datasets.List(datasets.Value("int64")), "score": datasets.Value("float64")}
    columns = {
        "semantic": {"label_map": datasets.Image(),
                     "class_fractions": {name: datasets.Value("float32") for name in class_names}},
        "panoptic": {"panoptic": datasets.Image(),
                     "segments_info": datasets.List({**PANOPTIC_SEGMENTS_FEATURE.feature, **bbox_and_score})},
        "instance": {"instances": datasets.List({"id": datasets.Value("int64"), "category_id": datasets.Value("int64"),
                                                 "area": datasets.Value("int64"), **bbox_and_score}),
                     "instance_masks": datasets.List(datasets.Image())},
    }[task]
    return datasets.Features({"id": datasets.Value("string"), "position": datasets.Value("int64"),
                              "image": datasets.Value("string"), **columns})


def write_dataset_part(output: Path, rows: list[dict], task: str, class_names: Sequence[str], process_index: int) -> None:
    """This process's rows of the dataset output, as a Parquet file that the main process gathers."""
    import datasets

    folder = output / PARTS_FOLDER
    folder.mkdir(exist_ok=True)
    part = datasets.Dataset.from_list(rows, features=dataset_features(task, class_names))
    write_files_atomically({folder / f"process-{process_index}.parquet": lambda path: part.to_parquet(str(path))})


TASK_COLUMNS_DESCRIPTION = {
    "semantic": "`label_map` (PNG of class indices, 16-bit beyond 256 classes), `class_fractions` (each class's share "
                "of the image).",
    "panoptic": "`panoptic` (COCO panoptic PNG: segment id = R + 256 G + 256^2 B, 0 where no segment is), "
                "`segments_info` (per segment `id`, `category_id`, `iscrowd`, `area`, `bbox` [x, y, width, height], "
                "`score`).",
    "instance": "`instances` (per instance `id` (from 1, best first), `category_id`, `score`, `area`, `bbox` "
                "[x, y, width, height]), `instance_masks` (one PNG per instance, in the order of `instances`: 255 on "
                "the instance, 0 elsewhere; instances do not overlap).",
}


def dataset_card(class_names: Sequence[str], manifest: dict, num_rows: int) -> str:
    """README.md of the Hub dataset: its data files, what the columns of the manifest's task hold and, for instance
    and panoptic, the categories (class indices, and which are stuff)."""
    task, stuff = manifest["task"], set(manifest["stuff"])
    if task == "semantic":
        classes = (f"the classes {', '.join(f'`{name}`' for name in class_names)} (label index = position in this "
                   "list)")
    else:
        categories = "\n".join(f"| {index} | `{name}` | {'stuff' if name in stuff else 'thing'} |"
                                for index, name in enumerate(class_names))
        classes = f"""these categories:

| category_id | name | kind |
|---|---|---|
{categories}

`category_id` is the class index from 0 (the convention of `maft.data.segmentation_data.load_coco_panoptic`), one less
than the COCO category id of the per-image JSON files. The Parquet files do not record the categories:
`maft.data.segmentation_data.with_segmentation_metadata(dataset, names, thing_class_names=...)` records them on the
loaded dataset (the `save_to_disk` copy that `maft segment` writes beside them has them)"""
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
---
# Segmentations by maft

{num_rows} images segmented by `maft segment --task {task}` with the model `{manifest['model']}` ({manifest['dtype']})
into {classes}.

Columns: `id` (the image's output name), `position` (its place in the collection), `image` (its source),
{TASK_COLUMNS_DESCRIPTION[task]}
"""


def write_collection_dataset(output: Path, num_processes: int, class_names: Sequence[str], manifest: dict):
    """Gathers every process's part into the dataset output, in position order: `dataset/` (for
    `datasets.load_from_disk`) and `dataset-parquet/` (Parquet shards and a README, as a Hub dataset is laid out);
    each folder replaces the previous one only once complete. Returns the dataset."""
    import shutil

    import datasets

    from ..data.segmentation_data import with_segmentation_metadata

    parts = [str(output / PARTS_FOLDER / f"process-{index}.parquet") for index in range(num_processes)]
    task = manifest["task"]
    dataset = datasets.Dataset.from_parquet(parts, features=dataset_features(task, class_names), keep_in_memory=True)
    dataset = dataset.sort("position")
    if task != "semantic":
        thing_class_names = [name for name in class_names if name not in manifest["stuff"]]
        dataset = with_segmentation_metadata(dataset, class_names, thing_class_names=thing_class_names)
    for folder in (DATASET_FOLDER, PARQUET_FOLDER):
        shutil.rmtree(output / f".{folder}.partial", ignore_errors=True)
    dataset.save_to_disk(str(output / f".{DATASET_FOLDER}.partial"))
    parquet = output / f".{PARQUET_FOLDER}.partial"
    num_shards = max(1, -(-dataset.data.nbytes // MAX_PARQUET_SHARD_BYTES))
    for index in range(num_shards):
        shard = dataset.shard(num_shards, index, contiguous=True)
        shard.to_parquet(str(parquet / "data" / f"train-{index:05d}-of-{num_shards:05d}.parquet"))
    (parquet / "README.md").write_text(dataset_card(class_names, manifest, len(dataset)), encoding="utf-8")
    for folder in (DATASET_FOLDER, PARQUET_FOLDER):
        shutil.rmtree(output / folder, ignore_errors=True)
        (output / f".{folder}.partial").rename(output / folder)
    shutil.rmtree(output / PARTS_FOLDER, ignore_errors=True)
    return dataset


def push_collection_dataset(output: Path, repo_id: str, private: bool = False) -> str:
    """Uploads `dataset-parquet/` to the Hub dataset `repo_id` (created if needed); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(output / PARQUET_FOLDER),
                               commit_message="Segmentations by maft segment")
    return commit.commit_url


def segment_collection(model, processor, collection: ImageCollection, class_names: Sequence[str], output: Path, *,
                       task: SegmentationTask = SegmentationTask(), writer: OutputWriter | None = None,
                       batch_size: int = 1, num_workers: int = 0,
                       overwrite: bool = False, dataset_rows: list | None = None, state=None,
                       progress: "SharedProgress | None" = None, debug: bool = False) -> CollectionSummary:
    """Segments this process's share of `collection` into `class_names` and writes each image's outputs with
    `writer` (default: `task`'s) into `output`; returns what this process did. Each image is segmented as `task`
    says; the vocabulary is encoded once. `batch_size` images go through the model at a time (the segmentations equal
    those of one at a time); `num_workers` DataLoader processes
    read and preprocess images meanwhile, and as many processes write the outputs. An image that fails is reported (one line on stderr) and counted. With
    `dataset_rows` (a list), every image of the share that ends complete adds its `dataset_row` to it. `state`: the
    processes sharing the work (default: those `accelerate launch` started); `progress` records this process's
    counts (default: a `SharedProgress` in `output`, which this call closes)."""
    from ..evaluation.dataset_evaluation import distributed_state
    from ..inference import encode_vocabulary

    state = state or distributed_state()
    writer = writer or task.writer()
    text_embeds = encode_vocabulary(model, processor, class_names)
    batches = SegmentationBatches(collection, processor, batch_size, output, writer, overwrite, state.process_index, state.num_processes)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=num_workers)
    owns_progress = progress is None
    if owns_progress:
        progress = SharedProgress(output / PROGRESS_FOLDER, state.process_index, state.num_processes, collection.size,
                                  show=state.is_main_process)
    summary = CollectionSummary()
    started = time.perf_counter()

    def fail(image: CollectionImage, reason: str) -> None:
        summary.failed.append((image.position, image.source, reason))
        print(f"maft segment: skipped {image.source}: {reason}", file=sys.stderr, flush=True)

    def add_row(image: CollectionImage) -> None:
        if dataset_rows is not None:
            dataset_rows.append(dataset_row(output, writer, image, class_names))

    # Writing (rendering and compressing PNGs) costs more than segmenting small models: with workers, processes of
    # their own write while the model runs. Writes are finished in order, at most `max_writing` left pending.
    pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("fork")) if num_workers else None
    writing: deque[tuple[CollectionImage, Future]] = deque()
    max_writing = 2 * max(num_workers, batch_size)

    def finish_writes(wait_for: int) -> None:
        """Finishes the writes that are done, and the oldest `wait_for` even if they are not."""
        while writing and (wait_for > 0 or writing[0][1].done()):
            image, future = writing.popleft()
            wait_for -= 1
            try:
                future.result()
                add_row(image)
                summary.done += 1
            except Exception as error:
                if debug:
                    traceback.print_exception(error)
                fail(image, failure_message(error))

    try:
        for batch in loader:
            summary.skipped += len(batch.skipped)
            for image in batch.skipped:
                add_row(image)
            for image, reason in batch.failed:
                fail(image, reason)
            if batch.images:
                try:
                    segmentations = task.segment(model, processor, batch.inputs, batch.pixels, text_embeds)
                except Exception as error:
                    if debug:
                        traceback.print_exc()
                    for image in batch.images:
                        fail(image, failure_message(error))
                    segmentations = []
                for image, pixels, segmentation in zip(batch.images, batch.pixels, segmentations):
                    arguments = (output, image.name, pixels, segmentation, list(class_names))
                    if pool is None:
                        writing.append((image, Future()))
                        try:
                            writing[-1][1].set_result(writer.write(*arguments, source=image.source))
                        except Exception as error:
                            writing[-1][1].set_exception(error)
                    else:
                        writing.append((image, pool.submit(writer.write, *arguments, source=image.source)))
            finish_writes(wait_for=len(writing) - max_writing)
            summary.seconds = time.perf_counter() - started
            progress.record(summary)
        finish_writes(wait_for=len(writing))
        progress.record(summary, force=True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if owns_progress:
            progress.close(summary)
    summary.seconds = time.perf_counter() - started
    return summary


def segmentation_task(arguments) -> SegmentationTask:
    """--task with its --stuff classes and thresholds (SAM, for --proposals sam, is loaded with the model)."""
    from . import check_stuff

    stuff_label_ids = tuple(sorted(check_stuff(arguments.task, arguments.stuff, arguments.labels)))
    if arguments.task == "semantic":
        return SegmentationTask()
    thresholds = {"threshold": arguments.threshold, "mask_threshold": arguments.mask_threshold,
                  "overlap_mask_area_threshold": arguments.overlap_mask_area_threshold}
    return SegmentationTask(arguments.task, stuff_label_ids, thresholds)


def segment_command(arguments) -> int:
    """`maft segment`: the collection the arguments name, segmented by every process of `accelerate launch` (one
    without it), then the summary, the dataset output and its upload on the main process. Exit code 1 when an image
    failed or the upload did."""
    from ..utils.output_files import check_output_folder, prepare_output_folder

    if arguments.push_to_hub and arguments.output_format != "dataset":
        raise ValueError("--push-to-hub publishes the dataset output: add --output-format dataset")
    task = segmentation_task(arguments)
    check_output_folder(arguments.output)  # before the slow imports below: a wrong option fails at once
    from accelerate.utils import gather_object

    from ..evaluation.dataset_evaluation import distributed_state
    from .image_collections import open_collection
    from .model_loading import load_model_and_processor, resolve_device, resolve_model_dtype

    collection = open_collection(arguments.images, arguments.dataset, arguments.split, arguments.streaming,
                                 arguments.image_column, arguments.id_column)
    output = prepare_output_folder(arguments.output)  # only now: inputs that name no images leave no folder behind
    state = distributed_state()
    device = resolve_device(arguments.device or (state.device if state.num_processes > 1 else None))
    dtype, dtype_choice = resolve_model_dtype(arguments.model, arguments.dtype, device)
    manifest = collection_manifest(arguments.model or "bundled maft-mini", arguments.labels, dtype, task,
                                   collection.description, arguments.output_format, arguments.proposals)
    check_manifest(output, manifest, arguments.overwrite)
    if dtype_choice and state.is_main_process:
        print(dtype_choice)
    model, processor = load_model_and_processor(arguments.model, device, dtype)
    if arguments.proposals == "sam":
        from ..utils.sam_proposals import SamMaskGenerator

        task = replace(task, sam=SamMaskGenerator.from_pretrained(
            arguments.sam_model, model.device, points_per_side=arguments.sam_points_per_side,
            pred_iou_threshold=arguments.sam_pred_iou_threshold, stability_score_threshold=arguments.sam_stability_threshold,
        ))
    if state.is_main_process:  # before any process writes: what a killed run left half-written
        for leftover in output.glob(".*.partial-*"):
            leftover.unlink(missing_ok=True)
    state.wait_for_everyone()  # every process has checked the manifest before the main one writes it
    if state.is_main_process:
        write_json(output / MANIFEST, manifest)
    progress = SharedProgress(output / PROGRESS_FOLDER, state.process_index, state.num_processes, collection.size,
                              show=state.is_main_process)
    dataset_rows = [] if arguments.output_format == "dataset" else None
    try:
        summary = segment_collection(model, processor, collection, arguments.labels, output, task=task,
                                     batch_size=arguments.batch_size, num_workers=arguments.num_workers,
                                     overwrite=arguments.overwrite, dataset_rows=dataset_rows, state=state,
                                     progress=progress, debug=arguments.debug)
        if dataset_rows is not None:
            write_dataset_part(output, dataset_rows, task.task, arguments.labels, state.process_index)
        total = CollectionSummary.total(gather_object([summary]) if state.num_processes > 1 else [summary])
    except BaseException:
        progress.close()
        raise
    progress.close(total)
    if not state.is_main_process:
        return 0
    (output / FAILURES).unlink(missing_ok=True)
    if total.failed:
        write_json(output / FAILURES, {"failed": [{"image": source, "reason": reason} for _, source, reason in total.failed]})
    print(total.report(output))
    if dataset_rows is None:
        return 1 if total.failed else 0
    dataset = write_collection_dataset(output, state.num_processes, arguments.labels, manifest)
    print(f"dataset of {len(dataset)} images in {output / DATASET_FOLDER} (datasets.load_from_disk) and "
          f"{output / PARQUET_FOLDER} (Parquet)")
    if arguments.push_to_hub:
        try:
            print(f"pushed to {push_collection_dataset(output, arguments.push_to_hub, arguments.private)}")
        except Exception as error:
            print(f"maft segment: pushing to {arguments.push_to_hub} failed, the dataset is complete in {output}: "
                  f"{one_line(error)}", file=sys.stderr)
            return 1
    return 1 if total.failed else 0


__all__ = ["CollectionSummary", "OutputWriter", "SegmentationTask", "output_writer", "SegmentationBatches", "check_manifest",
           "collection_manifest", "push_collection_dataset", "segment_collection", "write_collection_dataset"]
