"""The `zero-shot-image-segmentation` pipeline: `pipeline("zero-shot-image-segmentation", model=path_or_hub_id)`
segments images into any list of class names, with the output format of transformers' `image-segmentation`."""

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline

from .configuration_maft import HUB_PIPELINE_TASK as HUB_TASK
from .configuration_maft import PIPELINE_TASK as TASK
from .inference import encode_vocabulary, post_process_objects
from .processing_maft import ImageLike, to_image_masks, to_rgb_array


SUBTASKS = ("semantic", "instance", "panoptic")
# of instance and panoptic post-processing (left out: the processor's defaults); semantic segmentation has none
THRESHOLDS = ("threshold", "mask_threshold", "overlap_mask_area_threshold")


def check_candidate_labels(candidate_labels: Any) -> tuple[str, ...]:
    """The candidate labels as a tuple (the text-embedding cache key); refuses anything but a non-empty list of names."""
    if not isinstance(candidate_labels, (list, tuple)) or not candidate_labels:
        raise ValueError(
            f"`candidate_labels` must be a non-empty list of class names, e.g. candidate_labels=['cat', 'sky'], "
            f"got {candidate_labels!r}"
        )
    return tuple(candidate_labels)


class ZeroShotImageSegmentationPipeline(Pipeline):
    """
    Segments images into any class names with a MAFT model: every pixel gets the candidate label it shows best, or
    (`subtask="instance"` / `"panoptic"`) objects are found as separate instances.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> import maft  # any of its classes registers the task, e.g. `from maft import MaftModel`

    >>> segmenter = pipeline("zero-shot-image-segmentation", model=path_or_hub_id)
    >>> segments = segmenter("street.jpg", candidate_labels=["car", "road", "tree", "sky"])
    >>> segments[0]["label"], segments[0]["score"], segments[0]["mask"].size
    ('road', 0.61, (640, 480))
    ```

    Images: PIL images, paths or arrays (anything `MaftImageProcessor` reads), one or a list. Per image the output is a
    list of `{"label", "score", "mask"}`, one per candidate label that labels at least one pixel, in the order of
    `candidate_labels`: `mask` is a PIL "L" image of the input's size, 255 on the class's pixels and 0 elsewhere (the
    masks of one image are disjoint and cover it); `score` is the class's mean probability over those pixels, its
    per-pixel class score (`post_process_semantic_segmentation`'s `scores`) divided by the sum over all candidate labels.

    `subtask` (as in transformers' `image-segmentation` pipeline) chooses what a segment is:
    - `"semantic"` (default): as above, one segment per class present.
    - `"instance"`: one segment per object found (`MaftImageProcessor.post_process_instance_segmentation`), best
      first; `score` is the instance's score (class probability x mask quality). Masks are disjoint but need not
      cover the image. Classes in `stuff_labels` have no instances.
    - `"panoptic"`: thing instances and one segment per stuff class present
      (`MaftImageProcessor.post_process_panoptic_segmentation`); `stuff_labels` (some of `candidate_labels`) are the
      stuff classes, fused into one segment each; without them every class is a thing. `score` is the segment's
      class probability. Masks are disjoint but need not cover the image.
    Instance and panoptic take `threshold`, `mask_threshold` and `overlap_mask_area_threshold` (defaults 0.5, 0.5,
    0.8: the processor's) as the processor's functions do.

    With `masks` (per image, masks at its size: a (K, H, W) array or tensor or a list of PIL "L" images, e.g.
    Segment Anything's; for a list of images, a list with one entry per image), the pipeline names those masks instead
    of finding its own (`MaftModel.classify_masks`): per image one `{"label", "score", "mask"}` per given mask, in the
    given order, where `score` is the label's probability for that mask and `mask` the given mask as an "L" image.
    With `subtask="semantic"` the masks' class probabilities are combined into a label map as MAFT combines its
    proposals (`score[c] = sum_k p[k, c] * mask_k`, argmax), and the output is per label as without masks; pixels no
    mask covers belong to no segment. (Instances and panoptic segments of given masks: `maft segment --proposals`.)

    The candidate labels' text embeddings are computed once per vocabulary and kept in the pipeline. With
    `batch_size > 1`, the model still segments each image at its own padded size, so batching changes no image's
    answer.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model_type = getattr(self.model.config, "model_type", None)
        if model_type != "maft":
            raise ValueError(f"the {TASK} pipeline runs MAFT models (model_type 'maft'), got a {model_type!r} model")
        if self.processor is None or not hasattr(self.processor, "tokenize_class_names"):
            raise ValueError(f"the {TASK} pipeline needs the model's MaftProcessor: pass `processor=`")
        self._text_embeds_cache: dict[tuple[str, ...], torch.Tensor] = {}

    def __call__(self, images: ImageLike | Sequence[ImageLike], **kwargs: Any) -> list[dict] | list[list[dict]]:
        """
        Segments `images` (one, or a list: then one result per image) into `candidate_labels` (a non-empty list of
        class names, given here or when the pipeline is created). `subtask`, `stuff_labels`, `threshold`,
        `mask_threshold`, `overlap_mask_area_threshold`: see the class docstring, which also describes the output.
        """
        if kwargs.get("candidate_labels") is None and "candidate_labels" not in self._forward_params:
            raise ValueError("give the class names to segment into: candidate_labels=['cat', 'sky', ...]")
        images = list(images) if isinstance(images, tuple) else images
        masks = kwargs.pop("masks", None)
        if masks is not None:  # each image goes through the pipeline with its own masks
            if isinstance(images, list):
                if not isinstance(masks, (list, tuple)) or len(masks) != len(images):
                    raise ValueError(f"for a list of {len(images)} images, `masks` must be a list with one entry (that image's masks) per image")
                images = [{"image": image, "masks": image_masks} for image, image_masks in zip(images, masks)]
            else:
                images = {"image": images, "masks": masks}
        return super().__call__(images, **kwargs)

    def _sanitize_parameters(
        self, candidate_labels: Any = None, subtask: str | None = None, stuff_labels: Any = None, **kwargs
    ):
        unknown = sorted(set(kwargs) - set(THRESHOLDS))
        if unknown:
            raise TypeError(
                f"the {TASK} pipeline takes `candidate_labels`, `subtask`, `stuff_labels` and "
                f"{', '.join(f'`{name}`' for name in THRESHOLDS)}, got {unknown}"
            )
        postprocess_params = dict(kwargs)
        if subtask is not None:
            if subtask not in SUBTASKS:
                raise ValueError(f"`subtask` must be one of {', '.join(SUBTASKS)}, got {subtask!r}")
            postprocess_params["subtask"] = subtask
        if stuff_labels is not None:
            if not isinstance(stuff_labels, (list, tuple)) or not all(isinstance(name, str) for name in stuff_labels):
                raise ValueError(f"`stuff_labels` must be a list of class names (some of `candidate_labels`), got {stuff_labels!r}")
            postprocess_params["stuff_labels"] = tuple(stuff_labels)
        if candidate_labels is None:
            return {}, {}, postprocess_params
        labels = check_candidate_labels(candidate_labels)
        return {}, {"candidate_labels": labels}, {**postprocess_params, "candidate_labels": labels}

    def preprocess(self, inputs: ImageLike | dict[str, Any]) -> dict[str, Any]:
        """The RGB array and its (height, width), and the masks given with it as (K, H, W) float32; the processor
        resizes and pads them per batch in `_forward`."""
        image = inputs["image"] if isinstance(inputs, dict) else inputs
        array = to_rgb_array(image, input_data_format="channels_last")
        model_inputs = {"image": array, "target_size": array.shape[:2]}
        if isinstance(inputs, dict):
            model_inputs["masks"] = to_image_masks(inputs["masks"], array.shape[:2])
        return model_inputs

    def text_embeddings(self, candidate_labels: tuple[str, ...]) -> torch.Tensor:
        """(num_labels, projection_dim) embeddings of `candidate_labels`, encoded on the first call for them only."""
        if candidate_labels not in self._text_embeds_cache:
            self._text_embeds_cache[candidate_labels] = encode_vocabulary(self.model, self.processor, candidate_labels)
        return self._text_embeds_cache[candidate_labels]

    def _forward(self, model_inputs: dict[str, Any], candidate_labels: tuple[str, ...]) -> dict[str, Any]:
        # One image comes as preprocess returned it (batch_size 1), a batch as a list per key (transformers' collation).
        batched = isinstance(model_inputs["image"], list)
        images = model_inputs["image"] if batched else [model_inputs["image"]]
        if "masks" in model_inputs:
            return self._name_masks(model_inputs, images, batched, candidate_labels)
        inputs = self.processor(images=images, input_data_format="channels_last", return_tensors="pt").to(self.device)
        outputs = self.model(**inputs, text_embeds=self.text_embeddings(candidate_labels))
        # Tensors of batch-first shape: the pipeline's iterator splits them per image for postprocess.
        return {
            "class_queries_logits": outputs.class_queries_logits,
            "masks_queries_logits": outputs.masks_queries_logits,
            "image_sizes": outputs.image_sizes,
            "padded_sizes": outputs.padded_sizes,
            "target_size": model_inputs["target_size"],
        }

    def _name_masks(self, model_inputs: dict[str, Any], images: list[np.ndarray], batched: bool, candidate_labels: tuple[str, ...]) -> dict[str, Any]:
        """IP-CLIP's names of the given masks (`MaftModel.classify_masks`), padded to the batch's most masks."""
        masks = model_inputs["masks"] if batched else [model_inputs["masks"]]
        inputs = self.processor(images=images, masks=masks, input_data_format="channels_last", return_tensors="pt").to(self.device)
        outputs = self.model.classify_masks(**inputs, text_embeds=self.text_embeddings(candidate_labels))
        return {
            "class_logits": outputs.class_logits,
            "real_masks": outputs.real_masks,
            # (1, K, H, W) per image, as the pipeline's iterator gives the arrays of a batch
            "masks": model_inputs["masks"] if batched else model_inputs["masks"][None],
            "target_size": model_inputs["target_size"],
        }

    def postprocess(
        self,
        model_outputs: dict[str, Any],
        candidate_labels: tuple[str, ...],
        subtask: str | None = None,
        stuff_labels: tuple[str, ...] = (),
        **thresholds: float,
    ) -> list[dict[str, Any]]:
        if "class_logits" in model_outputs:
            if subtask not in (None, "semantic") or stuff_labels or thresholds:
                raise ValueError("with `masks`, `subtask` is 'semantic' or not given (one segment per mask), without "
                                 "`stuff_labels` or thresholds")
            return self.named_masks(model_outputs, candidate_labels, subtask)
        subtask = subtask or "semantic"
        # What post-processing reads of a MaftModelOutput (this file does not import the model's: modeling_maft.py
        # imports it, to save it with the model).
        outputs = SimpleNamespace(
            class_queries_logits=model_outputs["class_queries_logits"].float(),
            masks_queries_logits=model_outputs["masks_queries_logits"].float(),
            image_sizes=model_outputs["image_sizes"],
            padded_sizes=model_outputs["padded_sizes"],
        )
        if subtask == "semantic":
            if stuff_labels or thresholds:
                given = sorted(thresholds) + (["stuff_labels"] if stuff_labels else [])
                raise ValueError(f"{', '.join(given)} apply to subtask 'instance' or 'panoptic', not 'semantic'")
            return self.semantic_segments(outputs, model_outputs["target_size"], candidate_labels)
        stuff_ids = stuff_label_ids(stuff_labels, candidate_labels)
        (result,) = post_process_objects(
            self.processor, outputs, subtask, [model_outputs["target_size"]], stuff_ids, **thresholds
        )
        segmentation = result["segmentation"]
        return [
            {"label": candidate_labels[segment["label_id"]], "score": segment["score"], "mask": mask_image(segmentation == segment["id"])}
            for segment in result["segments_info"]
        ]

    def semantic_segments(self, outputs, target_size: tuple[int, int], candidate_labels: tuple[str, ...]) -> list[dict[str, Any]]:
        """One segment per candidate label present, scored by its mean probability over its pixels."""
        (result,) = self.processor.post_process_semantic_segmentation(
            outputs, target_sizes=[target_size], return_segmentation_scores=True
        )
        return label_segments(result["segmentation"], result["segmentation_scores"], candidate_labels)

    def named_masks(self, model_outputs: dict[str, Any], candidate_labels: tuple[str, ...], subtask: str | None) -> list[dict[str, Any]]:
        """One `{"label", "score", "mask"}` per given mask, or with `subtask="semantic"` per label of the masks' label map."""
        outputs = SimpleNamespace(class_logits=model_outputs["class_logits"].float(), real_masks=model_outputs["real_masks"])
        (names,) = self.processor.post_process_mask_classification(outputs)
        masks = torch.from_numpy(model_outputs["masks"][0])
        if subtask == "semantic":
            if not names:
                return []
            scores = torch.einsum("kc,khw->chw", torch.stack([name["scores"].cpu() for name in names]), masks)
            segmentation = torch.where(masks.sum(dim=0) > 0, scores.argmax(dim=0), -1)
            return label_segments(segmentation, scores, candidate_labels)
        return [
            {"label": candidate_labels[name["label_id"]], "score": name["score"], "mask": Image.fromarray((mask * 255).round().byte().numpy())}
            for name, mask in zip(names, masks)
        ]


def label_segments(segmentation: torch.Tensor, scores: torch.Tensor, candidate_labels: tuple[str, ...]) -> list[dict[str, Any]]:
    """One `{"label", "score", "mask"}` per label of the (H, W) `segmentation` (-1: no label), scored by the label's
    mean probability (its `scores` (C, H, W) divided by their sum over labels) over its pixels."""
    probabilities = scores / scores.sum(dim=0, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    segments = []
    for index, label in enumerate(candidate_labels):
        pixels = segmentation == index
        if pixels.any():
            segments.append({"label": label, "score": probabilities[index][pixels].mean().item(), "mask": mask_image(pixels)})
    return segments


def stuff_label_ids(stuff_labels: tuple[str, ...], candidate_labels: tuple[str, ...]) -> set[int]:
    """The indices of `stuff_labels` in `candidate_labels`; names that are not candidate labels are refused."""
    missing = [name for name in stuff_labels if name not in candidate_labels]
    if missing:
        raise ValueError(f"`stuff_labels` must be among `candidate_labels` {list(candidate_labels)}; not there: {missing}")
    return {candidate_labels.index(name) for name in stuff_labels}


def mask_image(pixels: torch.Tensor) -> Image.Image:
    """A (H, W) bool tensor as a PIL "L" image, 255 on its pixels and 0 elsewhere."""
    return Image.fromarray(pixels.cpu().numpy().astype(np.uint8) * 255)


def custom_pipelines() -> dict[str, dict[str, Any]]:
    """The `custom_pipelines` of a saved model's config (the format of `Pipeline.save_pretrained`): the pipeline's
    class in this file, which the model folder carries, so that `pipeline(...)` finds it as remote code. It serves
    "image-segmentation" too, the Hub task that model cards name (the Hub has no zero-shot segmentation task), so the
    Hub's own `pipeline("image-segmentation", model=repo, trust_remote_code=True)` snippet runs it."""
    implementation = f"{__name__.rsplit('.', 1)[-1]}.{ZeroShotImageSegmentationPipeline.__name__}"
    return {task: {"impl": implementation, "pt": ["AutoModel"], "type": "multimodal"} for task in (TASK, HUB_TASK)}
