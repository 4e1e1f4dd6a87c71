"""Naming given masks: `MaftProcessor(images=..., masks=...)`, `MaftModel.classify_masks` and
`post_process_mask_classification`, against IP-CLIP called by hand; edge cases of the masks and their errors; the
pipeline with `masks=`, also with transformers alone."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from transformers import pipeline

from helpers import CLASS_NAMES, random_image, run_without_maft, tiny_model, tiny_processor
from maft.cli.model_loading import default_model_path
from maft.processing_maft import round_up


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def soft_masks(num_masks: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Soft blobs (num_masks, height, width) in [0, 1], as a segmenter's probabilities."""
    generator = np.random.default_rng(seed)
    rows, columns = np.mgrid[:height, :width]
    masks = []
    for _ in range(num_masks):
        center_row, center_column = generator.uniform(0, height), generator.uniform(0, width)
        radius = generator.uniform(4, max(height, width) / 2)
        distance = np.hypot(rows - center_row, columns - center_column)
        masks.append(1 / (1 + np.exp((distance - radius) / 2)))
    return np.stack(masks).astype(np.float32)


def name_masks(model, processor, images, masks, **kwargs):
    inputs = processor(images=images, masks=masks, text=CLASS_NAMES, **kwargs)
    with torch.no_grad():
        return inputs, model.classify_masks(**inputs)


def test_masks_at_the_image_size_equal_ipclip_with_the_masks_resized_by_hand(model, processor):
    width, height = 50, 37  # resized to 86x64, padded to 96x64, the CLIP view 64x64: every step changes the size
    image, masks = random_image(width, height), soft_masks(4, height, width)
    masks[1] = 1.0  # a full mask
    masks[2] = masks[2] > 0.5  # a binary one
    inputs, outputs = name_masks(model, processor, image, masks)

    image_processor = processor.image_processor
    resized = image_processor.resized_size(height, width, image_processor.size)
    by_hand = F.interpolate(torch.from_numpy(masks)[None], size=resized, mode="bilinear", align_corners=False)
    view = round_up(resized, image_processor.size_divisor)
    by_hand = F.pad(by_hand, (0, view[1] - resized[1], 0, view[0] - resized[0]))
    clip_size = image_processor.clip_image_size
    by_hand = F.interpolate(by_hand, size=(clip_size, clip_size), mode="bilinear", align_corners=False)
    torch.testing.assert_close(inputs["masks"], by_hand, atol=1e-6, rtol=0)

    with torch.no_grad():
        embeds = model.ip_clip(inputs["clip_pixel_values"], mask_proposals=by_hand, interpolate_pos_encoding=True).proposal_embeds
        text_embeds = model.get_text_embeddings(inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(outputs.mask_embeds, F.normalize(embeds, dim=-1))
    torch.testing.assert_close(outputs.class_logits, model.class_logits(embeds, text_embeds[None]))
    assert outputs.class_logits.shape == (1, 4, len(CLASS_NAMES) + 1)  # the no-object entry last
    assert torch.equal(outputs.real_masks, torch.ones(1, 4, dtype=torch.bool))


def test_each_mask_is_named_independently_of_the_others(model, processor):
    image = random_image(48, 40)
    masks = soft_masks(3, 40, 48)
    masks[0] = 0.0  # an empty mask: its token sees only itself from the masked layers on
    masks[2] = 1.0
    _, together = name_masks(model, processor, image, masks)
    assert torch.isfinite(together.class_logits).all()
    for index in range(3):
        _, alone = name_masks(model, processor, image, masks[index : index + 1])
        torch.testing.assert_close(alone.mask_embeds[0, 0], together.mask_embeds[0, index], atol=1e-5, rtol=1e-5)


def test_zero_masks_give_no_names(model, processor):
    for no_masks in ([], np.zeros((0, 40, 48), dtype=bool), torch.zeros(0, 40, 48)):
        inputs, outputs = name_masks(model, processor, random_image(48, 40), no_masks)
        assert inputs["masks"].shape == (1, 0, 64, 64)
        assert outputs.class_logits.shape == (1, 0, len(CLASS_NAMES) + 1)
        assert processor.post_process_mask_classification(outputs) == [[]]


def test_a_batch_with_different_counts_names_each_image_as_alone(model, processor):
    images = [random_image(48, 40, seed=1), random_image(30, 70, seed=2), random_image(64, 64, seed=3)]
    masks = [soft_masks(3, 40, 48, seed=1), soft_masks(1, 70, 30, seed=2), []]
    inputs, outputs = name_masks(model, processor, images, masks)
    assert inputs["masks"].shape == (3, 3, 64, 64)
    assert inputs["real_masks"].tolist() == [[True] * 3, [True, False, False], [False] * 3]
    assert inputs["masks"][1, 1:].abs().sum() == 0  # padding: empty masks
    names = processor.post_process_mask_classification(outputs)
    assert [len(image_names) for image_names in names] == [3, 1, 0]
    for image, image_masks, image_names in zip(images[:2], masks[:2], names[:2]):
        _, alone = name_masks(model, processor, image, image_masks)
        (alone_names,) = processor.post_process_mask_classification(alone)
        for batched, single in zip(image_names, alone_names):
            assert batched["label_id"] == single["label_id"]
            torch.testing.assert_close(batched["scores"], single["scores"], atol=1e-5, rtol=1e-5)


def test_post_processing_names_each_mask_by_its_most_probable_class(model, processor):
    _, outputs = name_masks(model, processor, random_image(48, 40), soft_masks(5, 40, 48))
    (names,) = processor.post_process_mask_classification(outputs)
    expected = outputs.class_logits[0, :, :-1].softmax(dim=-1)  # without the no-object entry
    for mask_index, name in enumerate(names):
        assert set(name) == {"label_id", "score", "scores"}
        torch.testing.assert_close(name["scores"], expected[mask_index])
        assert name["label_id"] == int(expected[mask_index].argmax())
        assert name["score"] == pytest.approx(float(expected[mask_index].max()))


def test_every_form_of_binary_mask_is_read_alike(processor):
    binary = np.zeros((2, 40, 48), dtype=bool)
    binary[0, 5:30, 10:40] = True
    binary[1, :, :20] = True
    expected = processor(images=random_image(48, 40), masks=binary)["masks"]
    forms = {
        "uint8 0/1": binary.astype(np.uint8),
        "uint8 0/255": binary.astype(np.uint8) * 255,
        "int64 0/1": binary.astype(np.int64),
        "float": binary.astype(np.float64),
        "bool tensor": torch.from_numpy(binary),
        "PIL L": [Image.fromarray(mask.astype(np.uint8) * 255) for mask in binary],
        "PIL 1": [Image.fromarray(mask) for mask in binary],
        "list of arrays": list(binary),
    }
    for form, masks in forms.items():
        torch.testing.assert_close(processor(images=random_image(48, 40), masks=masks)["masks"], expected, msg=form)


def test_soft_masks_stay_soft(processor):
    masks = soft_masks(2, 40, 48)
    soft = processor(images=random_image(48, 40), masks=masks)["masks"]
    assert ((soft > 0.05) & (soft < 0.95)).any()
    grey = np.full((1, 40, 48), 128, dtype=np.uint8)  # an "L" image's 0-255 scale
    full = processor(images=random_image(48, 40), masks=np.ones((1, 40, 48), dtype=bool))["masks"]
    torch.testing.assert_close(processor(images=random_image(48, 40), masks=grey)["masks"], full * (128 / 255))


@pytest.mark.parametrize(
    "masks, message",
    [
        (np.ones((2, 40, 50), dtype=bool), r"The masks of image 0 are 50x40 but the image is 48x40 \(width x height\)"),
        (np.ones((40, 48), dtype=bool), r"\(num_masks, height, width\).*mask\[None\]"),
        (np.full((1, 40, 48), 1.5, dtype=np.float32), r"\[0, 1\].*sigmoid"),
        (np.full((1, 40, 48), np.nan, dtype=np.float32), "NaN"),
        (np.full((1, 40, 48), 300, dtype=np.int64), "0 and 1, or 0-255"),
        ([Image.new("RGB", (48, 40))], "mode 'RGB'"),
        ([np.ones((40, 48)), np.ones((40, 47))], "must all have one size"),
    ],
)
def test_bad_masks_are_refused_saying_what_is_allowed(processor, masks, message):
    with pytest.raises(ValueError, match=message):
        processor(images=random_image(48, 40), masks=masks)


def test_masks_of_a_batch_must_come_one_entry_per_image(processor):
    images = [random_image(48, 40), random_image(48, 40)]
    with pytest.raises(ValueError, match="Got 2 images but masks for 1"):
        processor(images=images, masks=[np.ones((1, 40, 48), dtype=bool)])
    with pytest.raises(ValueError, match="one entry .* per image"):
        processor(images=images, masks=np.ones((1, 40, 48), dtype=bool))
    with pytest.raises(ValueError, match="not both"):
        processor(images=images[0], masks=[], segmentation_maps=np.zeros((40, 48)))
    with pytest.raises(ValueError, match="need their `images`"):
        processor(text=CLASS_NAMES, masks=[])


def test_lists_per_image_without_return_tensors(processor):
    inputs = processor(images=[random_image(48, 40), random_image(30, 20)], masks=[soft_masks(2, 40, 48), []], return_tensors=None)
    assert [masks.shape for masks in inputs["masks"]] == [(2, 64, 64), (0, 64, 64)]
    assert [real.tolist() for real in inputs["real_masks"]] == [[True, True], []]


def test_classify_masks_checks_its_inputs(model):
    clip_pixel_values = torch.randn(1, 3, 64, 64)
    text_embeds = F.normalize(torch.randn(3, 16), dim=-1)
    with pytest.raises(ValueError, match=r"`real_masks` must be \(batch_size, num_masks\) = \(1, 2\)"):
        model.classify_masks(clip_pixel_values, torch.ones(1, 2, 8, 8), text_embeds=text_embeds, real_masks=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.classify_masks(torch.full((1, 3, 64, 64), float("nan")), torch.ones(1, 2, 8, 8), text_embeds=text_embeds)
    with pytest.raises(ValueError, match="`mask_proposals` must have shape"):
        model.classify_masks(clip_pixel_values, torch.ones(2, 8, 8), text_embeds=text_embeds)
    with pytest.raises(ValueError, match="exactly one of `input_ids`"):
        model.classify_masks(clip_pixel_values, torch.ones(1, 2, 8, 8))
    # masks at any resolution: IP-CLIP resizes them to its patch grid
    outputs = model.classify_masks(clip_pixel_values, torch.ones(1, 2, 13, 7), text_embeds=text_embeds)
    assert outputs.class_logits.shape == (1, 2, 4) and outputs.real_masks is None


# The pipeline with `masks=`, on the bundled model: the example scenes' ground-truth segments as the given masks.

BUNDLED_EXAMPLES = default_model_path().parent / "examples"
BUNDLED_CLASSES = json.loads((BUNDLED_EXAMPLES / "classes.json").read_text())["class_names"]


def scene_and_segments(index: int) -> tuple[Image.Image, np.ndarray, list[int]]:
    """Example scene `index`, its ground-truth segments as (K, H, W) booleans and their class ids."""
    image = Image.open(BUNDLED_EXAMPLES / f"scene-{index}.png").convert("RGB")
    labels = np.array(Image.open(BUNDLED_EXAMPLES / f"scene-{index}-labels.png"))
    class_ids = [int(value) for value in np.unique(labels) if value < len(BUNDLED_CLASSES)]
    return image, np.stack([labels == class_id for class_id in class_ids]), class_ids


@pytest.fixture(scope="module")
def bundled():
    from helpers import bundled_model

    return bundled_model()


@pytest.fixture(scope="module")
def namer():
    return pipeline("zero-shot-image-segmentation", model=str(default_model_path()), device="cpu")


def test_the_pipeline_names_each_given_mask_in_order(namer, bundled):
    model, processor = bundled
    image, masks, _ = scene_and_segments(0)
    named = namer(image, candidate_labels=BUNDLED_CLASSES, masks=masks)
    inputs = processor(images=image, masks=masks, text=BUNDLED_CLASSES)
    with torch.no_grad():
        (expected,) = processor.post_process_mask_classification(model.classify_masks(**inputs))
    assert [segment["label"] for segment in named] == [BUNDLED_CLASSES[name["label_id"]] for name in expected]
    assert [segment["score"] for segment in named] == pytest.approx([name["score"] for name in expected], abs=1e-5)
    for segment, mask in zip(named, masks):
        np.testing.assert_array_equal(np.asarray(segment["mask"]), mask.astype(np.uint8) * 255)
    assert namer(image, candidate_labels=BUNDLED_CLASSES, masks=[]) == []


def test_the_pipeline_combines_the_masks_into_a_label_map_with_subtask_semantic(namer, bundled):
    model, processor = bundled
    image, masks, _ = scene_and_segments(1)
    masks[:, :10] = False  # rows no mask covers: no segment holds them
    segments = namer(image, candidate_labels=BUNDLED_CLASSES, masks=masks, subtask="semantic")
    inputs = processor(images=image, masks=masks, text=BUNDLED_CLASSES)
    with torch.no_grad():
        (names,) = processor.post_process_mask_classification(model.classify_masks(**inputs))
    scores = np.einsum("kc,khw->chw", np.stack([name["scores"].numpy() for name in names]), masks.astype(np.float32))
    expected = np.where(masks.any(axis=0), scores.argmax(axis=0), -1)
    drawn = np.full(expected.shape, -1)
    for segment in segments:
        pixels = np.asarray(segment["mask"]) == 255
        assert (drawn[pixels] == -1).all(), "segments are disjoint"
        drawn[pixels] = BUNDLED_CLASSES.index(segment["label"])
    np.testing.assert_array_equal(drawn, expected)
    assert (drawn[:10] == -1).all()


def test_the_pipeline_names_masks_of_a_list_of_images_alike_in_batches(namer):
    scenes = [scene_and_segments(index) for index in (2, 3, 4)]
    images, masks = [image for image, _, _ in scenes], [image_masks for _, image_masks, _ in scenes]
    masks[1] = masks[1][:1]  # different counts in one batch
    one_by_one = [namer(image, candidate_labels=BUNDLED_CLASSES, masks=image_masks) for image, image_masks in zip(images, masks)]
    batched = namer(images, candidate_labels=BUNDLED_CLASSES, masks=masks, batch_size=2)
    assert [[segment["label"] for segment in result] for result in batched] == [[segment["label"] for segment in result] for result in one_by_one]
    for result, single in zip(batched, one_by_one):
        assert [segment["score"] for segment in result] == pytest.approx([segment["score"] for segment in single], abs=1e-5)


def test_the_pipeline_refuses_masks_that_do_not_fit(namer):
    image, masks, _ = scene_and_segments(0)
    with pytest.raises(ValueError, match=r"masks are 95x96 but the image is 96x96"):
        namer(image, candidate_labels=BUNDLED_CLASSES, masks=masks[:, :, :95])
    with pytest.raises(ValueError, match="one entry .* per image"):
        namer([image, image], candidate_labels=BUNDLED_CLASSES, masks=masks)
    with pytest.raises(ValueError, match="with `masks`, `subtask` is 'semantic' or not given"):
        namer(image, candidate_labels=BUNDLED_CLASSES, masks=masks, subtask="instance")


NAME_MASKS_WITHOUT_MAFT = """
import json
import sys

import numpy as np
from PIL import Image
from transformers import pipeline

location, scene, masks, class_names = {location!r}, {scene!r}, {masks!r}, {class_names!r}
namer = pipeline("zero-shot-image-segmentation", model=location, trust_remote_code=True, device="cpu")
named = namer(Image.open(scene).convert("RGB"), candidate_labels=class_names, masks=np.load(masks))
print(json.dumps({{
    "labels": [segment["label"] for segment in named],
    "scores": [segment["score"] for segment in named],
    "maft_imported": any(name == "maft" or name.startswith("maft.") for name in sys.modules),
}}))
"""


def test_the_pipeline_names_masks_with_transformers_alone(namer, tmp_path):
    image, masks, _ = scene_and_segments(3)
    np.save(tmp_path / "masks.npy", masks)
    code = NAME_MASKS_WITHOUT_MAFT.format(location=str(default_model_path()), scene=str(BUNDLED_EXAMPLES / "scene-3.png"),
                                          masks=str(tmp_path / "masks.npy"), class_names=BUNDLED_CLASSES)
    result = json.loads(run_without_maft(code, tmp_path).strip().splitlines()[-1])
    expected = namer(image, candidate_labels=BUNDLED_CLASSES, masks=masks)
    assert not result["maft_imported"]
    assert result["labels"] == [segment["label"] for segment in expected]
    assert result["scores"] == pytest.approx([segment["score"] for segment in expected], abs=1e-5)
