"""Image processor and processor for MAFT: images in, model inputs out, and post-processing into semantic, instance and
panoptic segmentations."""

import math
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, TypedDict

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

# Masks to name are brought to the CLIP view this many at a time (bounding the masks held at the resized size).
MASKS_PER_CHUNK = 32


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


MaskLike = np.ndarray | torch.Tensor | Sequence[Image.Image | np.ndarray | torch.Tensor]


def to_mask_array(masks: MaskLike, name: str = "masks") -> np.ndarray:
    """
    One image's masks -> (num_masks, H, W) float32 in [0, 1]. `masks` is a (num_masks, H, W) array or tensor, or a
    list of (H, W) masks (PIL images of mode "1" or "L", arrays, tensors); an empty list is no masks. Booleans and
    floats in [0, 1] are taken as they are (soft masks stay soft); 8-bit data (integers, "L" images) holding only 0
    and 1 is binary, otherwise on the 0-255 scale of an "L" image. `name` is how errors call the masks.
    """
    if isinstance(masks, (list, tuple)):
        if not masks:
            return np.zeros((0, 0, 0), dtype=np.float32)
        planes = [mask_plane(mask, f"{name}[{index}]") for index, mask in enumerate(masks)]
        if len({plane.shape for plane in planes}) > 1:
            raise ValueError(f"{name} must all have one size, got {sorted({plane.shape[::-1] for plane in planes})} (width, height).")
        array = np.stack(planes)
    else:
        array = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
        if array.ndim != 3:
            raise ValueError(
                f"{name} must be (num_masks, height, width) or a list of (height, width) masks, got shape {array.shape}; "
                "give a single mask as mask[None] or [mask]."
            )
    return mask_values(array, name)


def to_image_masks(masks: MaskLike, image_size: tuple[int, int], name: str = "the masks") -> np.ndarray:
    """An image's masks (`to_mask_array`), which must have the image's (height, width): (num_masks, H, W) float32."""
    array = to_mask_array(masks, name)
    if array.shape[0] == 0:
        return np.zeros((0, *image_size), dtype=np.float32)
    if array.shape[1:] != tuple(image_size):
        raise ValueError(
            f"{name[:1].upper()}{name[1:]} are {array.shape[2]}x{array.shape[1]} but the image is {image_size[1]}x"
            f"{image_size[0]} (width x height): give masks at the size of their image."
        )
    return array


def mask_plane(mask, name: str) -> np.ndarray:
    """One (H, W) mask as an array (PIL images of mode "1" or "L", arrays, tensors)."""
    if isinstance(mask, Image.Image):
        if mask.mode not in ("1", "L"):
            raise ValueError(f"{name} is a PIL image of mode {mask.mode!r}; masks are mode '1' or 'L' (convert('L')).")
        return np.asarray(mask)
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{name} must be one (height, width) mask, got shape {array.shape}.")
    return array


def mask_values(array: np.ndarray, name: str) -> np.ndarray:
    """(num_masks, H, W) booleans, integers or floats -> float32 in [0, 1] (see `to_mask_array`)."""
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{name} hold NaN or infinite values.")
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError(
                f"{name} hold values in [{array.min():.3g}, {array.max():.3g}]; float masks are probabilities in [0, 1] "
                "(apply a sigmoid to logits, or threshold them)."
            )
        return array.astype(np.float32)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold booleans or numbers, got dtype {array.dtype}.")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"{name} hold integers in [{array.min()}, {array.max()}]; integer masks hold 0 and 1, or 0-255.")
    scale = 1.0 if array.max(initial=0) <= 1 else 255.0
    return (array / scale).astype(np.float32)


def as_list(inputs, single_ndim: int) -> list:
    """One input or a batch (a list, or an array or tensor with one more dimension than a single input) -> a list."""
    if isinstance(inputs, (list, tuple)):
        return list(inputs)
    if isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == single_ndim + 1:
        return list(inputs)
    return [inputs]


def pad_mask_sets(data: dict[str, list[np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """Per-image `masks` (num_masks, h, w) and `real_masks` (num_masks,) padded with empty, unreal masks to the most
    masks of any image, so that they stack; other keys unchanged."""
    most = max(len(masks) for masks in data["masks"])
    padding = [most - len(masks) for masks in data["masks"]]
    return {
        **data,
        "masks": [np.pad(masks, ((0, extra), (0, 0), (0, 0))) for masks, extra in zip(data["masks"], padding)],
        "real_masks": [np.pad(real, (0, extra)) for real, extra in zip(data["real_masks"], padding)],
    }


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

    model_input_names = ["pixel_values", "pixel_mask", "clip_pixel_values", "image_sizes", "clip_view_sizes", "masks", "real_masks"]
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

    def preprocess(
        self, images, segmentation_maps=None, masks=None, return_tensors: str | TensorType | None = "pt", **kwargs
    ) -> BatchFeature:
        """
        Images (a path, PIL image, (H, W[, 3]) or (3, H, W) array or tensor, a list of those, or a 4-D batch) and
        optional label maps -> `pixel_values` (B, 3, H, W), `pixel_mask` (B, H, W), `clip_pixel_values`
        (B, 3, clip_image_size, clip_image_size), `image_sizes` (B, 2) (and `labels` (B, H, W)). `return_tensors`:
        "pt" (the default) or "np" for stacked arrays, None for lists of per-image arrays.

        With `masks` (per image, masks at the image's size to name with `MaftModel.classify_masks`; see
        `to_mask_array` for what they may be; for a batch, a list with one entry per image), the inputs of
        `classify_masks` instead: `clip_pixel_values`, `masks` (B, num_masks, clip_image_size, clip_image_size), each
        mask brought to the CLIP view as its image is (resized, zero-padded, resized to the square), and `real_masks`
        (B, num_masks), False where an image with fewer masks than the batch's most is padded with empty masks.
        """
        self._refuse_unknown_keys(kwargs)
        image_like_kwargs = {"segmentation_maps": segmentation_maps, "masks": masks}
        return super().preprocess(images, image_like_kwargs=image_like_kwargs, return_tensors=return_tensors, **kwargs)

    def _preprocess_image_like_inputs(self, images, segmentation_maps=None, masks=None, input_data_format=None, **kwargs) -> BatchFeature:
        batched = isinstance(images, (list, tuple)) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4)
        images = [to_rgb_array(image, f"image {index}", input_data_format) for index, image in enumerate(as_list(images, 3))]
        if not images:
            raise ValueError("No images given.")
        if masks is not None:
            if segmentation_maps is not None:
                raise ValueError("Give `segmentation_maps` (training and evaluation) or `masks` (to name them), not both.")
            masks = self._masks_of_each_image(masks, images, batched)
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
        return self._preprocess(images, segmentation_maps, masks, **kwargs)

    @staticmethod
    def _masks_of_each_image(masks, images: list[np.ndarray], batched: bool) -> list[np.ndarray]:
        """Each image's masks as (num_masks, H, W) float32 of its size (`to_mask_array`); for a batch of images,
        `masks` holds one entry per image."""
        if batched:
            if not isinstance(masks, (list, tuple)) and not (isinstance(masks, (np.ndarray, torch.Tensor)) and masks.ndim == 4):
                raise ValueError("For a batch of images, `masks` must be a list with one entry (that image's masks) per image.")
            masks = list(masks)
            if len(masks) != len(images):
                raise ValueError(f"Got {len(images)} images but masks for {len(masks)}: give one entry of masks per image.")
        else:
            masks = [masks]
        return [to_image_masks(image_masks, image.shape[:2], f"the masks of image {index}")
                for index, (image_masks, image) in enumerate(zip(masks, images))]

    def _preprocess(
        self,
        images: list[np.ndarray],
        segmentation_maps: list[np.ndarray] | None,
        masks: list[np.ndarray] | None,
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
        sizes = [self.resized_size(*image.shape[:2], size) if do_resize else image.shape[:2] for image in images]
        if do_resize:
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
        clip_pixel_values = [self.clip_view(image, size, clip_image_size) for image, size in zip(clip_images, clip_view_sizes)]
        if masks is not None:
            masks = [self.masks_on_clip_view(*arguments, clip_image_size) for arguments in zip(masks, sizes, clip_view_sizes)]
            data = {"clip_pixel_values": clip_pixel_values, "masks": masks, "real_masks": [np.ones(len(m), dtype=bool) for m in masks]}
            if return_tensors is not None:
                data = {key: np.stack(values) for key, values in pad_mask_sets(data).items()}
            return BatchFeature(data=data, tensor_type=return_tensors)
        data = {
            "pixel_values": [pad_to(self.rescale_and_normalize(image, image_mean, image_std, **normalize), padded_size) for image in images],
            "pixel_mask": [pad_to(np.ones(image_size, dtype=np.int64), padded_size) for image_size in image_sizes],
            "clip_pixel_values": clip_pixel_values,
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

    @classmethod
    def masks_on_clip_view(
        cls, masks: np.ndarray, resized_size: tuple[int, int], view_size: tuple[int, int], clip_image_size: int
    ) -> np.ndarray:
        """
        An image's masks (num_masks, H, W) in [0, 1] as its CLIP view shows them: resized to the image's resized size
        as a float image is (`resize_image`), zero-padded to `view_size` and resized to the square CLIP input
        (`clip_view`) -> (num_masks, clip_image_size, clip_image_size). A few masks at a time, so that the masks at
        the resized size are never all held at once.
        """
        views = [np.zeros((0, clip_image_size, clip_image_size), dtype=np.float32)]
        for start in range(0, len(masks), MASKS_PER_CHUNK):
            chunk = masks[start : start + MASKS_PER_CHUNK]
            resized = resize_image(np.ascontiguousarray(chunk.transpose(1, 2, 0)), tuple(resized_size)).transpose(2, 0, 1)
            views.append(cls.clip_view(resized, view_size, clip_image_size))
        return np.concatenate(views)

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
        batch_size = outputs.masks_queries_logits.shape[0]
        target_sizes = checked_target_sizes(target_sizes, batch_size)
        results = []
        for index in range(batch_size):
            masks = self.proposal_masks(outputs, index)
            scores = torch.einsum("qc,qhw->chw", class_scores[index], masks)
            if target_sizes is None:
                segmentation = scores.argmax(dim=0)
            elif return_segmentation_scores:
                scores = resize_scores(scores, target_sizes[index])
                segmentation = scores.argmax(dim=0)
            else:
                segmentation = resized_argmax(scores, target_sizes[index]).long()
            if return_segmentation_scores:
                results.append(SemanticSegmentationPostProcessorOutput(data={"segmentation": segmentation, "segmentation_scores": scores}))
            else:
                results.append(segmentation)
        return results

    def post_process_mask_classification(self, outputs) -> list[list[dict[str, Any]]]:
        """
        The names of given masks (`MaftModel.classify_masks`): per image, per mask in the order given (padding
        dropped, by `outputs.real_masks`), `{"label_id": int, "score": float, "scores": (num_classes,) tensor}`, where
        `scores = softmax(class_logits[..., :-1])` (MAFT names its proposals without the no-object entry),
        `label_id` its argmax and `score` the probability of that class.
        """
        scores = outputs.class_logits[..., :-1].detach().float().softmax(dim=-1)
        real_masks = getattr(outputs, "real_masks", None)
        results = []
        for index, image_scores in enumerate(scores):
            if real_masks is not None:
                image_scores = image_scores[real_masks[index].to(image_scores.device)]
            best_scores, label_ids = image_scores.max(dim=-1)
            results.append(
                [
                    {"label_id": int(label_id), "score": float(score), "scores": mask_scores}
                    for label_id, score, mask_scores in zip(label_ids, best_scores, image_scores)
                ]
            )
        return results

    def proposal_masks(self, outputs, index: int, queries: torch.Tensor | None = None) -> torch.Tensor:
        """
        (Q, h, w) mask probabilities of image `index`'s proposals (all of them, or those `queries` indexes) over the
        image itself: mask logits upsampled to the padded input (bilinear, `align_corners=True`; to the image's own
        padded size where `outputs.padded_sizes` gives it), cropped to `outputs.image_sizes[index]` (h, w), sigmoid.
        """
        logits = outputs.masks_queries_logits[index]
        if queries is not None:
            logits = logits[queries]
        size = (logits.shape[-2] * self.mask_stride, logits.shape[-1] * self.mask_stride)
        padded_sizes = getattr(outputs, "padded_sizes", None)
        if padded_sizes is not None:
            size = tuple(int(value) for value in padded_sizes[index])
            logits = logits[..., : -(-size[0] // self.mask_stride), : -(-size[1] // self.mask_stride)]
        height, width = size
        if outputs.image_sizes is not None:
            height, width = (int(value) for value in outputs.image_sizes[index])
        if len(logits) == 0:  # interpolate refuses empty batches
            return logits.new_empty((0, height, width))
        masks = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=True)[0]
        return masks[:, :height, :width].sigmoid()

    def post_process_instance_segmentation(
        self,
        outputs,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        return_binary_maps: bool = False,
        stuff_label_ids: Collection[int] | None = None,
    ) -> list[dict]:
        """
        Instances of the classes (Mask2Former's instance inference, DESIGN.md §11), with the output of
        `Mask2FormerImageProcessor.post_process_instance_segmentation`.

        Per image: every (proposal, class) pair is scored by the proposal's class probability
        (`softmax(class_queries_logits)[..., :-1]`, MAFT's final scores as the semantic segmentation uses them; the
        no-object class is left out); the `num_queries` best pairs are the candidates, the classes in
        `stuff_label_ids` (not things: no instances of them) dropped. A candidate's mask is its proposal's
        probability `> mask_threshold`; its score is the class probability times the mean probability over that mask
        (mask quality); candidates scoring `>= threshold` are the instances, best first.

        Args:
            outputs ([`MaftModelOutput`]): `class_queries_logits`, `masks_queries_logits`, `image_sizes` (and
                `padded_sizes`) as [`MaftModel`] returns them.
            threshold (`float`, *optional*, defaults to 0.5): lowest score of an instance.
            mask_threshold (`float`, *optional*, defaults to 0.5): mask probability at which a pixel is the proposal's.
            overlap_mask_area_threshold (`float`, *optional*, defaults to 0.8): in the segmentation map, an instance
                that keeps less than this fraction of its mask (the rest lost to better-scoring overlapping
                instances) is dropped.
            target_sizes (`list[tuple[int, int]]`, *optional*): the (height, width) of each image's result; default:
                the image's size in the model input.
            return_binary_maps (`bool`, *optional*, defaults to `False`): return each instance's whole mask instead of
                a segmentation map (instances may then overlap, and none is dropped for overlapping).
            stuff_label_ids (`Collection[int]`, *optional*): classes that are stuff; none of their instances are kept.

        Returns:
            `list[dict]`, one per image:
            - **segmentation**: (H, W) int32 segment ids, -1 where no instance is (Mask2Former's convention: ids start
              at 0); each pixel goes to the instance with the largest `score * mask probability`, and only if that
              probability is `>= mask_threshold`. With `return_binary_maps=True`, the (num_instances, H, W) bool
              masks instead (`segmentation[i]` is the instance with id `i`).
            - **segments_info**: per instance `{"id", "label_id", "was_fused": False, "score"}`.
        """
        batch_size = outputs.masks_queries_logits.shape[0]
        target_sizes = checked_target_sizes(target_sizes, batch_size)
        stuff = torch.tensor(sorted(set(stuff_label_ids or ())), dtype=torch.long)
        results = []
        for index in range(batch_size):
            probabilities = outputs.class_queries_logits[index].softmax(dim=-1)[:, :-1]
            num_queries, num_classes = probabilities.shape
            class_scores, pairs = probabilities.flatten().topk(num_queries)
            queries, labels = pairs // num_classes, pairs % num_classes
            is_thing = ~torch.isin(labels, stuff.to(labels.device))
            class_scores, queries, labels = class_scores[is_thing], queries[is_thing], labels[is_thing]
            masks = self.proposal_masks(outputs, index, queries)
            in_mask = masks > mask_threshold
            mask_quality = (masks * in_mask).flatten(1).sum(1) / (in_mask.flatten(1).sum(1) + 1e-6)
            scores = class_scores * mask_quality
            kept = (scores >= threshold).nonzero()[:, 0]
            kept = kept[scores[kept].argsort(descending=True, stable=True)]
            masks, scores, labels = masks[kept], scores[kept], labels[kept]
            target_size = output_size(target_sizes, index, masks)
            if return_binary_maps:
                results.append(binary_instance_maps(masks, scores, labels, target_size, mask_threshold))
                continue
            segmentation, segments_info = compute_segments(
                masks, scores, labels, target_size, mask_threshold, overlap_mask_area_threshold, first_id=0
            )
            results.append({"segmentation": segmentation, "segments_info": segments_info})
        return results

    def post_process_panoptic_segmentation(
        self,
        outputs,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        label_ids_to_fuse: Collection[int] | None = None,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    ) -> list[dict]:
        """
        Panoptic segments: thing instances and one segment per stuff class (Mask2Former's panoptic inference,
        DESIGN.md §11), with the output of `Mask2FormerImageProcessor.post_process_panoptic_segmentation`.

        Per image: each proposal's label and score are the largest of its class probabilities
        (`softmax(class_queries_logits)`, MAFT's final scores as the semantic segmentation uses them, with the
        no-object class); proposals whose label is no-object or whose score is `<= threshold` are dropped. Each pixel
        goes to the kept proposal with the largest `score * mask probability`; a proposal's segment is the pixels it
        gets where its probability is `>= mask_threshold`. A proposal is dropped when it gets no such pixel, or gets
        fewer than `overlap_mask_area_threshold` times the pixels of its own mask (probability `>= mask_threshold`).

        Args:
            outputs ([`MaftModelOutput`]): `class_queries_logits`, `masks_queries_logits`, `image_sizes` (and
                `padded_sizes`) as [`MaftModel`] returns them.
            threshold (`float`, *optional*, defaults to 0.5): a proposal is kept when its score exceeds this.
            mask_threshold (`float`, *optional*, defaults to 0.5): mask probability at which a pixel is the proposal's.
            overlap_mask_area_threshold (`float`, *optional*, defaults to 0.8): smallest fraction of its mask a
                proposal must keep.
            label_ids_to_fuse (`Collection[int]`, *optional*): the stuff classes of this vocabulary: all proposals of
                one such class make one segment. Default: none, every class is a thing (each proposal its own segment).
            target_sizes (`list[tuple[int, int]]`, *optional*): the (height, width) of each image's result; default:
                the image's size in the model input.

        Returns:
            `list[dict]`, one per image:
            - **segmentation**: (H, W) int32 segment ids starting at 1; 0 where no segment is, also when no proposal
              is kept at all (Mask2Former gives -1 then; 0 is always "no segment" here, as in COCO panoptic files).
            - **segments_info**: per segment `{"id", "label_id", "was_fused", "score"}`: `was_fused` is whether the
              class is in `label_ids_to_fuse`; a fused segment's score is the best of its proposals'.
        """
        batch_size = outputs.masks_queries_logits.shape[0]
        target_sizes = checked_target_sizes(target_sizes, batch_size)
        num_classes = outputs.class_queries_logits.shape[-1] - 1
        best_scores, best_labels = outputs.class_queries_logits.softmax(dim=-1).max(dim=-1)
        results = []
        for index in range(batch_size):
            kept = (best_labels[index] != num_classes) & (best_scores[index] > threshold)
            masks = self.proposal_masks(outputs, index, kept.nonzero()[:, 0])
            segmentation, segments_info = compute_segments(
                masks, best_scores[index][kept], best_labels[index][kept], output_size(target_sizes, index, masks),
                mask_threshold, overlap_mask_area_threshold, label_ids_to_fuse=label_ids_to_fuse, first_id=1,
            )
            results.append({"segmentation": segmentation, "segments_info": segments_info})
        return results


def output_size(target_sizes: Sequence | torch.Tensor | None, index: int, masks: torch.Tensor) -> tuple[int, int]:
    """Image `index`'s `target_sizes` entry as (height, width) ints; without target sizes, the size of `masks`."""
    if target_sizes is None:
        return tuple(masks.shape[-2:])
    return tuple(int(value) for value in target_sizes[index])


@torch.no_grad()
def compute_segments(
    mask_probs: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    size: tuple[int, int],
    mask_threshold: float,
    overlap_mask_area_threshold: float,
    label_ids_to_fuse: Collection[int] | None = None,
    first_id: int = 1,
) -> tuple[torch.Tensor, list[dict]]:
    """
    Non-overlapping segments of proposals (Q, h, w) with `scores` and `labels` (Q,) at `size` (H, W), by Mask2Former's
    rule (see `post_process_panoptic_segmentation`): the (H, W) int32 map of segment ids (`first_id`, `first_id + 1`,
    ...; `first_id - 1` where no segment is) and each segment's info. The proposals' probabilities are resized to
    `size` (bilinear, `align_corners=False`) a chunk at a time, never all of them at once.
    """
    fused_labels = set(label_ids_to_fuse or ())
    nothing = first_id - 1
    num_proposals = mask_probs.shape[0]
    if num_proposals == 0:
        return torch.full(size, nothing, dtype=torch.int32, device=mask_probs.device), []
    assigned = resized_argmax(mask_probs, size, weights=scores).long()
    original_areas = torch.zeros(num_proposals, dtype=torch.long, device=mask_probs.device)
    in_own_mask = torch.zeros(size, dtype=torch.bool, device=mask_probs.device)  # the pixel's proposal's probability >= mask_threshold
    for start, resized in resized_chunks(mask_probs, size):
        above = resized >= mask_threshold
        original_areas[start : start + len(above)] = above.flatten(1).sum(1)
        in_chunk = (assigned >= start) & (assigned < start + len(above))
        local = (assigned - start).clamp(0, len(above) - 1)
        in_own_mask |= in_chunk & above.gather(0, local[None])[0]
    assigned_areas = torch.bincount(assigned.flatten(), minlength=num_proposals).tolist()
    segment_areas = torch.bincount(assigned[in_own_mask], minlength=num_proposals).tolist()
    original_areas = original_areas.tolist()

    segment_of_proposal = [nothing] * num_proposals
    segments_info, fused_segments = [], {}
    for proposal, (label, score) in enumerate(zip(labels.tolist(), scores.tolist())):
        if original_areas[proposal] == 0 or segment_areas[proposal] == 0:
            continue
        if assigned_areas[proposal] / original_areas[proposal] < overlap_mask_area_threshold:
            continue
        if label in fused_segments:
            segment = fused_segments[label]
            segment["score"] = max(segment["score"], score)
        else:
            segment = {"id": first_id + len(segments_info), "label_id": label, "was_fused": label in fused_labels, "score": score}
            segments_info.append(segment)
            if label in fused_labels:
                fused_segments[label] = segment
        segment_of_proposal[proposal] = segment["id"]
    segment_ids = torch.tensor(segment_of_proposal, dtype=torch.int32, device=mask_probs.device)
    segmentation = torch.where(in_own_mask, segment_ids[assigned], torch.tensor(nothing, dtype=torch.int32, device=mask_probs.device))
    return segmentation, segments_info


@torch.no_grad()
def binary_instance_maps(
    mask_probs: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, size: tuple[int, int], mask_threshold: float
) -> dict:
    """The instances (Q, h, w) as (N, H, W) bool masks at `size` (probability resized bilinearly, `> mask_threshold`),
    those left empty at `size` dropped, with their infos (ids 0 to N - 1)."""
    masks = torch.cat([resized > mask_threshold for _, resized in resized_chunks(mask_probs, size)]) if len(mask_probs) else (
        torch.zeros((0, *size), dtype=torch.bool, device=mask_probs.device)
    )
    present = masks.flatten(1).any(dim=1)
    segments_info = [
        {"id": instance, "label_id": label, "was_fused": False, "score": score}
        for instance, (label, score) in enumerate(zip(labels[present].tolist(), scores[present].tolist()))
    ]
    return {"segmentation": masks[present], "segments_info": segments_info}


def checked_target_sizes(
    target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None, batch_size: int
) -> list[tuple[int, int]] | None:
    """`target_sizes` as one (height, width) of Python ints per image; a count that is not the batch's, or a size that
    is not two positive values, is refused naming it."""
    if target_sizes is None:
        return None
    if len(target_sizes) != batch_size:
        raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {batch_size} images.")
    sizes = [tuple(int(value) for value in size) for size in target_sizes]
    for index, size in enumerate(sizes):
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"The target size of image {index} must be (height, width), both at least 1, got {size}.")
    return sizes


def resize_scores(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) -> (C, height, width), bilinear (`align_corners=False`); each class is resized on its own."""
    return F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]


def resized_chunks(scores: torch.Tensor, size: tuple[int, int]) -> Iterator[tuple[int, torch.Tensor]]:
    """`(start, resize_scores(scores[start : start + n], size))` for consecutive chunks of `scores` (C, h, w) that hold
    at most `POSTPROCESS_CHUNK_ELEMENTS` elements once resized (at least one class each); not resized at the same size."""
    height, width = size
    per_chunk = max(1, POSTPROCESS_CHUNK_ELEMENTS // (height * width))
    same_size = tuple(scores.shape[-2:]) == tuple(size)  # bilinear resizing to the same size is the identity
    for start in range(0, scores.shape[0], per_chunk):
        chunk = scores[start : start + per_chunk]
        yield start, chunk if same_size else resize_scores(chunk, size)


@torch.no_grad()
def resized_argmax(scores: torch.Tensor, size: tuple[int, int], weights: torch.Tensor | None = None) -> torch.Tensor:
    """
    `(resize_scores(scores, size) * weights[:, None, None]).argmax(dim=0)` as int32 (no weights: 1), equal to it (the
    first class wins ties) without the (C, height, width) map: classes are resized a chunk at a time, each chunk's
    maximum (taken a band of rows at a time, to keep its indices small) merged into a running one.
    """
    if weights is None and tuple(scores.shape[-2:]) == tuple(size):
        return scores.argmax(dim=0).int()
    height, width = size
    rows_per_band = max(1, POSTPROCESS_BAND_PIXELS // width)
    best = torch.full(size, float("-inf"), dtype=scores.dtype, device=scores.device)
    labels = torch.zeros(size, dtype=torch.int32, device=scores.device)
    for start, resized in resized_chunks(scores, size):
        if weights is not None:
            resized = resized * weights[start : start + len(resized), None, None]
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

    def __call__(
        self, images=None, text=None, segmentation_maps=None, masks=None, return_tensors: str | None = "pt", **kwargs
    ) -> BatchFeature:
        """
        `images` (and their `segmentation_maps`, or their `masks` to name) as [`MaftImageProcessor`] prepares them,
        and `text` (class names) as `tokenize_class_names` does.
        """
        if images is None and text is None:
            raise ValueError("Give `images`, `text` (class names), or both.")
        if images is None and masks is not None:
            raise ValueError("`masks` need their `images`: give both.")
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
            data.update(self.image_processor(images, segmentation_maps=segmentation_maps, masks=masks, **images_kwargs))
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

    def post_process_mask_classification(self, *args, **kwargs) -> list:
        """See [`MaftImageProcessor.post_process_mask_classification`]."""
        return self.image_processor.post_process_mask_classification(*args, **kwargs)

    def post_process_instance_segmentation(self, *args, **kwargs) -> list[dict]:
        """See [`MaftImageProcessor.post_process_instance_segmentation`]."""
        return self.image_processor.post_process_instance_segmentation(*args, **kwargs)

    def post_process_panoptic_segmentation(self, *args, **kwargs) -> list[dict]:
        """See [`MaftImageProcessor.post_process_panoptic_segmentation`]."""
        return self.image_processor.post_process_panoptic_segmentation(*args, **kwargs)


AutoImageProcessor.register(MaftConfig, MaftImageProcessor, exist_ok=True)
AutoProcessor.register(MaftConfig, MaftProcessor, exist_ok=True)
# save_pretrained writes this file and an `auto_map` beside the processor config, so transformers alone loads them.
MaftImageProcessor.register_for_auto_class("AutoImageProcessor")
MaftProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["VILD_PROMPT_TEMPLATES", "MaftImageProcessor", "MaftProcessor", "to_image_masks", "to_mask_array", "to_rgb_array"]
