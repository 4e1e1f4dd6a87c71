"""The training augmentation of MAFT (DESIGN.md §4), as functions of an image, its label map and a seeded generator."""

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..processing_maft import shortest_edge_size


@dataclass
class AugmentationConfig:
    """
    short_sides: the short side is resized to one of these (chosen at random), the long side kept <= `max_size`.
    crop_size: a random crop of this square size (smaller images are cropped to what there is), then padding to it.
    color_jitter: SSD-style photometric distortion (brightness, contrast, saturation, hue, each with probability 1/2).
    flip_probability: probability of a horizontal flip.
    """

    short_sides: tuple[int, ...] = tuple(range(320, 961, 64))
    max_size: int = 2560
    crop_size: int = 640
    color_jitter: bool = True
    flip_probability: float = 0.5


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SSD's colour augmentation: brightness +-32; then contrast x[0.5, 1.5] before or after saturation x[0.5, 1.5] and
    hue +-18 degrees (each step with probability 1/2). Hue and saturation are changed in PIL's HSV space."""
    image = image.astype(np.float32)
    if rng.random() < 0.5:
        image = image + rng.uniform(-32, 32)

    def contrast(pixels: np.ndarray) -> np.ndarray:
        return pixels * rng.uniform(0.5, 1.5) if rng.random() < 0.5 else pixels

    def saturation_and_hue(pixels: np.ndarray) -> np.ndarray:
        change_saturation, change_hue = rng.random() < 0.5, rng.random() < 0.5
        if not (change_saturation or change_hue):
            return pixels
        hsv = np.asarray(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert("HSV")).astype(np.float32)
        if change_saturation:
            hsv[..., 1] = (hsv[..., 1] * rng.uniform(0.5, 1.5)).clip(0, 255)
        if change_hue:
            hsv[..., 0] = (hsv[..., 0] + rng.integers(-18, 19) * 256 / 360) % 256
        return np.asarray(Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")).astype(np.float32)

    image = saturation_and_hue(contrast(image)) if rng.random() < 0.5 else contrast(saturation_and_hue(image))
    return image.clip(0, 255).astype(np.uint8)


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, config: AugmentationConfig,
            ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image and (H, W) label map -> a `crop_size` square pair, padded with 0 and `ignore_index`."""
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape[:2]} and label map {label.shape} must have the same size.")
    height, width = shortest_edge_size(*label.shape, int(rng.choice(config.short_sides)), config.max_size)
    image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    label = np.asarray(Image.fromarray(label.astype(np.int32), mode="I").resize((width, height), Image.NEAREST)).astype(np.int64)

    crop_height, crop_width = min(config.crop_size, height), min(config.crop_size, width)
    top, left = rng.integers(height - crop_height + 1), rng.integers(width - crop_width + 1)
    image = image[top : top + crop_height, left : left + crop_width]
    label = label[top : top + crop_height, left : left + crop_width]

    if config.color_jitter:
        image = photometric_distortion(image, rng)
    if rng.random() < config.flip_probability:
        image, label = image[:, ::-1], label[:, ::-1]

    padded_image = np.zeros((config.crop_size, config.crop_size, 3), dtype=np.uint8)
    padded_label = np.full((config.crop_size, config.crop_size), ignore_index, dtype=np.int64)
    padded_image[:crop_height, :crop_width] = image
    padded_label[:crop_height, :crop_width] = label
    return padded_image, padded_label


__all__ = ["AugmentationConfig", "augment", "photometric_distortion"]
