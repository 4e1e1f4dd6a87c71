"""Post-processing into label maps (chunked, equal to the full computation) and label-map images of any vocabulary."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput

from maft import MaftImageProcessor
from maft import processing_maft
from maft.utils.visualization import label_map_image


def random_outputs(batch_size: int, num_queries: int, num_classes: int, mask_size: tuple[int, int], image_sizes, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        class_queries_logits=torch.randn(batch_size, num_queries, num_classes + 1, generator=generator) * 3,
        masks_queries_logits=torch.randn(batch_size, num_queries, *mask_size, generator=generator) * 4,
        image_sizes=torch.tensor(image_sizes),
    )


def full_label_maps(outputs, target_sizes, mask_stride: int = 4) -> list[torch.Tensor]:
    """The straightforward computation, holding every class's scores at the target size."""
    probabilities = outputs.class_queries_logits.softmax(-1)[..., :-1]
    padded = [side * mask_stride for side in outputs.masks_queries_logits.shape[-2:]]
    maps = []
    for index, (height, width) in enumerate(outputs.image_sizes.tolist()):
        masks = F.interpolate(outputs.masks_queries_logits[index : index + 1], size=padded, mode="bilinear", align_corners=True)
        scores = torch.einsum("qc,qhw->chw", probabilities[index], masks[0, :, :height, :width].sigmoid())
        maps.append(F.interpolate(scores[None], size=tuple(target_sizes[index]), mode="bilinear", align_corners=False)[0].argmax(0))
    return maps


@pytest.mark.parametrize("chunk_elements, band_pixels", [(1, 1), (5000, 300), (2**24, 2**20)])
def test_label_maps_equal_the_full_computation_in_any_chunking(chunk_elements, band_pixels, monkeypatch):
    monkeypatch.setattr(processing_maft, "POSTPROCESS_CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(processing_maft, "POSTPROCESS_BAND_PIXELS", band_pixels)
    outputs = random_outputs(2, 16, 150, (24, 32), [[90, 120], [61, 77]])
    target_sizes = [(143, 211), (40, 33)]  # larger and smaller than the padded input, other aspect ratios
    maps = MaftImageProcessor().post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
    for label_map, expected in zip(maps, full_label_maps(outputs, target_sizes)):
        assert label_map.dtype == torch.int64
        assert torch.equal(label_map, expected)
        assert len(expected.unique()) > 5  # the maps are not trivially constant


def test_a_target_size_equal_to_the_image_size_labels_as_resizing_to_it_would():
    """The map is not resized then (an identity); its labels, ties included, are those of the resized scores."""
    outputs = random_outputs(2, 16, 150, (24, 32), [[90, 120], [96, 128]])
    outputs.class_queries_logits[1, :, 3] = outputs.class_queries_logits[1, :, 4]  # classes 3 and 4 tie everywhere
    target_sizes = [(90, 120), (96, 128)]
    maps = MaftImageProcessor().post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
    for label_map, expected in zip(maps, full_label_maps(outputs, target_sizes)):
        assert label_map.dtype == torch.int64 and torch.equal(label_map, expected)


@pytest.mark.parametrize("chunk_elements", [30, 2**24])
def test_ties_go_to_the_first_class_as_argmax(chunk_elements, monkeypatch):
    monkeypatch.setattr(processing_maft, "POSTPROCESS_CHUNK_ELEMENTS", chunk_elements)
    scores = torch.zeros(4, 3, 3)
    scores[1, 2, 2] = scores[2, 0, 0] = scores[3, 0, 0] = 1.0
    labels = processing_maft.resized_argmax(scores, (5, 6))
    assert torch.equal(labels.long(), processing_maft.resize_scores(scores, (5, 6)).argmax(0))
    assert set(labels.unique().tolist()) == {0, 1, 2}


def test_segmentation_scores_are_returned_as_mask2former_does():
    outputs = random_outputs(1, 8, 5, (6, 8), [[20, 30]])
    result = MaftImageProcessor().post_process_semantic_segmentation(outputs, target_sizes=[(11, 13)], return_segmentation_scores=True)[0]
    assert isinstance(result, SemanticSegmentationPostProcessorOutput)
    assert result.segmentation_scores.shape == (5, 11, 13) and torch.equal(result.segmentation, result.segmentation_scores.argmax(0))
    assert torch.equal(result.segmentation, full_label_maps(outputs, [(11, 13)])[0])
    unresized = MaftImageProcessor().post_process_semantic_segmentation(outputs, return_segmentation_scores=True)[0]
    assert unresized["segmentation_scores"].shape == (5, 20, 30)


@pytest.mark.parametrize("num_classes", [3, 256, 459, 847])
def test_label_map_images_keep_every_class_index(num_classes, tmp_path):
    label_map = np.random.default_rng(0).integers(0, num_classes, (37, 53))
    label_map[0, 0] = num_classes - 1
    image = label_map_image(label_map)
    assert image.mode == ("L" if num_classes <= 256 else "I;16")
    image.save(tmp_path / "labels.png")
    with Image.open(tmp_path / "labels.png") as reread:
        np.testing.assert_array_equal(np.asarray(reread), label_map)


@pytest.mark.parametrize("bad", [-1, 65536])
def test_label_map_images_refuse_indices_they_cannot_hold(bad):
    with pytest.raises(ValueError, match="class indices 0-65535"):
        label_map_image(np.array([[0, bad]]))


@pytest.mark.parametrize(
    "target_sizes, message",
    [
        ([(0, 7)], r"target size of image 0 must be \(height, width\), both at least 1, got \(0, 7\)"),
        (torch.tensor([[9, 0]]), r"target size of image 0 .* got \(9, 0\)"),
        ([(5, -2)], r"got \(5, -2\)"),
        ([(5, 7, 1)], r"must be \(height, width\).* got \(5, 7, 1\)"),
        ([(5, 7), (5, 7)], "2 target sizes for a batch of 1"),
    ],
)
@pytest.mark.parametrize("return_segmentation_scores", [False, True])
def test_a_target_size_that_is_not_two_positive_sides_is_refused_naming_it(target_sizes, message, return_segmentation_scores):
    outputs = random_outputs(1, 3, 2, (4, 5), [(13, 17)])
    with pytest.raises(ValueError, match=message):
        MaftImageProcessor().post_process_semantic_segmentation(
            outputs, target_sizes=target_sizes, return_segmentation_scores=return_segmentation_scores
        )
