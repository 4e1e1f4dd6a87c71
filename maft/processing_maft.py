"""Image processor and processor for MAFT: images in, model inputs out, and semantic post-processing."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor

from .configuration_maft import VILD_PROMPT_TEMPLATES


ImageLike = Image.Image | np.ndarray | torch.Tensor | str | Path

# Largest value of the integer PIL modes that `convert("RGB")` would clip instead of scale.
HIGH_BIT_DEPTH_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0}


def to_rgb_array(image: ImageLike, name: str = "image") -> np.ndarray:
    """Any image (PIL of any mode, path, (H, W[, 3]) or (3, H, W) array in [0, 255]) -> (H, W, 3) RGB: uint8, or
    float32 for floating-point arrays (kept unrounded). Alpha is dropped (the colour channels are kept as they are)."""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                opened.load()
                image = opened.copy()
        except (OSError, ValueError) as error:
            raise ValueError(f"Cannot read {name} {str(image)!r}: {error}") from error
    if isinstance(image, Image.Image):
        if image.mode in HIGH_BIT_DEPTH_MODES or image.mode == "F":
            values = np.asarray(image, dtype=np.float64)
            top = HIGH_BIT_DEPTH_MODES.get(image.mode) or max(values.max(), 1.0)
            array = np.repeat((values / top * 255.0).clip(0, 255).round().astype(np.uint8)[..., None], 3, axis=-1)
        else:
            array = np.asarray(image.convert("RGB"))
    else:
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[-1] not in (1, 3):
            raise ValueError(f"{name} must be (H, W), (H, W, 3) or (3, H, W); got an array of shape {array.shape}.")
        array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array
        if np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
        elif array.dtype != np.uint8:
            array = array.clip(0, 255).astype(np.uint8)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty (size {array.shape[1]}x{array.shape[0]}).")
    return np.ascontiguousarray(array)


def shortest_edge_size(height: int, width: int, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge target size: short side `shortest_edge` unless the long side would then exceed
    `longest_edge`; rounded as detectron2 rounds."""
    scale = shortest_edge / min(height, width)
    if max(height, width) * scale > longest_edge:
        scale = longest_edge / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_image(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to (height, width) as detectron2 does: PIL for uint8, torch (align_corners=False) for floats."""
    height, width = size
    if array.dtype == np.uint8:
        return np.asarray(Image.fromarray(array).resize((width, height), Image.BILINEAR))
    image = torch.from_numpy(array).permute(2, 0, 1)[None]
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()


def to_label_array(label_map: ImageLike) -> np.ndarray:
    """A label map (PIL, path, or 2-D array of class indices) -> (H, W) int64."""
    if isinstance(label_map, (str, Path)):
        try:
            with Image.open(label_map) as opened:
                label_map = np.asarray(opened)
        except (OSError, ValueError) as error:
            raise ValueError(f"Cannot read segmentation map {str(label_map)!r}: {error}") from error
    array = label_map.detach().cpu().numpy() if isinstance(label_map, torch.Tensor) else np.asarray(label_map)
    if array.ndim != 2:
        raise ValueError(f"A segmentation map must be 2-D (H, W) class indices, got shape {array.shape}.")
    return array.astype(np.int64)


class MaftImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for [`MaftModel`] as the original MAFT does at test time, and turns its outputs into label maps.

    do_resize (`bool`, *optional*, defaults to `True`), shortest_edge (`int`, *optional*, defaults to 640),
    longest_edge (`int`, *optional*, defaults to 2560):
        Resize so the short side is `shortest_edge` unless the long side would exceed `longest_edge` (detectron2's
        ResizeShortestEdge, bilinear; segmentation maps nearest).
    image_mean, image_std (`list[float]`): backbone normalisation on the 0-255 scale (ImageNet's).
    clip_image_mean, clip_image_std (`list[float]`): CLIP's normalisation on the 0-255 scale.
    clip_image_size (`int`, *optional*, defaults to 480): side of the square image IP-CLIP sees.
    size_divisibility (`int`, *optional*, defaults to 32): zero-padding (bottom, right) to a multiple of this.
    ignore_index (`int`, *optional*, defaults to 255): padding value of segmentation maps.
    mask_stride (`int`, *optional*, defaults to 4): stride of the model's mask logits in the padded input.
    """

    model_input_names = ["pixel_values", "pixel_mask", "clip_pixel_values", "image_sizes"]

    def __init__(
        self,
        do_resize: bool = True,
        shortest_edge: int = 640,
        longest_edge: int = 2560,
        image_mean: Sequence[float] = (123.675, 116.28, 103.53),
        image_std: Sequence[float] = (58.395, 57.12, 57.375),
        clip_image_mean: Sequence[float] = (122.7709383, 116.7460125, 104.09373615),
        clip_image_std: Sequence[float] = (68.5005327, 66.6321579, 70.323163),
        clip_image_size: int = 480,
        size_divisibility: int = 32,
        ignore_index: int = 255,
        mask_stride: int = 4,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.do_resize = do_resize
        self.shortest_edge = shortest_edge
        self.longest_edge = longest_edge
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.clip_image_mean = list(clip_image_mean)
        self.clip_image_std = list(clip_image_std)
        self.clip_image_size = clip_image_size
        self.size_divisibility = size_divisibility
        self.ignore_index = ignore_index
        self.mask_stride = mask_stride

    def preprocess(
        self,
        images: ImageLike | Sequence[ImageLike],
        segmentation_maps: ImageLike | Sequence[ImageLike] | None = None,
        return_tensors: str | None = "pt",
        do_resize: bool | None = None,
    ) -> BatchFeature:
        """Images (and optional label maps) -> `pixel_values`, `pixel_mask`, `clip_pixel_values`, `image_sizes`
        (and `labels`), as torch tensors."""
        if return_tensors not in ("pt", None):
            raise ValueError(f"MaftImageProcessor returns torch tensors: `return_tensors` must be 'pt', got {return_tensors!r}.")
        do_resize = self.do_resize if do_resize is None else do_resize
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("No images given.")
        arrays = [to_rgb_array(image, f"image {index}") for index, image in enumerate(images)]
        label_arrays = None
        if segmentation_maps is not None:
            segmentation_maps = list(segmentation_maps) if isinstance(segmentation_maps, (list, tuple)) else [segmentation_maps]
            if len(segmentation_maps) != len(arrays):
                raise ValueError(f"Got {len(arrays)} images but {len(segmentation_maps)} segmentation maps.")
            label_arrays = [to_label_array(label_map) for label_map in segmentation_maps]
            for index, (array, labels) in enumerate(zip(arrays, label_arrays)):
                if labels.shape != array.shape[:2]:
                    raise ValueError(
                        f"Segmentation map {index} is {labels.shape[1]}x{labels.shape[0]} but its image is "
                        f"{array.shape[1]}x{array.shape[0]}: they must have the same size."
                    )

        if do_resize:
            sizes = [shortest_edge_size(*array.shape[:2], self.shortest_edge, self.longest_edge) for array in arrays]
            arrays = [resize_image(array, size) for array, size in zip(arrays, sizes)]
            if label_arrays is not None:
                label_arrays = [
                    np.asarray(Image.fromarray(labels.astype(np.int32), mode="I").resize((w, h), Image.NEAREST)).astype(np.int64)
                    for labels, (h, w) in zip(label_arrays, sizes)
                ]
        sizes = [array.shape[:2] for array in arrays]
        divisor = self.size_divisibility
        padded_height = -(-max(h for h, _ in sizes) // divisor) * divisor
        padded_width = -(-max(w for _, w in sizes) // divisor) * divisor

        def normalise_and_pad(mean: list[float], std: list[float]) -> torch.Tensor:
            batch = torch.zeros(len(arrays), 3, padded_height, padded_width)
            for index, array in enumerate(arrays):
                image = torch.tensor(array, dtype=torch.float32).permute(2, 0, 1)
                mean_tensor, std_tensor = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
                batch[index, :, : array.shape[0], : array.shape[1]] = (image - mean_tensor) / std_tensor
            return batch

        pixel_mask = torch.zeros(len(arrays), padded_height, padded_width, dtype=torch.long)
        for index, (height, width) in enumerate(sizes):
            pixel_mask[index, :height, :width] = 1
        clip_pixel_values = F.interpolate(
            normalise_and_pad(self.clip_image_mean, self.clip_image_std),
            size=(self.clip_image_size, self.clip_image_size),
            mode="bilinear",
            align_corners=False,
        )
        data = {
            "pixel_values": normalise_and_pad(self.image_mean, self.image_std),
            "pixel_mask": pixel_mask,
            "clip_pixel_values": clip_pixel_values,
            "image_sizes": torch.tensor(sizes, dtype=torch.long),
        }
        if label_arrays is not None:
            labels = torch.full((len(arrays), padded_height, padded_width), self.ignore_index, dtype=torch.long)
            for index, label_array in enumerate(label_arrays):
                labels[index, : label_array.shape[0], : label_array.shape[1]] = torch.from_numpy(label_array)
            data["labels"] = labels
        return BatchFeature(data=data)

    def post_process_semantic_segmentation(
        self, outputs, target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None, return_scores: bool = False
    ) -> list:
        """
        Per image, the (H, W) map of class indices (DESIGN.md §2 step 5): mask logits upsampled to the padded input
        (bilinear, `align_corners=True`), cropped to the image, sigmoid; `score[c] = sum_q p[q, c] * mask_q` with
        `p = softmax(class_queries_logits)[..., :-1]`; resized to `target_sizes[i]` (bilinear) if given; argmax.
        With `return_scores=True`, dicts with the `segmentation` and the per-class `scores` (C, H, W).
        """
        class_scores = outputs.class_queries_logits.softmax(dim=-1)[..., :-1]
        mask_logits = outputs.masks_queries_logits
        batch_size = mask_logits.shape[0]
        if target_sizes is not None and len(target_sizes) != batch_size:
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {batch_size} images.")
        padded_size = (mask_logits.shape[-2] * self.mask_stride, mask_logits.shape[-1] * self.mask_stride)
        results = []
        for index in range(batch_size):
            masks = F.interpolate(mask_logits[index : index + 1], size=padded_size, mode="bilinear", align_corners=True)[0]
            if outputs.image_sizes is not None:
                height, width = (int(value) for value in outputs.image_sizes[index])
                masks = masks[:, :height, :width]
            scores = torch.einsum("qc,qhw->chw", class_scores[index], masks.sigmoid())
            if target_sizes is not None:
                size = tuple(int(value) for value in target_sizes[index])
                scores = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
            segmentation = scores.argmax(dim=0)
            results.append({"segmentation": segmentation, "scores": scores} if return_scores else segmentation)
        return results


class MaftProcessor(ProcessorMixin):
    r"""
    [`MaftImageProcessor`] and a CLIP tokenizer. Class names are put into every prompt template and tokenised:
    `input_ids` (num_classes, num_templates, length) for one vocabulary shared by the batch, or
    (batch_size, num_classes, num_templates, length) for one list per image (all of the same length).

    prompt_templates (`list[str]`, *optional*): templates with "{}" for the class name; the 14 ViLD ones by default.
    """

    def __init__(self, image_processor=None, tokenizer=None, prompt_templates: Sequence[str] | None = None, **kwargs):
        self.prompt_templates = list(prompt_templates or VILD_PROMPT_TEMPLATES)
        if not all(isinstance(template, str) and "{}" in template for template in self.prompt_templates):
            raise ValueError("Every prompt template must be a string containing '{}' where the class name goes.")
        super().__init__(image_processor, tokenizer)

    def __call__(self, images=None, text=None, segmentation_maps=None, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        if images is None and text is None:
            raise ValueError("Give `images`, `text` (class names), or both.")
        data = {}
        if images is not None:
            data.update(self.image_processor(images, segmentation_maps=segmentation_maps, return_tensors=return_tensors, **kwargs))
        if text is not None:
            data.update(self.tokenize_class_names(text))
        return BatchFeature(data=data)

    def tokenize_class_names(self, text: Sequence[str] | Sequence[Sequence[str]]) -> dict[str, torch.Tensor]:
        """Class names (one list, or one list per image) -> `input_ids` and `attention_mask` of all their prompts."""
        per_image = isinstance(text, (list, tuple)) and len(text) > 0 and all(isinstance(names, (list, tuple)) for names in text)
        vocabularies = [list(names) for names in text] if per_image else [text]
        for vocabulary in vocabularies:
            self._check_class_names(vocabulary)
        if len({len(vocabulary) for vocabulary in vocabularies}) > 1:
            raise ValueError("With one list of class names per image, every list must have the same number of names.")
        num_classes, num_templates = len(vocabularies[0]), len(self.prompt_templates)
        prompts = [template.format(name) for vocabulary in vocabularies for name in vocabulary for template in self.prompt_templates]
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        shape = (len(vocabularies), num_classes, num_templates, -1) if per_image else (num_classes, num_templates, -1)
        return {"input_ids": tokens["input_ids"].view(shape), "attention_mask": tokens["attention_mask"].view(shape)}

    @staticmethod
    def _check_class_names(names) -> None:
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            raise ValueError(f"`text` must be a non-empty list of class names (or one such list per image), got {names!r}.")
        bad = [name for name in names if not isinstance(name, str) or not name.strip()]
        if bad:
            raise ValueError(f"Class names must be non-empty strings; got {bad!r}.")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"Class names must be unique; repeated: {duplicates}.")

    def post_process_semantic_segmentation(self, *args, **kwargs) -> list:
        """See [`MaftImageProcessor.post_process_semantic_segmentation`]."""
        return self.image_processor.post_process_semantic_segmentation(*args, **kwargs)


__all__ = ["MaftImageProcessor", "MaftProcessor"]
