"""The `zero-shot-image-segmentation` pipeline on the bundled model and its example scenes."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from maft import ZeroShotImageSegmentationPipeline
from maft.inference import encode_vocabulary, segment_image
from maft.cli.model_loading import default_model_path


LABELS = ["checkered wall", "dotted floor", "dotted grass", "striped water", "red circle"]
EXAMPLES = default_model_path().parent / "examples"


@pytest.fixture(scope="module")
def segmenter():
    return pipeline("zero-shot-image-segmentation", model=str(default_model_path()), device="cpu")


def scene(index: int) -> Image.Image:
    with Image.open(EXAMPLES / f"scene-{index}.png") as image:
        return image.convert("RGB")


def label_map_of(segments: list[dict], labels: list[str]) -> np.ndarray:
    """The (H, W) label indices that the segments' masks draw, after checking they are disjoint and cover the image."""
    masks = np.stack([np.asarray(segment["mask"]) for segment in segments])
    assert set(np.unique(masks)) <= {0, 255}
    assert ((masks == 255).sum(axis=0) == 1).all(), "the masks must be disjoint and cover the image"
    indices = np.array([labels.index(segment["label"]) for segment in segments])
    return indices[(masks == 255).argmax(axis=0)]


def check_segments(segments: list[dict], image: Image.Image, labels: list[str]) -> None:
    found = [segment["label"] for segment in segments]
    assert found, "every image has at least one class"
    assert found == sorted(set(found), key=labels.index), "each class present once, in the order of the labels"
    for segment in segments:
        assert set(segment) == {"label", "score", "mask"}
        assert segment["mask"].mode == "L" and segment["mask"].size == image.size
        assert 0.0 < segment["score"] <= 1.0


def test_one_image_gives_the_models_label_map_as_masks(segmenter):
    image = scene(4)
    segments = segmenter(str(EXAMPLES / "scene-4.png"), candidate_labels=LABELS)
    check_segments(segments, image, LABELS)
    model, processor = segmenter.model, segmenter.processor
    expected = segment_image(model, processor, image, encode_vocabulary(model, processor, LABELS))
    np.testing.assert_array_equal(label_map_of(segments, LABELS), expected)
    assert [segment["label"] for segment in segments] == ["checkered wall", "dotted floor", "dotted grass"]  # as docs/pipeline.md shows


def test_several_images_of_any_kind_give_one_list_each(segmenter):
    images = [scene(0), str(EXAMPLES / "scene-1.png"), np.asarray(scene(2).resize((120, 80)))]
    results = segmenter(images, candidate_labels=LABELS)
    assert len(results) == 3
    sizes = [(96, 96), (96, 96), (120, 80)]
    for segments, size in zip(results, sizes):
        check_segments(segments, Image.new("RGB", size), LABELS)
        label_map_of(segments, LABELS)


def test_the_vocabulary_is_encoded_once_per_pipeline(segmenter):
    fresh = ZeroShotImageSegmentationPipeline(model=segmenter.model, processor=segmenter.processor, device="cpu")
    calls = []
    hook = fresh.model.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        first = fresh(scene(0), candidate_labels=LABELS)
        fresh([scene(1), scene(2)], candidate_labels=list(LABELS))
        again = fresh(scene(0), candidate_labels=tuple(LABELS))
        assert len(calls) == 1
        fresh(scene(0), candidate_labels=LABELS[:2])
        assert len(calls) == 2
    finally:
        hook.remove()
    assert [segment["label"] for segment in again] == [segment["label"] for segment in first]


def test_batches_segment_like_single_images(segmenter):
    images = [scene(index) for index in range(5)]
    images[1] = images[1].resize((2 * images[1].width, images[1].height))  # padding the others in its batch
    images[4] = images[4].resize((images[4].width // 2, images[4].height))
    one_by_one = segmenter(images, candidate_labels=LABELS, batch_size=1)
    in_pairs = segmenter(images, candidate_labels=LABELS, batch_size=2)
    for single, batched in zip(one_by_one, in_pairs, strict=True):
        np.testing.assert_array_equal(label_map_of(batched, LABELS), label_map_of(single, LABELS))
        np.testing.assert_allclose([s["score"] for s in batched], [s["score"] for s in single], rtol=1e-4)


def test_dtype_and_device_are_accepted():
    segmenter = pipeline("zero-shot-image-segmentation", model=str(default_model_path()), device="cpu", dtype=torch.bfloat16)
    assert segmenter.model.dtype == torch.bfloat16 and segmenter.device == torch.device("cpu")
    image = scene(4)
    check_segments(segmenter(image, candidate_labels=LABELS), image, LABELS)


@pytest.mark.parametrize("candidate_labels", [[], (), "cat, sky", None])
def test_bad_candidate_labels_are_refused(segmenter, candidate_labels):
    with pytest.raises(ValueError, match="candidate_labels"):
        segmenter(scene(0), candidate_labels=candidate_labels)


def test_missing_candidate_labels_are_refused(segmenter):
    with pytest.raises(ValueError, match="candidate_labels"):
        segmenter(scene(0))
