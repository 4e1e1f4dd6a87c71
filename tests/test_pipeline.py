"""The `zero-shot-image-segmentation` pipeline on the bundled model and its example scenes."""

import os
import subprocess
import sys
from pathlib import Path

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


def test_import_maft_is_enough_for_auto_model_and_the_pipeline(tmp_path):
    """In a fresh Python: `import maft`, then transformers alone loads a saved MAFT model, no `trust_remote_code`."""
    code = (
        "import maft\n"
        "from transformers import AutoModel, pipeline\n"
        f"model = AutoModel.from_pretrained({str(default_model_path())!r})\n"
        f"segmenter = pipeline('zero-shot-image-segmentation', model={str(default_model_path())!r})\n"
        "print(type(model).__module__, type(segmenter).__module__)\n"
    )
    environment = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["maft.modeling_maft", "maft.pipeline_maft"]


SHAPES = ["red circle", "green circle", "yellow triangle", "yellow square", "blue square"]
STUFF = ["checkered wall", "checkered grass", "dotted floor", "striped floor"]


def processor_result(segmenter, image: Image.Image, labels: list[str], subtask: str, **options) -> dict:
    """The processor's own post-processing of the model's outputs for `image`, at the image's size."""
    model, processor = segmenter.model, segmenter.processor
    inputs = processor(images=image, return_tensors="pt")
    with torch.inference_mode():
        outputs = model(**inputs, text_embeds=encode_vocabulary(model, processor, labels))
    post_process = getattr(processor, f"post_process_{subtask}_segmentation")
    return post_process(outputs, target_sizes=[(image.height, image.width)], **options)[0]


@pytest.mark.parametrize("subtask", ["instance", "panoptic"])
def test_instance_and_panoptic_segments_are_the_processors_as_masks(segmenter, subtask):
    image, labels = scene(0), SHAPES + STUFF
    stuff_ids = {labels.index(name) for name in STUFF}
    options = {"label_ids_to_fuse": stuff_ids} if subtask == "panoptic" else {"stuff_label_ids": stuff_ids}
    expected = processor_result(segmenter, image, labels, subtask, threshold=0.3, **options)
    segments = segmenter(image, candidate_labels=labels, subtask=subtask, stuff_labels=STUFF, threshold=0.3)
    assert len(segments) == len(expected["segments_info"]) >= 2
    for segment, info in zip(segments, expected["segments_info"]):
        assert set(segment) == {"label", "score", "mask"} and segment["mask"].size == image.size
        assert segment["label"] == labels[info["label_id"]] and segment["score"] == info["score"]
        np.testing.assert_array_equal(np.asarray(segment["mask"]) == 255, (expected["segmentation"] == info["id"]).numpy())
    masks = np.stack([np.asarray(segment["mask"]) == 255 for segment in segments])
    assert (masks.sum(axis=0) <= 1).all(), "segments are disjoint"


def test_panoptic_gives_instances_of_things_and_one_segment_per_stuff_class(segmenter):
    """Scene 0: a green circle and a yellow shape on checkered wall and grass; scene 3: two proposals of its grass."""
    segments = segmenter(scene(0), candidate_labels=SHAPES + STUFF, subtask="panoptic", stuff_labels=STUFF, threshold=0.3)
    assert {"checkered wall", "checkered grass", "green circle"} <= {segment["label"] for segment in segments}
    as_things = segmenter(scene(3), candidate_labels=SHAPES + STUFF, subtask="panoptic", threshold=0.3)
    fused = segmenter(scene(3), candidate_labels=SHAPES + STUFF, subtask="panoptic", stuff_labels=STUFF, threshold=0.3)
    assert [segment["label"] for segment in as_things].count("checkered grass") == 2
    assert [segment["label"] for segment in fused].count("checkered grass") == 1
    grass = [np.asarray(segment["mask"]) == 255 for segment in as_things if segment["label"] == "checkered grass"]
    (fused_grass,) = [np.asarray(segment["mask"]) == 255 for segment in fused if segment["label"] == "checkered grass"]
    np.testing.assert_array_equal(fused_grass, grass[0] | grass[1])


def test_instance_segments_leave_out_stuff_and_come_best_first(segmenter):
    segments = segmenter(scene(3), candidate_labels=SHAPES + STUFF, subtask="instance", stuff_labels=STUFF, threshold=0.3)
    assert segments and not {segment["label"] for segment in segments} & set(STUFF)
    assert [segment["score"] for segment in segments] == sorted((segment["score"] for segment in segments), reverse=True)
    everything = segmenter(scene(3), candidate_labels=SHAPES + STUFF, subtask="instance", threshold=0.3)
    assert {segment["label"] for segment in everything} & set(STUFF)


def test_the_semantic_subtask_is_the_default(segmenter):
    default = segmenter(scene(4), candidate_labels=LABELS)
    semantic = segmenter(scene(4), candidate_labels=LABELS, subtask="semantic")
    assert [s["label"] for s in default] == [s["label"] for s in semantic]
    np.testing.assert_array_equal(label_map_of(default, LABELS), label_map_of(semantic, LABELS))


def test_thresholds_reach_the_post_processing(segmenter):
    loose = segmenter(scene(0), candidate_labels=SHAPES + STUFF, subtask="panoptic", threshold=0.0, overlap_mask_area_threshold=0.0)
    strict = segmenter(scene(0), candidate_labels=SHAPES + STUFF, subtask="panoptic", threshold=0.99)
    assert len(loose) > len(strict)
    nothing = segmenter(scene(0), candidate_labels=SHAPES + STUFF, subtask="instance", threshold=1.0)
    assert nothing == []


@pytest.mark.parametrize("options, message", [
    ({"subtask": "detection"}, "`subtask` must be one of semantic, instance, panoptic, got 'detection'"),
    ({"subtask": "panoptic", "stuff_labels": ["sky"]}, r"`stuff_labels` must be among `candidate_labels`.*not there: \['sky'\]"),
    ({"subtask": "panoptic", "stuff_labels": "checkered wall"}, "`stuff_labels` must be a list of class names"),
    ({"threshold": 0.3}, "threshold apply to subtask 'instance' or 'panoptic', not 'semantic'"),
    ({"stuff_labels": ["checkered wall"]}, "stuff_labels apply to subtask 'instance' or 'panoptic'"),
])
def test_bad_subtask_options_are_refused(segmenter, options, message):
    with pytest.raises(ValueError, match=message):
        segmenter(scene(0), candidate_labels=LABELS, **options)


def test_unknown_options_are_refused_naming_the_known_ones(segmenter):
    with pytest.raises(TypeError, match="takes `candidate_labels`, `subtask`, `stuff_labels` and `threshold`"):
        segmenter(scene(0), candidate_labels=LABELS, label_ids_to_fuse={1})
