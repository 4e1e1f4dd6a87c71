"""
The miniature world: procedurally drawn scenes of textured "stuff" regions and coloured "thing" shapes, each with
its semantic label map and a caption naming what it shows. Every class name is two words, and each unseen class
combines words that seen classes also use, so a model can only name unseen classes by composing what it learnt.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import datasets
import numpy as np
from tqdm.auto import tqdm

from ..data.segmentation_data import PANOPTIC_SEGMENTS_FEATURE, segment_ids_to_rgb, with_segmentation_metadata


THING_COLOURS = {"red": (215, 35, 35), "green": (40, 190, 45), "blue": (45, 65, 225), "yellow": (230, 205, 35)}
THING_SHAPES = ("circle", "square", "triangle")
STUFF_COLOURS = {"floor": (150, 100, 60), "wall": (145, 145, 150), "water": (40, 120, 165), "grass": (95, 140, 55)}
STUFF_TEXTURES = ("striped", "dotted", "checkered")

THING_CLASSES = [f"{colour} {shape}" for colour in THING_COLOURS for shape in THING_SHAPES]
STUFF_CLASSES = [f"{texture} {surface}" for texture in STUFF_TEXTURES for surface in STUFF_COLOURS]
CLASS_NAMES = THING_CLASSES + STUFF_CLASSES
# A quarter of the classes, one per colour / shape / texture / surface word at most twice, so every word of an unseen
# name also names seen classes.
UNSEEN_CLASS_NAMES = ["red square", "green triangle", "yellow circle", "striped water", "dotted floor", "checkered wall"]
SEEN_CLASS_NAMES = [name for name in CLASS_NAMES if name not in UNSEEN_CLASS_NAMES]
IGNORE_INDEX = 255
CAPTION_TEMPLATES = ("a photo of a {}.", "a picture of a {}.")

SPLIT_IDS = {"train": 0, "test": 1, "pretraining": 2, "examples": 3}


@dataclass(frozen=True)
class SceneSpec:
    """How many stuff regions and things a scene has (each drawn uniformly from the inclusive range)."""

    size: int = 96
    stuff_regions: tuple[int, int] = (1, 3)
    things: tuple[int, int] = (0, 3)
    thing_radius: tuple[int, int] = (11, 22)
    min_caption_fraction: float = 0.02


def _texture(texture: str, colour: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) float image of a surface colour in one of the stuff textures."""
    rows, columns = np.mgrid[0:size, 0:size].astype(np.float32)
    if texture == "striped":
        angle, period = rng.uniform(0, np.pi), rng.uniform(7, 12)
        pattern = np.sin(2 * np.pi * (columns * np.cos(angle) + rows * np.sin(angle)) / period) > 0
    elif texture == "dotted":
        spacing, radius = rng.uniform(7, 10), rng.uniform(1.8, 2.8)
        offset_rows, offset_columns = rng.uniform(0, spacing, 2)
        distance_rows = (rows + offset_rows) % spacing - spacing / 2
        distance_columns = (columns + offset_columns) % spacing - spacing / 2
        pattern = distance_rows**2 + distance_columns**2 < radius**2
    else:
        cell = rng.uniform(6, 10)
        offset_rows, offset_columns = rng.uniform(0, cell, 2)
        pattern = (np.floor((rows + offset_rows) / cell) + np.floor((columns + offset_columns) / cell)) % 2 == 1
    light, dark = np.clip(colour * 1.3, 0, 255), colour * 0.6
    return np.where(pattern[..., None], light, dark)


def _shape_mask(shape: str, centre: np.ndarray, radius: float, angle: float, size: int) -> np.ndarray:
    rows, columns = np.mgrid[0:size, 0:size].astype(np.float32)
    y, x = rows - centre[0], columns - centre[1]
    if shape == "circle":
        return x**2 + y**2 <= radius**2
    if shape == "square":  # in the square's frame: the pixel grid rotated by `angle`
        u, v = x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)
        half = radius * 0.85
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # an equilateral triangle: three half-planes; an inradius of 0.65 radius gives about the area of the square
    inside = np.ones_like(x, dtype=bool)
    for edge in range(3):
        normal = angle + edge * 2 * np.pi / 3
        inside &= x * np.cos(normal) + y * np.sin(normal) <= 0.65 * radius
    return inside


def _next_word(class_name: str, words: tuple[str, ...], position: int) -> str:
    """The class name with its word at `position` replaced by the next of `words`: 'red circle' -> 'red square'."""
    parts = class_name.split()
    parts[position] = words[(words.index(parts[position]) + 1) % len(words)]
    return " ".join(parts)


class Scene(NamedTuple):
    """A drawn scene: image (H, W, 3) uint8, label map (H, W) uint8 of indices into CLASS_NAMES, caption, and the
    instance map (H, W) int32: n > 0 where the n-th thing drawn shows (after occlusion by later ones), 0 on stuff."""

    image: np.ndarray
    label: np.ndarray
    caption: str
    instances: np.ndarray


def draw_scene(rng: np.random.Generator, spec: SceneSpec = SceneSpec(), twin: bool = False) -> Scene:
    """
    One scene: image (H, W, 3) uint8, label map (H, W) uint8 of indices into CLASS_NAMES, caption, and the instance
    map of its things (H, W, 0 outside them, each thing numbered from 1). With `twin`, the scene the same generator
    state draws, with every thing's shape changed to the next shape (or, in a scene without things, every region's
    texture to the next texture): a hard negative whose caption differs only there.
    """
    size = spec.size
    label = np.zeros((size, size), dtype=np.uint8)
    instances = np.zeros((size, size), dtype=np.int32)
    image = np.zeros((size, size, 3), dtype=np.float32)
    stuff = rng.choice(len(STUFF_CLASSES), rng.integers(spec.stuff_regions[0], spec.stuff_regions[1] + 1), replace=False)
    num_things = int(rng.integers(spec.things[0], spec.things[1] + 1))
    if twin and num_things == 0:
        stuff = [STUFF_CLASSES.index(_next_word(STUFF_CLASSES[index], STUFF_TEXTURES, 0)) for index in stuff]
    seeds = rng.uniform(0, size, (len(stuff), 2))
    rows, columns = np.mgrid[0:size, 0:size]
    region = np.argmin((rows[..., None] - seeds[:, 0]) ** 2 + (columns[..., None] - seeds[:, 1]) ** 2, axis=-1)
    for index, stuff_class in enumerate(stuff):
        texture, surface = STUFF_CLASSES[stuff_class].split()
        colour = np.array(STUFF_COLOURS[surface], dtype=np.float32) + rng.uniform(-15, 15, 3)
        inside = region == index
        image[inside] = _texture(texture, colour, size, rng)[inside]
        label[inside] = len(THING_CLASSES) + stuff_class
    for thing_number in range(1, num_things + 1):
        thing_class = int(rng.integers(len(THING_CLASSES)))
        if twin:
            thing_class = THING_CLASSES.index(_next_word(THING_CLASSES[thing_class], THING_SHAPES, 1))
        colour_name, shape = THING_CLASSES[thing_class].split()
        radius = rng.uniform(*spec.thing_radius)
        mask = _shape_mask(shape, rng.uniform(radius * 0.5, size - radius * 0.5, 2), radius, rng.uniform(0, 2 * np.pi), size)
        image[mask] = np.array(THING_COLOURS[colour_name], dtype=np.float32) + rng.uniform(-20, 20, 3)
        label[mask] = thing_class
        instances[mask] = thing_number
    illumination = 1 + 0.15 * (rows / size - 0.5) * rng.uniform(-1, 1) + 0.15 * (columns / size - 0.5) * rng.uniform(-1, 1)
    image = image * illumination[..., None] + rng.normal(0, 3, image.shape)
    counts = np.bincount(label.ravel(), minlength=len(CLASS_NAMES))
    shown = [CLASS_NAMES[index] for index in rng.permutation(np.flatnonzero(counts >= spec.min_caption_fraction * size * size))]
    return Scene(np.clip(image, 0, 255).astype(np.uint8), label, caption_for(shown, rng), instances)


def caption_for(class_names: list[str], rng: np.random.Generator) -> str:
    """'a photo of a red circle, a dotted floor and a blue square.'"""
    listed = [f"a {name}" for name in class_names]
    names = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
    return CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(names[2:])


def scenes(split: str, count: int, seed: int, spec: SceneSpec = SceneSpec(),
           twins: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """`count` scenes of a split; scene i depends only on (seed, split, i). With `twins`, scenes 2k and 2k + 1 are a
    scene and its twin (see `draw_scene`)."""
    for scene in drawn_scenes(split, count, seed, spec, twins):
        yield scene[:3]


def drawn_scenes(split: str, count: int, seed: int, spec: SceneSpec = SceneSpec(), twins: bool = False) -> Iterator[Scene]:
    """`scenes` with their instance maps."""
    if split not in SPLIT_IDS:
        raise ValueError(f"`split` must be one of {sorted(SPLIT_IDS)}, got {split!r}.")
    for index in range(count):
        scene = index // 2 if twins else index
        yield draw_scene(np.random.default_rng([seed, SPLIT_IDS[split], scene]), spec, twin=twins and index % 2 == 1)


def hide_unseen_classes(label: np.ndarray) -> np.ndarray:
    """The label map with unseen classes' pixels set to the ignore index, as segmentation training sees it."""
    unseen = [CLASS_NAMES.index(name) for name in UNSEEN_CLASS_NAMES]
    return np.where(np.isin(label, unseen), IGNORE_INDEX, label).astype(np.uint8)


def panoptic_annotation(label: np.ndarray, instances: np.ndarray, seen_only: bool = False) -> tuple[np.ndarray, list[dict]]:
    """
    The scene in the COCO panoptic layout: (H, W) segment ids (0: void) and segments_info `[{"id", "category_id",
    "iscrowd", "area"}]`, one segment per visible thing (numbered in drawing order) and one per stuff class, category
    ids indexing CLASS_NAMES. With `seen_only`, segments of unseen classes are void, as `hide_unseen_classes` ignores
    their pixels.
    """
    hidden = {CLASS_NAMES.index(name) for name in UNSEEN_CLASS_NAMES} if seen_only else set()
    segment_ids, segments_info = np.zeros(label.shape, dtype=np.int32), []
    is_thing = instances > 0
    regions = [(instances == number, int(label[instances == number][0])) for number in np.unique(instances[is_thing])]
    regions += [(~is_thing & (label == category), int(category)) for category in np.unique(label[~is_thing])]
    for mask, category in regions:
        if category in hidden:
            continue
        segment_id = len(segments_info) + 1
        segment_ids[mask] = segment_id
        segments_info.append({"id": segment_id, "category_id": category, "iscrowd": 0, "area": int(mask.sum())})
    return segment_ids, segments_info


def build_dataset(split: str, count: int, seed: int, spec: SceneSpec = SceneSpec(), seen_only: bool = False,
                  twins: bool = False) -> datasets.Dataset:
    """
    A `datasets.Dataset` of scenes with columns image, label and caption (label maps index CLASS_NAMES, recorded in
    the metadata with the thing classes), and the panoptic annotation of `panoptic_annotation` in the COCO layout:
    `panoptic` (RGB-encoded segment ids) and `segments_info`. With `seen_only`, unseen classes' pixels are ignored
    (void in `panoptic`); with `twins`, rows 2k and 2k + 1 are twins.
    """
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image(), "caption": datasets.Value("string"),
                                  "panoptic": datasets.Image(), "segments_info": PANOPTIC_SEGMENTS_FEATURE})
    columns = {name: [] for name in features}
    for image, label, caption, instances in tqdm(drawn_scenes(split, count, seed, spec, twins), total=count,
                                                 desc=f"drawing {split}", unit="scene"):
        segment_ids, segments_info = panoptic_annotation(label, instances, seen_only)
        columns["image"].append(image)
        columns["label"].append(hide_unseen_classes(label) if seen_only else label)
        columns["caption"].append(caption)
        columns["panoptic"].append(segment_ids_to_rgb(segment_ids))
        columns["segments_info"].append(segments_info)
    dataset = datasets.Dataset.from_dict(columns, features=features)
    return with_segmentation_metadata(dataset, CLASS_NAMES, IGNORE_INDEX, thing_class_names=THING_CLASSES)
