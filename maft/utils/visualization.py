"""Rendering of segmentations: colour overlays with a legend, label-map images and per-class statistics."""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# The colours and the tint live in the demo app, which a Hugging Face Space copies without maft beside it.
from ..demo.app import OVERLAY_ALPHA, class_palette, tint


def render_overlay(
    image: Image.Image, label_map: np.ndarray, class_names: list[str], alpha: float = OVERLAY_ALPHA
) -> Image.Image:
    """The image with each pixel tinted by its class colour, and a legend of the classes present, by area."""
    palette = class_palette(len(class_names))
    overlay = tint(image, label_map, palette, alpha)

    counts = np.bincount(label_map.ravel(), minlength=len(class_names))
    present = [index for index in np.argsort(-counts) if counts[index] > 0]
    font = ImageFont.load_default()
    row_height, swatch, padding = 16, 12, 6
    legend_width = padding * 3 + swatch + max(int(font.getlength(class_names[index])) for index in present)
    canvas = Image.new("RGB", (overlay.width + legend_width, max(overlay.height, padding * 2 + row_height * len(present))), "white")
    canvas.paste(overlay, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, index in enumerate(present):
        top = padding + row * row_height
        left = overlay.width + padding
        draw.rectangle([left, top, left + swatch, top + swatch], fill=tuple(int(value) for value in palette[index]))
        draw.text((left + swatch + padding, top), class_names[index], fill="black", font=font)
    return canvas


def label_map_image(label_map: np.ndarray) -> Image.Image:
    """A lossless image of class indices: 8-bit ("L") for indices up to 255, 16-bit ("I;16", saved as a 16-bit PNG)
    up to 65535 (A-847, PC-459)."""
    label_map = np.asarray(label_map)
    if label_map.size and (label_map.min() < 0 or label_map.max() > 65535):
        raise ValueError(f"A label map image holds class indices 0-65535, got [{label_map.min()}, {label_map.max()}].")
    return Image.fromarray(label_map.astype(np.uint8 if label_map.max(initial=0) < 256 else np.uint16))


def class_fractions(label_map: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """Fraction of the image's pixels assigned to each class, largest first; classes absent are left out."""
    counts = np.bincount(label_map.ravel(), minlength=len(class_names))
    order = np.argsort(-counts, kind="stable")
    return {class_names[index]: round(float(counts[index]) / label_map.size, 6) for index in order if counts[index] > 0}
