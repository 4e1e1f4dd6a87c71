"""Rendering of segmentations: colour overlays with a legend, label-map images and per-class statistics."""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# The colours and the tint live in the demo app, which a Hugging Face Space copies without maft beside it.
from ..demo.app import OVERLAY_ALPHA, class_palette, segment_outlines, tint


def render_overlay(
    image: Image.Image, label_map: np.ndarray, class_names: list[str], alpha: float = OVERLAY_ALPHA,
    outlines: np.ndarray | None = None,
) -> Image.Image:
    """The image with each pixel tinted by its class colour (pixels labelled -1 left as they are) and `outlines`
    (H, W bool, optional) in white, and a legend of the classes present, by area."""
    palette = class_palette(len(class_names))
    overlay = tint(image, label_map, palette, alpha, outlines)

    counts = np.bincount(label_map[label_map >= 0], minlength=len(class_names))
    present = [index for index in np.argsort(-counts) if counts[index] > 0]
    font = ImageFont.load_default()
    row_height, swatch, padding = 16, 12, 6
    legend_width = padding * 3 + swatch + max((int(font.getlength(class_names[index])) for index in present), default=0)
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


def render_segments_overlay(
    image: Image.Image, segmentation: np.ndarray, segments_info: list[dict], class_names: list[str], nothing: int
) -> Image.Image:
    """`render_overlay` of instance or panoptic segments: each segment tinted by its class and outlined; `segmentation`
    holds segment ids (`nothing` where no segment is) and `segments_info` their `id` and `label_id`."""
    label_of_segment = {segment["id"]: segment["label_id"] for segment in segments_info}
    label_map = np.full(segmentation.shape, -1, dtype=np.int64)
    for segment_id, label in label_of_segment.items():
        label_map[segmentation == segment_id] = label
    return render_overlay(image, label_map, class_names, outlines=segment_outlines(segmentation, nothing))


def segment_ids_to_rgb(segment_ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W, 3) uint8, COCO panoptic's PNG encoding (id = R + 256 G + 256^2 B)."""
    segment_ids = np.asarray(segment_ids, dtype=np.int64)
    if segment_ids.min(initial=0) < 0 or segment_ids.max(initial=0) >= 256**3:
        raise ValueError(f"Panoptic segment ids must be in [0, {256**3 - 1}], got [{segment_ids.min()}, {segment_ids.max()}].")
    return np.stack([segment_ids % 256, segment_ids // 256 % 256, segment_ids // 256**2], axis=-1).astype(np.uint8)


def panoptic_image(segmentation: np.ndarray) -> Image.Image:
    """Segment ids (H, W) as COCO panoptic's RGB PNG: id = R + 256 * G + 256**2 * B (0: no segment)."""
    return Image.fromarray(segment_ids_to_rgb(segmentation))


def segment_box_and_area(mask: np.ndarray) -> tuple[list[int], int]:
    """COCO's `bbox` ([x, y, width, height] of the pixels) and `area` (pixel count) of a non-empty (H, W) bool mask."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = [int(columns[0]), int(rows[0]), int(columns[-1] - columns[0] + 1), int(rows[-1] - rows[0] + 1)]
    return box, int(mask.sum())
