"""MaftImageProcessor on transformers' conventions, its loader, old configurations, and MaftProcessor's routing."""

import io
import json
import shutil
from pathlib import Path
import logging

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from PIL import Image
from torch.nn import functional as F
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.utils import logging as transformers_logging

from maft import MaftImageProcessor, MaftModel, MaftProcessor
from maft.cli.model_loading import default_model_path
from maft.processing_maft import to_rgb_array


# What `MaftImageProcessor().save_pretrained(...)` wrote before the image processor followed transformers' conventions.
DEFAULT_CONFIG_SAVED_BEFORE = """{
  "clip_image_mean": [122.7709383, 116.7460125, 104.09373615],
  "clip_image_size": 480,
  "clip_image_std": [68.5005327, 66.6321579, 70.323163],
  "do_resize": true,
  "ignore_index": 255,
  "image_mean": [123.675, 116.28, 103.53],
  "image_processor_type": "MaftImageProcessor",
  "image_std": [58.395, 57.12, 57.375],
  "longest_edge": 2560,
  "mask_stride": 4,
  "shortest_edge": 640,
  "size_divisibility": 32
}"""


def random_array(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def reference_inputs(image: np.ndarray, config: dict) -> dict[str, torch.Tensor]:
    """The earlier processor's arithmetic for one uint8 image, from a configuration in its format: detectron2's resize,
    (x - mean) / std on the 0-255 scale, zero padding to a multiple, the padded image resized for CLIP."""
    height, width = image.shape[:2]
    scale = config["shortest_edge"] / min(height, width)
    if max(height, width) * scale > config["longest_edge"]:
        scale = config["longest_edge"] / max(height, width)
    size = (int(height * scale + 0.5), int(width * scale + 0.5))
    resized = torch.tensor(np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR)), dtype=torch.float32).permute(2, 0, 1)
    divisor = config["size_divisibility"]
    padded_size = [-(-side // divisor) * divisor for side in size]

    def normalised(mean, std):
        padded = torch.zeros(1, 3, *padded_size)
        padded[0, :, : size[0], : size[1]] = (resized - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        return padded

    clip = F.interpolate(normalised(config["clip_image_mean"], config["clip_image_std"]), size=(config["clip_image_size"],) * 2, mode="bilinear", align_corners=False)
    return {"pixel_values": normalised(config["image_mean"], config["image_std"]), "clip_pixel_values": clip}


@pytest.mark.parametrize("source", ["bundled", "saved-before"])
def test_configurations_saved_before_load_and_give_identical_pixel_values(source, tmp_path):
    if source == "bundled":  # the bundled model's processor as an earlier version saved it, beside today's tokenizer
        folder = tmp_path / "bundled"
        shutil.copytree(default_model_path(), folder)
        saved_before = Path(__file__).with_name("fixtures") / "maft_mini_processor_config_saved_before.json"
        shutil.copy(saved_before, folder / "processor_config.json")
        config = json.loads(saved_before.read_text())["image_processor"]
        processor = MaftProcessor.from_pretrained(folder).image_processor
    else:
        config = json.loads(DEFAULT_CONFIG_SAVED_BEFORE)
        (tmp_path / "preprocessor_config.json").write_text(DEFAULT_CONFIG_SAVED_BEFORE)
        processor = MaftImageProcessor.from_pretrained(tmp_path)
    assert processor.size == {"shortest_edge": config["shortest_edge"], "longest_edge": config["longest_edge"]}
    assert processor.size_divisor == 32 and processor.do_rescale and processor.rescale_factor == 1 / 255
    np.testing.assert_allclose(processor.image_mean, np.array(config["image_mean"]) / 255)
    image = random_array(150, 110)
    inputs = processor(image)
    for name, expected in reference_inputs(image, config).items():
        assert torch.equal(inputs[name], expected), name
    if source == "saved-before":  # today's defaults are the same processor
        for name, value in MaftImageProcessor()(image).items():
            assert torch.equal(inputs[name], value), name


def test_the_saved_configuration_follows_transformers_and_round_trips(tmp_path):
    processor = MaftImageProcessor(size={"shortest_edge": 96, "longest_edge": 384}, do_normalize=False, clip_image_size=96)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["size"] == {"shortest_edge": 96, "longest_edge": 384} and saved["size_divisor"] == 32
    assert saved["image_mean"] == list(IMAGENET_DEFAULT_MEAN) and saved["do_rescale"] is True and saved["do_normalize"] is False
    assert not {"shortest_edge", "longest_edge", "size_divisibility"} & saved.keys()
    image = random_array(70, 90)
    loaded = MaftImageProcessor.from_pretrained(tmp_path)
    for name, value in processor(image).items():
        assert torch.equal(loaded(image)[name], value), name


def test_every_option_works_per_call_as_at_construction():
    image = random_array(50, 70)
    calls = [
        dict(do_resize=False),
        dict(size={"height": 40, "width": 56}),
        dict(size={"shortest_edge": 32}),
        dict(do_normalize=False),
        dict(do_rescale=False, image_mean=[120.0, 110.0, 100.0], image_std=[60.0, 60.0, 60.0], clip_image_mean=[120.0] * 3, clip_image_std=[70.0] * 3),
        dict(image_mean=IMAGENET_DEFAULT_MEAN, clip_image_size=64),
        dict(size_divisor=64),
        dict(do_pad=False),
        dict(per_image_clip_view=False),
    ]
    for options in calls:
        per_call, constructed = MaftImageProcessor()(image, **options), MaftImageProcessor(**options)(image)
        for name, value in per_call.items():
            assert torch.equal(constructed[name], value), (options, name)


def test_what_each_option_does():
    image = random_array(50, 70)
    processor = MaftImageProcessor()
    assert processor(image, do_resize=False)["pixel_values"].shape == (1, 3, 64, 96)
    assert processor(image, do_resize=False, do_pad=False)["pixel_values"].shape == (1, 3, 50, 70)
    assert processor(image, do_resize=False, size_divisor=0)["pixel_values"].shape == (1, 3, 50, 70)
    assert processor(image, size={"height": 40, "width": 56})["image_sizes"].tolist() == [[40, 56]]
    assert processor(image, size={"shortest_edge": 100})["image_sizes"].tolist() == [[100, 140]]
    assert processor(image, size={"shortest_edge": 100, "longest_edge": 112})["image_sizes"].tolist() == [[80, 112]]
    assert processor(image, clip_image_size=64)["clip_pixel_values"].shape == (1, 3, 64, 64)
    labels = processor(image, segmentation_maps=np.ones((50, 70), dtype=np.int64), do_resize=False, ignore_index=254)["labels"]
    assert labels.shape == (1, 64, 96) and labels[0, :50, :70].eq(1).all() and labels[0, 50:].eq(254).all()
    unnormalised = processor(image, do_resize=False, do_normalize=False)["pixel_values"][0, :, :50, :70]
    assert torch.equal(unnormalised, torch.tensor(image).permute(2, 0, 1).float() * np.float32(1 / 255))
    raw = processor(image, do_resize=False, do_normalize=False, do_rescale=False)["pixel_values"][0, :, :50, :70]
    assert torch.equal(raw, torch.tensor(image).permute(2, 0, 1).float())
    floats = processor(image.astype(np.float32) / 255, do_resize=False, do_rescale=False)
    torch.testing.assert_close(floats["pixel_values"], processor(image, do_resize=False)["pixel_values"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="same size after resizing"):
        processor([image, random_array(60, 60)], do_pad=False)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: MaftImageProcessor(resample=2), TypeError, r"unknown keyword arguments \['resample'\]; allowed: do_resize"),
        (lambda: MaftImageProcessor()(random_array(8, 8), crop_size=4), TypeError, r"unknown keyword arguments \['crop_size'\]"),
        (lambda: MaftImageProcessor(image_mean=[123.675, 116.28, 103.53]), ValueError, "0-255 scale.*do_rescale=False"),
        (lambda: MaftImageProcessor()(random_array(8, 8), clip_image_std=[58.0] * 3), ValueError, "0-255 scale"),
        (lambda: MaftImageProcessor(image_mean=[0.5, 0.5]), ValueError, "one per RGB channel"),
        (lambda: MaftImageProcessor(size={"longest_edge": 100}), ValueError, "`size` must be"),
        (lambda: MaftImageProcessor(size_divisor=-1), ValueError, "non-negative integer"),
        (lambda: MaftImageProcessor()(random_array(8, 8), return_tensors="tf"), ValueError, "None, 'np' or 'pt'"),
        (lambda: MaftImageProcessor()(random_array(8, 8), do_resize="yes"), StrictDataclassFieldValidationError, "do_resize"),
    ],
)
def test_bad_options_are_refused(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_return_tensors_none_np_pt():
    images = [random_array(50, 70), random_array(40, 40, seed=1)]
    as_torch = MaftImageProcessor()(images, return_tensors="pt")
    as_numpy = MaftImageProcessor()(images, return_tensors="np")
    as_lists = MaftImageProcessor()(images, return_tensors=None)
    for name, value in as_torch.items():
        assert isinstance(value, torch.Tensor) and isinstance(as_numpy[name], np.ndarray)
        assert isinstance(as_lists[name], list) and len(as_lists[name]) == 2
        np.testing.assert_array_equal(as_numpy[name], value.numpy())
        np.testing.assert_array_equal(np.stack(as_lists[name]), value.numpy())


def test_batches_as_four_dimensional_arrays_and_channel_layouts():
    images = np.stack([random_array(40, 60, seed) for seed in range(3)])
    as_list = MaftImageProcessor()(list(images))
    for batch in (images, torch.from_numpy(images).permute(0, 3, 1, 2)):
        inputs = MaftImageProcessor()(batch)
        for name, value in as_list.items():
            assert torch.equal(inputs[name], value), name
    square = random_array(3, 12)  # (3, 12, 3) reads as channels first unless told
    assert MaftImageProcessor()(square, do_resize=False, input_data_format="channels_last")["image_sizes"].tolist() == [[3, 12]]
    assert MaftImageProcessor()(square, do_resize=False)["image_sizes"].tolist() == [[12, 3]]


@pytest.fixture
def fresh_warnings():
    """transformers' `warning_once` warns once per process: forget what was said."""
    transformers_logging.warning_once.cache_clear()
    yield
    transformers_logging.warning_once.cache_clear()


def test_rescaling_images_already_in_zero_one_warns_as_transformers(fresh_warnings, caplog):
    image = random_array(40, 40).astype(np.float32) / 255
    with caplog.at_level(logging.WARNING, logger="maft.processing_maft"):
        MaftImageProcessor()(image, do_rescale=False)
        assert not caplog.records
        MaftImageProcessor()(image)
    assert "trying to rescale already rescaled images" in caplog.text and "do_rescale=False" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maft.processing_maft"):
        MaftImageProcessor()(image * 255)  # floats on the 0-255 scale are what do_rescale expects
    assert not caplog.records


def test_clip_view_of_an_image_does_not_depend_on_its_batch():
    small, large = random_array(64, 64), random_array(64, 160, seed=1)
    processor = MaftImageProcessor(size={"shortest_edge": 64, "longest_edge": 256}, clip_image_size=64)
    alone, batched = processor(small), processor([small, large])
    assert batched["pixel_values"].shape[-2:] == (64, 160)
    assert torch.equal(batched["clip_pixel_values"][0], alone["clip_pixel_values"][0])
    assert torch.equal(batched["pixel_values"][0, :, :64, :64], alone["pixel_values"][0])
    # The original's view, the padded batch resized, is the same for a batch of one only.
    assert torch.equal(processor(small, per_image_clip_view=False)["clip_pixel_values"], alone["clip_pixel_values"])
    as_original = processor([small, large], per_image_clip_view=False)["clip_pixel_values"]
    clip_normalised = processor([small, large], image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)["pixel_values"]
    assert torch.equal(as_original, F.interpolate(clip_normalised, size=(64, 64), mode="bilinear", align_corners=False))
    assert not torch.equal(as_original[0], alone["clip_pixel_values"][0])
    assert batched["clip_view_sizes"].tolist() == [[64, 64], [64, 160]]
    assert processor([small, large], per_image_clip_view=False)["clip_view_sizes"].tolist() == [[64, 160], [64, 160]]


def test_the_bundled_model_labels_an_image_alike_alone_and_batched():
    """Per-image CLIP views, and in inference each image segmented at its own padded size: an image batched with
    larger ones (one of its own size among them) gets the label map and scores it gets alone. The original's batch
    view (one CLIP view of the padded batch) does not: 85.6% of the pixels agreed with it before this change."""
    folder = default_model_path()
    class_names = json.loads((folder.parent / "examples" / "classes.json").read_text())["class_names"]
    model, processor = MaftModel.from_pretrained(folder).eval(), MaftProcessor.from_pretrained(folder)
    small = Image.open(folder.parent / "examples" / "scene-0.png").convert("RGB")
    large = Image.open(folder.parent / "examples" / "scene-1.png").convert("RGB").resize((2 * small.width, small.height))
    twin = Image.open(folder.parent / "examples" / "scene-2.png").convert("RGB").resize(small.size)

    def labels_and_scores(images: list, **options) -> list:
        with torch.inference_mode():
            outputs = model(**processor(images=images, text=class_names, **options))
        sizes = [image.size[::-1] for image in images]
        return processor.post_process_semantic_segmentation(outputs, target_sizes=sizes, return_segmentation_scores=True)

    alone = labels_and_scores([small])[0]
    for batched in (labels_and_scores([large, small, twin])[1], labels_and_scores([small, large])[0]):
        assert torch.equal(batched["segmentation"], alone["segmentation"])
        torch.testing.assert_close(batched["segmentation_scores"], alone["segmentation_scores"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(labels_and_scores([large, small, twin])[2]["segmentation_scores"], labels_and_scores([twin])[0]["segmentation_scores"], atol=1e-5, rtol=1e-5)
    as_original = labels_and_scores([small, large], per_image_clip_view=False)[0]["segmentation"]
    assert (as_original == alone["segmentation"]).float().mean() < 0.95


def test_a_training_batch_is_proposed_as_one_padded_input_as_the_original(monkeypatch):
    model = MaftModel.from_pretrained(default_model_path())
    processor = MaftProcessor.from_pretrained(default_model_path())
    inputs = processor(images=[random_array(64, 64), random_array(64, 128, seed=1), random_array(64, 64, seed=2)], text=["cat", "dog"])
    proposed_shapes = []
    propose = model.propose
    monkeypatch.setattr(model, "propose", lambda pixel_values, text_embeds: proposed_shapes.append(tuple(pixel_values.shape)) or propose(pixel_values, text_embeds))
    with torch.no_grad():
        trained = model.train()(**inputs)
        assert proposed_shapes == [tuple(inputs["pixel_values"].shape)] and trained.padded_sizes is None
        proposed_shapes.clear()
        inferred = model.eval()(**inputs)
    (small_height, small_width), (large_height, large_width) = inputs["clip_view_sizes"][0].tolist(), inputs["clip_view_sizes"][1].tolist()
    assert sorted(proposed_shapes) == sorted([(2, 3, small_height, small_width), (1, 3, large_height, large_width)])
    assert inferred.padded_sizes.tolist() == inputs["clip_view_sizes"].tolist()
    assert inferred.masks_queries_logits.shape == trained.masks_queries_logits.shape


def test_processor_routes_keyword_arguments_like_transformers_processors():
    processor = MaftProcessor.from_pretrained(default_model_path())
    image = random_array(50, 70)
    inputs = processor(images=image, text=["cat", "dog"], do_resize=False, max_length=12, padding="max_length")
    assert inputs["pixel_values"].shape[-2:] == (64, 96) and inputs["input_ids"].shape == (2, 2, 12)
    explicit = processor(images=image, text=["cat", "dog"], images_kwargs={"do_resize": False}, text_kwargs={"max_length": 12, "padding": "max_length"})
    for name, value in inputs.items():
        assert torch.equal(explicit[name], value), name
    with pytest.raises(TypeError, match=r"unknown keyword arguments \['colour'\]"):
        processor(images=image, text=["cat"], colour="red")
    with pytest.raises(TypeError, match="colour"):
        processor(images=image, images_kwargs={"colour": "red"})
    as_numpy = processor(images=image, text=["cat", "dog"], return_tensors="np")
    assert isinstance(as_numpy["input_ids"], np.ndarray) and isinstance(as_numpy["pixel_values"], np.ndarray)


@pytest.mark.parametrize(
    "names, message",
    [
        (["dotted floor", "sky", "Dotted Floor "], "'dotted floor' and 'Dotted Floor ' differ only in case or whitespace"),
        (["red  circle", "red circle"], "'red  circle' and 'red circle' differ only"),
        ([["sky", "road"], ["Road", "road"]], "'Road' and 'road'"),
        (["word " * 80 + "cat", "word " * 80 + "dog"], r"'(word )+cat' and '(word )+dog' become the same prompts once the tokenizer truncates them to \d+ tokens"),
    ],
)
def test_class_names_that_would_tie_are_refused_naming_both(names, message):
    processor = MaftProcessor.from_pretrained(default_model_path())
    with pytest.raises(ValueError, match=message):
        processor(text=names)


def jpeg_with_orientation(array: np.ndarray, orientation: int) -> bytes:
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def test_loader_turns_photos_upright_by_their_exif_orientation(tmp_path):
    array = random_array(30, 50)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(jpeg_with_orientation(array, 6))  # 6: shown rotated 90 degrees clockwise
    upright = to_rgb_array(path)
    assert upright.shape == (50, 30, 3)
    with Image.open(path) as opened:
        plain = np.asarray(opened.convert("RGB"))
        assert to_rgb_array(opened).shape == (50, 30, 3)
    np.testing.assert_array_equal(upright, np.rot90(plain, k=-1))
    assert MaftImageProcessor()(path, do_resize=False)["image_sizes"].tolist() == [[50, 30]]


def test_loader_scales_sixteen_bit_images_and_refuses_out_of_range_integers(tmp_path):
    values = np.array([[0, 257, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert to_rgb_array(path)[0, :, 0].tolist() == [0, 1, 255]
    with pytest.raises(ValueError, match="image 0 has integer pixel values in \\[0, 65535\\]"):
        MaftImageProcessor()(values)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixels_are_refused_naming_the_image(bad):
    broken = random_array(20, 20).astype(np.float32)
    broken[3, 4, 1] = bad
    with pytest.raises(ValueError, match="image 1 has NaN or infinite pixel values"):
        MaftImageProcessor()([random_array(20, 20), broken])
    with pytest.raises(ValueError, match="image 0 has NaN or infinite"):
        MaftImageProcessor()(torch.from_numpy(broken).permute(2, 0, 1))


def test_awkward_images_give_an_error_or_a_result_never_a_crash(tmp_path, monkeypatch):
    assert MaftImageProcessor()(Image.fromarray(random_array(1, 10000)))["image_sizes"].tolist() == [[1, 2560]]
    assert MaftImageProcessor()(Image.fromarray(random_array(10000, 1)))["image_sizes"].tolist() == [[2560, 1]]
    bomb = tmp_path / "bomb.png"
    Image.fromarray(random_array(100, 100)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="Cannot read image 0 .*bomb.png.*decompression bomb"):
        MaftImageProcessor()(bomb)
    with pytest.raises(ValueError, match="must be a path, a PIL image"):
        MaftImageProcessor()([[1, 2], [3, 4]])
