"""Instance and panoptic post-processing: hand cases of Mask2Former's rules, target sizes, batches, and parity with a
plain full-size implementation of Mask2Former's panoptic and instance inference."""

from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from maft import MaftImageProcessor
from maft import processing_maft


INSIDE, OUTSIDE = 12.0, -12.0  # mask logits: probability 1 - 6e-6 and 6e-6


def hand_outputs(masks: list[torch.Tensor], class_probabilities: list[list[float]], image_sizes=None, batch: int = 1):
    """Outputs of one image (or `batch` copies) whose proposals have the binary `masks` (h, w) and the class
    probabilities given (the last one no-object); `mask_stride=1` processors see the masks at the image's size."""
    logits = torch.stack([torch.where(mask.bool(), INSIDE, OUTSIDE) for mask in masks])
    classes = torch.tensor(class_probabilities).log()
    return SimpleNamespace(
        class_queries_logits=classes[None].repeat(batch, 1, 1),
        masks_queries_logits=logits[None].repeat(batch, 1, 1, 1),
        image_sizes=torch.tensor(image_sizes or [list(logits.shape[-2:])] * batch),
    )


def box(top: int, left: int, bottom: int, right: int, size=(8, 8)) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


PROCESSOR = MaftImageProcessor(mask_stride=1)


def test_overlapping_panoptic_proposals_split_their_overlap_by_score():
    outputs = hand_outputs([box(0, 0, 8, 5), box(0, 3, 8, 8)], [[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    (result,) = PROCESSOR.post_process_panoptic_segmentation(outputs, overlap_mask_area_threshold=0.5)
    assert [(s["id"], s["label_id"], s["was_fused"]) for s in result["segments_info"]] == [(1, 0, False), (2, 1, False)]
    assert [s["score"] for s in result["segments_info"]] == pytest.approx([0.9, 0.8])
    assert result["segmentation"].dtype == torch.int32 and result["segmentation"].shape == (8, 8)
    assert torch.equal(result["segmentation"], torch.where(box(0, 0, 8, 5), 1, 2).int())  # columns 3-4 go to the 0.9


@pytest.mark.parametrize("overlap_mask_area_threshold, kept", [(0.8, False), (0.5, True)])
def test_a_proposal_keeping_too_little_of_its_mask_is_dropped(overlap_mask_area_threshold, kept):
    # the 0.7 proposal's 4x4 box loses its left half to the 0.9 proposal: it keeps 8 of 16 pixels (0.5)
    outputs = hand_outputs([box(0, 0, 8, 4), box(2, 2, 6, 6)], [[0.9, 0.05, 0.05], [0.15, 0.7, 0.15]])
    (result,) = PROCESSOR.post_process_panoptic_segmentation(outputs, overlap_mask_area_threshold=overlap_mask_area_threshold)
    assert [s["label_id"] for s in result["segments_info"]] == ([0, 1] if kept else [0])
    expected = torch.where(box(0, 0, 8, 4), 1, torch.where(box(2, 4, 6, 6), 2 if kept else 0, 0)).int()
    assert torch.equal(result["segmentation"], expected)


def test_proposals_of_a_stuff_class_fuse_into_one_segment():
    outputs = hand_outputs(
        [box(0, 0, 4, 8), box(4, 0, 8, 4), box(4, 4, 8, 8)],
        [[0.1, 0.6, 0.3], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1]],
    )
    (fused,) = PROCESSOR.post_process_panoptic_segmentation(outputs, label_ids_to_fuse={1})
    assert fused["segments_info"] == [
        {"id": 1, "label_id": 1, "was_fused": True, "score": pytest.approx(0.8)},  # the best of the fused proposals
        {"id": 2, "label_id": 0, "was_fused": False, "score": pytest.approx(0.7)},
    ]
    assert torch.equal(fused["segmentation"], torch.where(box(4, 4, 8, 8), 2, 1).int())
    (things,) = PROCESSOR.post_process_panoptic_segmentation(outputs)  # without stuff, each proposal is a segment
    assert [s["id"] for s in things["segments_info"]] == [1, 2, 3]
    assert things["segmentation"].unique().tolist() == [1, 2, 3]


def test_the_no_object_class_and_low_scores_drop_proposals():
    outputs = hand_outputs([box(0, 0, 8, 4), box(0, 4, 8, 8)], [[0.3, 0.1, 0.6], [0.55, 0.4, 0.05]])
    (result,) = PROCESSOR.post_process_panoptic_segmentation(outputs)  # the first is most likely no object
    assert [s["label_id"] for s in result["segments_info"]] == [0]
    assert torch.equal(result["segmentation"], torch.where(box(0, 4, 8, 8), 1, 0).int())
    (none,) = PROCESSOR.post_process_panoptic_segmentation(outputs, threshold=0.6)
    assert none["segments_info"] == [] and none["segmentation"].shape == (8, 8) and (none["segmentation"] == 0).all()


def test_thresholds_that_drop_every_instance_leave_an_empty_result():
    outputs = hand_outputs([box(0, 0, 8, 4)], [[0.6, 0.3, 0.1]])
    (result,) = PROCESSOR.post_process_instance_segmentation(outputs, threshold=0.7, target_sizes=[(5, 7)])
    assert result["segments_info"] == [] and result["segmentation"].shape == (5, 7) and (result["segmentation"] == -1).all()
    (maps,) = PROCESSOR.post_process_instance_segmentation(outputs, threshold=0.7, target_sizes=[(5, 7)], return_binary_maps=True)
    assert maps["segments_info"] == [] and maps["segmentation"].shape == (0, 5, 7)


def test_instances_are_ranked_over_proposal_class_pairs_and_may_overlap_as_binary_maps():
    # one proposal likely two classes gives two candidates; the second loses every pixel to the first in the map
    outputs = hand_outputs(
        [box(0, 0, 6, 6), box(3, 3, 8, 8), box(7, 0, 8, 1)], [[0.55, 0.4, 0.05], [0.05, 0.9, 0.05], [0.02, 0.02, 0.96]]
    )
    (result,) = PROCESSOR.post_process_instance_segmentation(outputs, threshold=0.3, overlap_mask_area_threshold=0.5)
    assert [(s["id"], s["label_id"]) for s in result["segments_info"]] == [(0, 1), (1, 0)]
    assert [s["score"] for s in result["segments_info"]] == pytest.approx([0.9, 0.55], abs=1e-4)  # class x mask quality
    expected = torch.where(box(3, 3, 8, 8), 0, torch.where(box(0, 0, 6, 6), 1, -1)).int()
    assert torch.equal(result["segmentation"], expected)

    (maps,) = PROCESSOR.post_process_instance_segmentation(outputs, threshold=0.3, return_binary_maps=True)
    assert [(s["id"], s["label_id"]) for s in maps["segments_info"]] == [(0, 1), (1, 0), (2, 1)]
    assert maps["segmentation"].dtype == torch.bool
    assert torch.equal(maps["segmentation"], torch.stack([box(3, 3, 8, 8), box(0, 0, 6, 6), box(0, 0, 6, 6)]))

    (strict,) = PROCESSOR.post_process_instance_segmentation(outputs, threshold=0.3, overlap_mask_area_threshold=0.8)
    assert [s["label_id"] for s in strict["segments_info"]] == [1]  # 27 of 36 pixels kept: 0.75 < 0.8

    (things,) = PROCESSOR.post_process_instance_segmentation(outputs, threshold=0.3, stuff_label_ids=[1])
    assert [(s["id"], s["label_id"]) for s in things["segments_info"]] == [(0, 0)]


@pytest.mark.parametrize("task", ["instance", "panoptic"])
def test_target_sizes_are_honoured_for_a_batch_of_different_sizes(task):
    """Image 0 fills the 8x8 input, image 1 its top-left 6x4; the results have exactly the sizes asked for."""
    outputs = hand_outputs([box(0, 0, 8, 4), box(0, 4, 8, 8)], [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]],
                           image_sizes=[[8, 8], [6, 4]], batch=2)
    post_process = getattr(PROCESSOR, f"post_process_{task}_segmentation")
    first, second = post_process(outputs, target_sizes=[(16, 12), (3, 2)])
    background = -1 if task == "instance" else 0
    ids = [segment["id"] for segment in first["segments_info"]]
    left, right = (ids if first["segments_info"][0]["label_id"] == 0 else ids[::-1])
    expected = torch.full((16, 12), right, dtype=torch.int32)
    expected[:, :6] = left
    assert torch.equal(first["segmentation"], expected)
    # image 1 shows only the left proposal's part of the input: one segment over all of it
    assert [segment["label_id"] for segment in second["segments_info"]] == [0]
    assert second["segmentation"].shape == (3, 2) and (second["segmentation"] == second["segments_info"][0]["id"]).all()
    assert background not in first["segmentation"]
    alone = hand_outputs([box(0, 0, 8, 4), box(0, 4, 8, 8)], [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]], image_sizes=[[6, 4]])
    (unresized,) = post_process(alone)
    assert unresized["segmentation"].shape == (6, 4)  # without target sizes: the image's size in the input


def test_a_wrong_number_of_target_sizes_is_refused():
    outputs = hand_outputs([box(0, 0, 8, 4)], [[0.9, 0.05, 0.05]], batch=2)
    with pytest.raises(ValueError, match="Got 1 target sizes for a batch of 2 images"):
        PROCESSOR.post_process_panoptic_segmentation(outputs, target_sizes=[(8, 8)])


def plain_masks(outputs, index: int, queries: torch.Tensor, size, mask_stride: int) -> torch.Tensor:
    """Mask probabilities of `queries` at `size`, computed whole (the image fills its padded input here)."""
    logits = outputs.masks_queries_logits[index][queries]
    padded = [side * mask_stride for side in logits.shape[-2:]]
    probabilities = F.interpolate(logits[None], size=padded, mode="bilinear", align_corners=True)[0].sigmoid()
    return F.interpolate(probabilities[None], size=size, mode="bilinear", align_corners=False)[0]


def plain_panoptic(outputs, size, threshold, mask_threshold, overlap, fuse, mask_stride=4):
    """Mask2Former's panoptic inference (detectron2's `panoptic_inference`), on whole tensors."""
    scores, labels = outputs.class_queries_logits[0].softmax(-1).max(-1)
    keep = (labels != outputs.class_queries_logits.shape[-1] - 1) & (scores > threshold)
    masks = plain_masks(outputs, 0, keep.nonzero()[:, 0], size, mask_stride)
    scores, labels = scores[keep], labels[keep]
    assigned = (scores[:, None, None] * masks).argmax(0)
    segmentation, segments, stuff = torch.zeros(size, dtype=torch.int32), [], {}
    for k in range(len(masks)):
        mask = assigned == k
        area, original = mask.sum().item(), (masks[k] >= mask_threshold).sum().item()
        mask = mask & (masks[k] >= mask_threshold)
        if area > 0 and original > 0 and mask.sum() > 0 and area / original >= overlap:
            label = labels[k].item()
            if label in stuff:
                segmentation[mask] = stuff[label]
                continue
            segments.append((len(segments) + 1, label))
            segmentation[mask] = len(segments)
            if label in fuse:
                stuff[label] = len(segments)
    return segmentation, segments


def box_proposals(seed: int, num_queries: int, num_classes: int):
    """Outputs of one 24x32 image whose proposals are noisy boxes (at the 6x8 mask resolution), with random classes."""
    generator = torch.Generator().manual_seed(seed)
    corners = torch.randint(0, 6, (num_queries, 2), generator=generator)
    ends = corners + torch.randint(2, 5, (num_queries, 2), generator=generator)
    rows, columns = torch.arange(6)[None, :, None], torch.arange(8)[None, None, :]
    inside = ((rows >= corners[:, :1, None]) & (rows < ends[:, :1, None])
              & (columns >= corners[:, None, 1:]) & (columns < ends[:, None, 1:]))
    return SimpleNamespace(
        class_queries_logits=torch.randn(1, num_queries, num_classes + 1, generator=generator) * 3,
        masks_queries_logits=(torch.where(inside, 5.0, -5.0) + torch.randn(num_queries, 6, 8, generator=generator))[None],
        image_sizes=torch.tensor([[24, 32]]),
    )


@pytest.mark.parametrize("chunk_elements, band_pixels", [(1, 1), (700, 50), (2**24, 2**20)])
def test_panoptic_segments_equal_mask2formers_computed_whole(chunk_elements, band_pixels, monkeypatch):
    monkeypatch.setattr(processing_maft, "POSTPROCESS_CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(processing_maft, "POSTPROCESS_BAND_PIXELS", band_pixels)
    outputs = box_proposals(seed=3, num_queries=30, num_classes=5)
    for size in [(24, 32), (37, 29)]:
        for fuse in [set(), {0}]:
            (result,) = MaftImageProcessor().post_process_panoptic_segmentation(
                outputs, threshold=0.4, overlap_mask_area_threshold=0.6, label_ids_to_fuse=fuse, target_sizes=[size]
            )
            segmentation, segments = plain_panoptic(outputs, size, 0.4, 0.5, 0.6, fuse)
            assert [(s["id"], s["label_id"]) for s in result["segments_info"]] == segments
            assert torch.equal(result["segmentation"], segmentation)
            assert len(segments) == (3 if fuse else 6)  # not a trivial case: four proposals of class 0 fuse


def test_instance_scores_and_masks_equal_mask2formers_computed_whole():
    outputs = box_proposals(seed=1, num_queries=12, num_classes=4)
    (maps,) = MaftImageProcessor().post_process_instance_segmentation(outputs, threshold=0.1, return_binary_maps=True)
    probabilities = outputs.class_queries_logits[0].softmax(-1)[:, :-1]
    class_scores, pairs = probabilities.flatten().topk(12)
    masks = plain_masks(outputs, 0, pairs // 4, (24, 32), 4)
    binary = masks > 0.5
    scores = class_scores * (masks * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    kept = ((scores >= 0.1) & binary.flatten(1).any(1)).nonzero()[:, 0]
    kept = kept[scores[kept].argsort(descending=True)]  # best first
    assert [s["label_id"] for s in maps["segments_info"]] == (pairs % 4)[kept].tolist()
    assert [s["score"] for s in maps["segments_info"]] == pytest.approx(scores[kept].tolist())
    assert torch.equal(maps["segmentation"], binary[kept]) and len(kept) >= 4
