"""Image processor and processor for MAFT: images in, model inputs out, and semantic post-processing."""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.nn import functional as F
from transformers import AutoImageProcessor, AutoProcessor, BatchFeature, ProcessorMixin
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_processing_utils import BaseImageProcessor, get_size_dict
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChannelDimension,
    SizeDict,
    infer_channel_dimension_format,
    is_scaled_image,
    to_numpy_array,
    validate_preprocess_arguments,
)
from transformers.processing_utils import ProcessingKwargs
from transformers.utils import TensorType, logging

from .configuration_maft import MaftConfig


logger = logging.get_logger(__name__)

ImageLike = Image.Image | np.ndarray | torch.Tensor | str | Path

# Largest value of the integer PIL modes that `convert("RGB")` would clip instead of scale.
HIGH_BIT_DEPTH_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0}

# Keys of processor configurations saved before the image processor followed transformers' conventions: flat sizes,
# `size_divisibility`, and means and standard deviations on the 0-255 scale (there was no `do_rescale`).
LEGACY_SIZE_KEYS = ("shortest_edge", "longest_edge", "size_divisibility")
NORMALIZATION_KEYS = ("image_mean", "image_std", "clip_image_mean", "clip_image_std")

# Keys `ImageProcessingMixin` itself writes into saved configurations.
CONFIG_METADATA_KEYS = {"image_processor_type", "processor_class", "feature_extractor_type", "auto_map"}

# Post-processing resizes the class scores a chunk of at most this many elements at a time (64 MiB of float32), and
# reduces them over classes in bands of rows of about this many pixels.
POSTPROCESS_CHUNK_ELEMENTS = 2**24
POSTPROCESS_BAND_PIXELS = 2**20


# The 14 prompt templates every class name is put into (ViLD's, as MAFT uses: DESIGN.md §2).
VILD_PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)


def to_rgb_array(image: ImageLike, name: str = "image", input_data_format: str | ChannelDimension | None = None) -> np.ndarray:
    """
    The image loader of [`MaftImageProcessor`] (and of `maft segment`): any image -> (H, W, 3) RGB, uint8, or float32
    for floating-point arrays (kept unrounded, on the scale they came in).

    Files and PIL images are turned upright by their EXIF orientation, as photo viewers do. PIL images of any mode are
    accepted: alpha is dropped, 16- and 32-bit integer modes are scaled from 0-65535 and "F" from 0-max to 0-255 (PIL's
    `convert("RGB")` would clip them). Arrays and tensors are (H, W), (H, W, C) or (C, H, W) with C 1 or 3
    (`input_data_format` settles ambiguous shapes); integer ones must hold 0-255. `name` is how errors call the image.
    """
    if isinstance(image, (str, Path)):
        array = read_image_file(image, name)
    elif isinstance(image, Image.Image):
        array = pil_to_rgb_array(ImageOps.exif_transpose(image), name)
    else:
        array = array_to_rgb_array(image, name, input_data_format)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty (size {array.shape[1]}x{array.shape[0]}).")
    return np.ascontiguousarray(array)


def read_image_file(path: str | Path, name: str) -> np.ndarray:
    try:
        with Image.open(path) as opened:
            opened.load()
            ImageOps.exif_transpose(opened, in_place=True)
            return pil_to_rgb_array(opened, name)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"Cannot read {name} {str(path)!r}: {error}") from error


def pil_to_rgb_array(image: Image.Image, name: str) -> np.ndarray:
    if image.mode not in HIGH_BIT_DEPTH_MODES and image.mode != "F":
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{name} has NaN or infinite pixel values.")
    top = HIGH_BIT_DEPTH_MODES.get(image.mode) or max(values.max(), 1.0)
    return np.repeat((values / top * 255.0).clip(0, 255).round().astype(np.uint8)[..., None], 3, axis=-1)


def array_to_rgb_array(image, name: str, input_data_format: str | ChannelDimension | None) -> np.ndarray:
    try:
        array = to_numpy_array(image)
    except ValueError as error:
        raise ValueError(f"{name} must be a path, a PIL image, a NumPy array or a torch tensor, got {type(image).__name__}.") from error
    if array.ndim == 3:
        try:
            layout = ChannelDimension(input_data_format) if input_data_format else infer_channel_dimension_format(array)
        except ValueError as error:
            raise ValueError(f"{name} must be (H, W), (H, W, 3) or (3, H, W); got an array of shape {array.shape}.") from error
        array = array.transpose(1, 2, 0) if layout == ChannelDimension.FIRST else array
    elif array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"{name} must be (H, W), (H, W, 3) or (3, H, W); got an array of shape {array.shape}.")
    array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{name} has NaN or infinite pixel values.")
        return array.astype(np.float32)
    if array.dtype.kind not in "biu":
        raise ValueError(f"{name} must hold numbers, got an array of dtype {array.dtype}.")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(
            f"{name} has integer pixel values in [{array.min()}, {array.max()}]; integer arrays must hold 0-255. Give "
            "a 16-bit image as its file or PIL image (scaled to 0-255), or as floats."
        )
    return array.astype(np.uint8)


def shortest_edge_size(height: int, width: int, shortest_edge: int, longest_edge: float = math.inf) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge target size: short side `shortest_edge` unless the long side would then exceed
    `longest_edge`; rounded as detectron2 rounds, but never below one pixel (a 1x10000 image keeps one row)."""
    scale = shortest_edge / min(height, width)
    if max(height, width) * scale > longest_edge:
        scale = longest_edge / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_image(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to (height, width) as detectron2 does: PIL for uint8, torch (align_corners=False) for floats."""
    height, width = size
    if array.dtype == np.uint8:
        return np.asarray(Image.fromarray(array).resize((width, height), Image.BILINEAR))
    image = torch.from_numpy(array).permute(2, 0, 1)[None]
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()


def resize_label_map(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of class indices to (height, width)."""
    height, width = size
    return np.asarray(Image.fromarray(labels.astype(np.int32), mode="I").resize((width, height), Image.NEAREST)).astype(np.int64)


def to_label_array(label_map: ImageLike, name: str = "segmentation map") -> np.ndarray:
    """A label map (PIL, path, or 2-D array of class indices) -> (H, W) int64."""
    if isinstance(label_map, (str, Path)):
        try:
            with Image.open(label_map) as opened:
                label_map = np.asarray(opened)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"Cannot read {name} {str(label_map)!r}: {error}") from error
    array = label_map.detach().cpu().numpy() if isinstance(label_map, torch.Tensor) else np.asarray(label_map)
    if array.ndim != 2:
        raise ValueError(f"A segmentation map must be 2-D (H, W) class indices, got shape {array.shape}.")
    return array.astype(np.int64)


def as_list(inputs, single_ndim: int) -> list:
    """One input or a batch (a list, or an array or tensor with one more dimension than a single input) -> a list."""
    if isinstance(inputs, (list, tuple)):
        return list(inputs)
    if isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == single_ndim + 1:
        return list(inputs)
    return [inputs]


def round_up(size: Sequence[int], divisor: int) -> tuple[int, int]:
    """(height, width) rounded up to multiples of `divisor` (unchanged for a divisor of 0 or 1)."""
    divisor = max(divisor, 1)
    return tuple(-(-int(value) // divisor) * divisor for value in size)


def pad_to(image: np.ndarray, size: tuple[int, int], fill: float = 0) -> np.ndarray:
    """(..., h, w) -> (..., height, width): `fill` added at the bottom and right."""
    padded = np.full((*image.shape[:-2], *size), fill, dtype=image.dtype)
    padded[..., : image.shape[-2], : image.shape[-1]] = image
    return padded


class MaftImageProcessorKwargs(TypedDict, total=False):
    do_resize: bool
    size: dict[str, int]
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: float | list[float] | tuple[float, ...]
    image_std: float | list[float] | tuple[float, ...]
    clip_image_mean: float | list[float] | tuple[float, ...]
    clip_image_std: float | list[float] | tuple[float, ...]
    clip_image_size: int
    do_pad: bool
    size_divisor: int
    per_image_clip_view: bool
    ignore_index: int
    input_data_format: str | ChannelDimension | None
    return_tensors: str | TensorType | None


class MaftImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for [`MaftModel`] as the original MAFT does at test time, and turns its outputs into label maps.
    Every option below can be given at construction and to each call.

    Keyword Args:
        do_resize (`bool`, *optional*, defaults to `True`):
            Resize to `size`, bilinearly (segmentation maps: nearest).
        size (`dict[str, int]`, *optional*):
            `{"shortest_edge", "longest_edge"}`: the short side becomes `shortest_edge` unless the long side would then
            exceed `longest_edge` (detectron2's ResizeShortestEdge; `longest_edge` may be left out); or
            `{"height", "width"}`: exactly that size. Defaults to `{"shortest_edge": 640, "longest_edge": 2560}`.
        do_rescale (`bool`, *optional*, defaults to `True`):
            Multiply the pixels by `rescale_factor`. Floats already in [0, 1] want `do_rescale=False`.
        rescale_factor (`float`, *optional*, defaults to `1/255`): 0-255 -> 0-1.
        do_normalize (`bool`, *optional*, defaults to `True`):
            Normalise the backbone's view with `image_mean`/`image_std` and the CLIP view with `clip_image_mean`/`clip_image_std`.
        image_mean (`list[float]`, *optional*): the backbone's normalisation mean on the 0-1 scale (ImageNet's).
        image_std (`list[float]`, *optional*): the backbone's normalisation standard deviation (ImageNet's).
        clip_image_mean (`list[float]`, *optional*): CLIP's normalisation mean on the 0-1 scale (OpenAI's).
        clip_image_std (`list[float]`, *optional*): CLIP's normalisation standard deviation (OpenAI's).
        clip_image_size (`int`, *optional*, defaults to 480): side of the square image IP-CLIP sees.
        do_pad (`bool`, *optional*, defaults to `True`):
            Zero-pad (bottom, right) to the batch's largest size rounded up to a multiple of `size_divisor`, as
            detectron2 does (Mask2Former's processor instead resizes to a multiple).
        size_divisor (`int`, *optional*, defaults to 32): see `do_pad`.
        per_image_clip_view (`bool`, *optional*, defaults to `True`):
            Each image's CLIP view is that image alone, zero-padded to a multiple of `size_divisor` and resized to
            `clip_image_size`, so an image gets the same view alone as in any batch. `False`: the padded batch,
            resized, as the original MAFT does (so a batch of images of different sizes reproduces its training).
        ignore_index (`int`, *optional*, defaults to 255): padding value of segmentation maps.
        mask_stride (`int`, *optional*, defaults to 4): stride of the model's mask logits in the padded input (construction only).

    Configurations saved by earlier versions (flat `shortest_edge`/`longest_edge`, `size_divisibility`, means and
    standard deviations on the 0-255 scale) load as their equivalent and give the same pixel values.
    """

    model_input_names = ["pixel_values", "pixel_mask", "clip_pixel_values", "image_sizes", "clip_view_sizes"]
    valid_kwargs = MaftImageProcessorKwargs

    do_resize = True
    size = {"shortest_edge": 640, "longest_edge": 2560}
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    clip_image_mean = OPENAI_CLIP_MEAN
    clip_image_std = OPENAI_CLIP_STD
    clip_image_size = 480
    do_pad = True
    size_divisor = 32
    per_image_clip_view = True
    ignore_index = 255

    def __init__(self, mask_stride: int = 4, **kwargs):
        kwargs = self._from_legacy_keys(kwargs)
        metadata = {key: kwargs.pop(key) for key in CONFIG_METADATA_KEYS & kwargs.keys()}
        self._refuse_unknown_keys(kwargs)
        super().__init__(**metadata)
        self.mask_stride = mask_stride
        self._set_attributes(**kwargs)
        self._validate_preprocess_kwargs(**{name: getattr(self, name) for name in self._valid_kwargs_names})

    @classmethod
    def _from_legacy_keys(cls, kwargs: dict) -> dict:
        """The arguments of a configuration saved before `size`, `size_divisor` and `do_rescale`, in today's terms."""
        if not any(key in kwargs for key in LEGACY_SIZE_KEYS):
            return kwargs
        kwargs = dict(kwargs)
        if "shortest_edge" in kwargs or "longest_edge" in kwargs:
            size = dict(kwargs.get("size") or cls.size)
            size.update({key: kwargs.pop(key) for key in ("shortest_edge", "longest_edge") if key in kwargs})
            kwargs["size"] = size
        if "size_divisibility" in kwargs:
            kwargs["size_divisor"] = kwargs.pop("size_divisibility")
        if "do_rescale" not in kwargs:
            for key in NORMALIZATION_KEYS:
                values = np.asarray(kwargs.get(key, 0.0), dtype=np.float64)
                if (values > 1).any():
                    kwargs[key] = (values / 255.0).tolist()
        return kwargs

    def _refuse_unknown_keys(self, kwargs: dict) -> None:
        unknown = sorted(set(kwargs) - set(self.valid_kwargs.__annotations__))
        if unknown:
            allowed = ", ".join([*self.valid_kwargs.__annotations__, "mask_stride"])
            raise TypeError(f"{type(self).__name__} got unknown keyword arguments {unknown}; allowed: {allowed}.")

    def _standardize_kwargs(self, size=None, image_mean=None, image_std=None, clip_image_mean=None, clip_image_std=None, **kwargs) -> dict:
        """`size` as a `SizeDict`, means and standard deviations as tuples."""
        if size is not None and not isinstance(size, SizeDict):
            size = SizeDict(**get_size_dict(size, default_to_square=False))
        normalization = dict(image_mean=image_mean, image_std=image_std, clip_image_mean=clip_image_mean, clip_image_std=clip_image_std)
        for key, value in normalization.items():
            kwargs[key] = tuple(value) if isinstance(value, (list, tuple)) else value
        return dict(size=size, **kwargs)

    def _validate_preprocess_kwargs(self, **kwargs) -> None:
        validate_preprocess_arguments(
            do_rescale=kwargs["do_rescale"],
            rescale_factor=kwargs["rescale_factor"],
            do_normalize=kwargs["do_normalize"],
            image_mean=kwargs["image_mean"],
            image_std=kwargs["image_std"],
        )
        size = kwargs["size"] or SizeDict()
        if not (size.shortest_edge or (size.height and size.width)) or size.max_height or size.max_width or size.min_pixels:
            raise ValueError(f"`size` must be {{'shortest_edge'[, 'longest_edge']}} or {{'height', 'width'}}, got {kwargs['size']}.")
        for key in NORMALIZATION_KEYS:
            values = np.asarray(kwargs[key], dtype=np.float64)
            if values.size not in (1, 3):
                raise ValueError(f"`{key}` must be one value or one per RGB channel, got {kwargs[key]}.")
            if kwargs["do_rescale"] and kwargs["do_normalize"] and (values > 1).any():
                raise ValueError(
                    f"`{key}` {kwargs[key]} is on the 0-255 scale, but `do_rescale=True` rescales pixels to 0-1: give it on "
                    "the 0-1 scale (e.g. transformers' IMAGENET_DEFAULT_MEAN) or pass `do_rescale=False`."
                )
        for key in ("clip_image_size", "size_divisor"):
            if not isinstance(kwargs[key], int) or kwargs[key] < (1 if key == "clip_image_size" else 0):
                raise ValueError(f"`{key}` must be a {'positive' if key == 'clip_image_size' else 'non-negative'} integer, got {kwargs[key]!r}.")
        if kwargs["return_tensors"] not in (None, "np", "pt"):
            raise ValueError(f"`return_tensors` must be None, 'np' or 'pt', got {kwargs['return_tensors']!r}.")

    def preprocess(self, images, segmentation_maps=None, return_tensors: str | TensorType | None = "pt", **kwargs) -> BatchFeature:
        """
        Images (a path, PIL image, (H, W[, 3]) or (3, H, W) array or tensor, a list of those, or a 4-D batch) and
        optional label maps -> `pixel_values` (B, 3, H, W), `pixel_mask` (B, H, W), `clip_pixel_values`
        (B, 3, clip_image_size, clip_image_size), `image_sizes` (B, 2) (and `labels` (B, H, W)). `return_tensors`:
        "pt" (the default) or "np" for stacked arrays, None for lists of per-image arrays.
        """
        self._refuse_unknown_keys(kwargs)
        return super().preprocess(images, image_like_kwargs={"segmentation_maps": segmentation_maps}, return_tensors=return_tensors, **kwargs)

    def _preprocess_image_like_inputs(self, images, segmentation_maps=None, input_data_format=None, **kwargs) -> BatchFeature:
        images = [to_rgb_array(image, f"image {index}", input_data_format) for index, image in enumerate(as_list(images, 3))]
        if not images:
            raise ValueError("No images given.")
        if segmentation_maps is not None:
            segmentation_maps = [
                to_label_array(labels, f"segmentation map {index}") for index, labels in enumerate(as_list(segmentation_maps, 2))
            ]
            if len(segmentation_maps) != len(images):
                raise ValueError(f"Got {len(images)} images but {len(segmentation_maps)} segmentation maps.")
            for index, (image, labels) in enumerate(zip(images, segmentation_maps)):
                if labels.shape != image.shape[:2]:
                    raise ValueError(
                        f"Segmentation map {index} is {labels.shape[1]}x{labels.shape[0]} but its image is "
                        f"{image.shape[1]}x{image.shape[0]}: they must have the same size."
                    )
        return self._preprocess(images, segmentation_maps, **kwargs)

    def _preprocess(
        self,
        images: list[np.ndarray],
        segmentation_maps: list[np.ndarray] | None,
        do_resize: bool,
        size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        clip_image_mean: Sequence[float],
        clip_image_std: Sequence[float],
        clip_image_size: int,
        do_pad: bool,
        size_divisor: int,
        per_image_clip_view: bool,
        ignore_index: int,
        return_tensors: str | TensorType | None,
    ) -> BatchFeature:
        if do_rescale and any(is_scaled_image(image) for image in images):
            logger.warning_once(
                "It looks like you are trying to rescale already rescaled images. If the input images have pixel "
                "values between 0 and 1, set `do_rescale=False` to avoid rescaling them again."
            )
        if do_resize:
            sizes = [self.resized_size(*image.shape[:2], size) for image in images]
            images = [resize_image(image, image_size) for image, image_size in zip(images, sizes)]
            if segmentation_maps is not None:
                segmentation_maps = [resize_label_map(labels, image_size) for labels, image_size in zip(segmentation_maps, sizes)]
        image_sizes = [image.shape[:2] for image in images]
        if do_pad:
            padded_size = round_up(np.max(image_sizes, axis=0), size_divisor)
        elif len(set(image_sizes)) == 1:
            padded_size = image_sizes[0]
        else:
            raise ValueError(f"With `do_pad=False` every image must have the same size after resizing, got {sorted(set(image_sizes))}.")

        normalize = dict(do_rescale=do_rescale, rescale_factor=rescale_factor, do_normalize=do_normalize)
        clip_images = [self.rescale_and_normalize(image, clip_image_mean, clip_image_std, **normalize) for image in images]
        clip_view_sizes = [round_up(image_size, size_divisor if do_pad else 1) if per_image_clip_view else padded_size for image_size in image_sizes]
        data = {
            "pixel_values": [pad_to(self.rescale_and_normalize(image, image_mean, image_std, **normalize), padded_size) for image in images],
            "pixel_mask": [pad_to(np.ones(image_size, dtype=np.int64), padded_size) for image_size in image_sizes],
            "clip_pixel_values": [self.clip_view(image, size, clip_image_size) for image, size in zip(clip_images, clip_view_sizes)],
            "image_sizes": [np.array(image_size, dtype=np.int64) for image_size in image_sizes],
            # the region of the padded batch each CLIP view shows, with which the model aligns IP-CLIP's masks
            "clip_view_sizes": [np.array(view_size, dtype=np.int64) for view_size in clip_view_sizes],
        }
        if segmentation_maps is not None:
            data["labels"] = [pad_to(labels, padded_size, ignore_index) for labels in segmentation_maps]
        if return_tensors is not None:
            data = {key: np.stack(values) for key, values in data.items()}
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def resized_size(height: int, width: int, size: SizeDict) -> tuple[int, int]:
        if size.height and size.width:
            return size.height, size.width
        return shortest_edge_size(height, width, size.shortest_edge, size.longest_edge or math.inf)

    @staticmethod
    def rescale_and_normalize(
        image: np.ndarray, mean: Sequence[float], std: Sequence[float], do_rescale: bool, rescale_factor: float, do_normalize: bool
    ) -> np.ndarray:
        """(H, W, 3) -> (3, H, W) float32. Rescaling is folded into the normalisation constants (as transformers' fast
        processors do), computed in float64 so that the default ones are bit for bit the 0-255 ones of detectron2."""
        pixels = image.astype(np.float32).transpose(2, 0, 1)
        if do_normalize:
            scale = rescale_factor if do_rescale else 1.0
            mean = (np.broadcast_to(np.asarray(mean, dtype=np.float64), (3,)) / scale).astype(np.float32)
            std = (np.broadcast_to(np.asarray(std, dtype=np.float64), (3,)) / scale).astype(np.float32)
            return (pixels - mean[:, None, None]) / std[:, None, None]
        return pixels * np.float32(rescale_factor) if do_rescale else pixels

    @staticmethod
    def clip_view(image: np.ndarray, padded_size: tuple[int, int], clip_image_size: int) -> np.ndarray:
        """One CLIP-normalised image (3, h, w), zero-padded to `padded_size`, resized bilinearly to the square CLIP input."""
        padded = torch.from_numpy(pad_to(image, padded_size))
        return F.interpolate(padded[None], size=(clip_image_size, clip_image_size), mode="bilinear", align_corners=False)[0].numpy()

    def post_process_semantic_segmentation(
        self,
        outputs,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        return_segmentation_scores: bool = False,
    ) -> list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]:
        """
        Per image, the (H, W) map of class indices (DESIGN.md §2 step 5): mask logits upsampled to the padded input
        (bilinear, `align_corners=True`; to the image's own padded size where `outputs.padded_sizes` gives it), cropped
        to the image, sigmoid; `score[c] = sum_q p[q, c] * mask_q` with
        `p = softmax(class_queries_logits)[..., :-1]`; resized to `target_sizes[i]` (bilinear) if given; argmax.

        The resized scores are never held for all classes at once (a few classes at a time, a running maximum), so
        memory grows with the target size, not with classes x target size; the labels equal those of the full map.
        With `return_segmentation_scores=True`, [`SemanticSegmentationPostProcessorOutput`]s holding the
        `segmentation` and the per-class `segmentation_scores` (C, H, W), as Mask2Former's.
        """
        class_scores = outputs.class_queries_logits.softmax(dim=-1)[..., :-1]
        mask_logits = outputs.masks_queries_logits
        batch_size = mask_logits.shape[0]
        if target_sizes is not None and len(target_sizes) != batch_size:
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {batch_size} images.")
        padded_size = (mask_logits.shape[-2] * self.mask_stride, mask_logits.shape[-1] * self.mask_stride)
        results = []
        padded_sizes = getattr(outputs, "padded_sizes", None)
        for index in range(batch_size):
            logits, size = mask_logits[index : index + 1], padded_size
            if padded_sizes is not None:
                size = tuple(int(value) for value in padded_sizes[index])
                logits = logits[..., : -(-size[0] // self.mask_stride), : -(-size[1] // self.mask_stride)]
            masks = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)[0]
            if outputs.image_sizes is not None:
                height, width = (int(value) for value in outputs.image_sizes[index])
                masks = masks[:, :height, :width]
            scores = torch.einsum("qc,qhw->chw", class_scores[index], masks.sigmoid())
            if target_sizes is None:
                segmentation = scores.argmax(dim=0)
            elif return_segmentation_scores:
                scores = resize_scores(scores, tuple(int(value) for value in target_sizes[index]))
                segmentation = scores.argmax(dim=0)
            else:
                segmentation = resized_argmax(scores, tuple(int(value) for value in target_sizes[index])).long()
            if return_segmentation_scores:
                results.append(SemanticSegmentationPostProcessorOutput(data={"segmentation": segmentation, "segmentation_scores": scores}))
            else:
                results.append(segmentation)
        return results


def resize_scores(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) -> (C, height, width), bilinear (`align_corners=False`); each class is resized on its own."""
    return F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def resized_argmax(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """
    `resize_scores(scores, size).argmax(dim=0)` as int32, equal to it (the first class wins ties) without the
    (C, height, width) map: classes are resized a chunk at a time, each chunk's maximum (taken a band of rows at a
    time, to keep its indices small) merged into a running one.
    """
    if tuple(scores.shape[-2:]) == tuple(size):  # bilinear resizing to the same size is the identity
        return scores.argmax(dim=0).int()
    height, width = size
    classes_per_chunk = max(1, POSTPROCESS_CHUNK_ELEMENTS // (height * width))
    rows_per_band = max(1, POSTPROCESS_BAND_PIXELS // width)
    best = torch.full(size, float("-inf"), dtype=scores.dtype, device=scores.device)
    labels = torch.zeros(size, dtype=torch.int32, device=scores.device)
    for start in range(0, scores.shape[0], classes_per_chunk):
        resized = resize_scores(scores[start : start + classes_per_chunk], size)
        for top in range(0, height, rows_per_band):
            band = slice(top, top + rows_per_band)
            values, indices = resized[:, band].max(dim=0)
            better = values > best[band]
            best[band] = torch.where(better, values, best[band])
            labels[band] = torch.where(better, indices.int() + start, labels[band])
    return labels


class MaftProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: MaftImageProcessorKwargs


class MaftProcessor(ProcessorMixin):
    r"""
    [`MaftImageProcessor`] and a CLIP tokenizer. Class names are put into every prompt template and tokenised:
    `input_ids` (num_classes, num_templates, length) for one vocabulary shared by the batch, or
    (batch_size, num_classes, num_templates, length) for one list per image (all of the same length).

    Keyword arguments of a call go where they belong, as in transformers' processors: the image processor's options
    (`do_resize`, `size`, ...) to the image processor, the tokenizer's (`max_length`, ...) to the tokenizer, or
    explicitly as `images_kwargs={...}` / `text_kwargs={...}`; any other keyword is an error.

    prompt_templates (`list[str]`, *optional*): templates with "{}" for the class name; the 14 ViLD ones by default.
    """

    valid_processor_kwargs = MaftProcessorKwargs

    def __init__(self, image_processor=None, tokenizer=None, prompt_templates: Sequence[str] | None = None, **kwargs):
        self.prompt_templates = list(prompt_templates or VILD_PROMPT_TEMPLATES)
        if not all(isinstance(template, str) and "{}" in template for template in self.prompt_templates):
            raise ValueError("Every prompt template must be a string containing '{}' where the class name goes.")
        super().__init__(image_processor, tokenizer)

    def __call__(self, images=None, text=None, segmentation_maps=None, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        if images is None and text is None:
            raise ValueError("Give `images`, `text` (class names), or both.")
        text_keys = set(MaftProcessorKwargs.__annotations__["text_kwargs"].__annotations__)
        image_keys = set(self.image_processor.valid_kwargs.__annotations__)
        unknown = sorted(set(kwargs) - text_keys - image_keys - {"text_kwargs", "images_kwargs"})
        if unknown:
            raise TypeError(
                f"MaftProcessor got unknown keyword arguments {unknown}: give the image processor's "
                f"({', '.join(sorted(image_keys))}) or the tokenizer's ({', '.join(sorted(text_keys))})."
            )
        routed = self._merge_kwargs(MaftProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        data = {}
        if images is not None:
            images_kwargs = {**routed["images_kwargs"], "return_tensors": return_tensors}
            data.update(self.image_processor(images, segmentation_maps=segmentation_maps, **images_kwargs))
        if text is not None:
            data.update(self.tokenize_class_names(text, **{**routed["text_kwargs"], "return_tensors": return_tensors}))
        return BatchFeature(data=data)

    def tokenize_class_names(
        self, text: Sequence[str] | Sequence[Sequence[str]], return_tensors: str | None = "pt", **tokenizer_kwargs
    ) -> BatchFeature:
        """Class names (one list, or one list per image) -> `input_ids` and `attention_mask` of all their prompts.
        Names that differ only in case or whitespace, or whose prompts the tokenizer truncates to the same tokens,
        are refused: they would tie."""
        per_image = isinstance(text, (list, tuple)) and len(text) > 0 and all(isinstance(names, (list, tuple)) for names in text)
        vocabularies = [list(names) for names in text] if per_image else [text]
        for vocabulary in vocabularies:
            self._check_class_names(vocabulary)
        if len({len(vocabulary) for vocabulary in vocabularies}) > 1:
            raise ValueError("With one list of class names per image, every list must have the same number of names.")
        num_classes, num_templates = len(vocabularies[0]), len(self.prompt_templates)
        prompts = [template.format(name) for vocabulary in vocabularies for name in vocabulary for template in self.prompt_templates]
        tokens = self.tokenizer(prompts, **{"padding": True, "truncation": True, **tokenizer_kwargs, "return_tensors": "np"})
        shape = (len(vocabularies), num_classes, num_templates, -1)
        input_ids, attention_mask = tokens["input_ids"].reshape(shape), tokens["attention_mask"].reshape(shape)
        for vocabulary, class_ids in zip(vocabularies, input_ids):
            self._check_distinct_after_truncation(vocabulary, class_ids)
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if not per_image:
            data = {key: value[0] for key, value in data.items()}
        return BatchFeature(data=data, tensor_type=return_tensors)

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
        seen = {}
        for name in names:
            key = " ".join(name.split()).casefold()
            if key in seen:
                raise ValueError(f"Class names {seen[key]!r} and {name!r} differ only in case or whitespace: give each class once.")
            seen[key] = name

    def _check_distinct_after_truncation(self, names: list[str], class_ids: np.ndarray) -> None:
        """`class_ids` (num_classes, num_templates, length): two classes with the same tokens in every prompt tie."""
        seen = {}
        for name, ids in zip(names, class_ids):
            key = ids.tobytes()
            if key in seen:
                raise ValueError(
                    f"Class names {seen[key]!r} and {name!r} become the same prompts once the tokenizer truncates them to "
                    f"{self.tokenizer.model_max_length} tokens: shorten them so that they differ early on."
                )
            seen[key] = name

    def post_process_semantic_segmentation(self, *args, **kwargs) -> list:
        """See [`MaftImageProcessor.post_process_semantic_segmentation`]."""
        return self.image_processor.post_process_semantic_segmentation(*args, **kwargs)


AutoImageProcessor.register(MaftConfig, MaftImageProcessor, exist_ok=True)
AutoProcessor.register(MaftConfig, MaftProcessor, exist_ok=True)
# save_pretrained writes this file and an `auto_map` beside the processor config, so transformers alone loads them.
MaftImageProcessor.register_for_auto_class("AutoImageProcessor")
MaftProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["VILD_PROMPT_TEMPLATES", "MaftImageProcessor", "MaftProcessor", "to_rgb_array"]
