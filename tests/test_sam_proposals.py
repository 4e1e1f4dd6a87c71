"""Segment Anything as the proposal source: a tiny random `SamModel` saved in the test gives masks that flow into
IP-CLIP's naming and into the semantic, instance and panoptic outputs of `maft segment --proposals sam`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

from maft.cli import main
from maft.cli.model_loading import default_model_path
from maft.inference import encode_vocabulary, name_masks, segment_with_masks
from maft.utils.sam_proposals import SamMaskGenerator, box_nms, mask_boxes


EXAMPLES = default_model_path().parent / "examples"
LABELS = ["striped floor", "dotted grass", "red circle", "blue square"]
# Keeps every mask a random SAM predicts: its predicted IoUs and stabilities mean nothing.
KEEP_ALL = {"pred_iou_threshold": -1e9, "stability_score_threshold": 0.0, "points_per_side": 4}


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory) -> str:
    """A randomly initialised SamModel with a 64-pixel input, and its processor, saved as a checkpoint folder."""
    folder = tmp_path_factory.mktemp("sam")
    config = SamConfig(
        vision_config=dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                           patch_size=16, window_size=2, global_attn_indexes=[1], num_pos_feats=16, mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
    )
    torch.manual_seed(0)
    SamModel(config).save_pretrained(folder)
    image_processor = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                        mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16})
    SamProcessor(image_processor).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def bundled():
    from helpers import bundled_model

    return bundled_model()


def scene() -> np.ndarray:
    return np.asarray(Image.open(EXAMPLES / "scene-0.png").convert("RGB"))


def test_sam_masks_are_named_and_segment_the_image_in_each_task(tiny_sam, bundled):
    model, processor = bundled
    image = scene()
    masks = SamMaskGenerator.from_pretrained(tiny_sam, **KEEP_ALL)(image)
    assert masks.dtype == bool and masks.ndim == 3 and masks.shape[1:] == image.shape[:2] and len(masks) > 0
    text_embeds = encode_vocabulary(model, processor, LABELS)

    logits = name_masks(model, processor, image, masks, text_embeds)
    assert logits.shape == (len(masks), len(LABELS) + 1)

    label_map = segment_with_masks(model, processor, image, masks, text_embeds)
    assert label_map.shape == image.shape[:2] and label_map.min() >= 0 and label_map.max() < len(LABELS)
    # As MAFT's proposals: score[c] = sum_k p[k, c] * mask_k (with the uncovered pixels as one more mask).
    covered = np.concatenate([masks, ~masks.any(axis=0)[None]]) if not masks.any(axis=0).all() else masks
    probabilities = name_masks(model, processor, image, covered, text_embeds)[:, :-1].softmax(dim=-1).numpy()
    expected = np.einsum("kc,khw->chw", probabilities, covered.astype(np.float32)).argmax(axis=0)
    assert (label_map == expected).mean() > 0.999  # ties aside

    segmentation, segments = segment_with_masks(model, processor, image, masks, text_embeds, "instance", threshold=0.0)
    assert segments and all(segment["label_id"] < len(LABELS) for segment in segments)
    assert {int(value) for value in np.unique(segmentation)} <= {-1} | {segment["id"] for segment in segments}
    for segment in segments:  # every instance is one of SAM's masks (or the part of it no better one covers)
        pixels = segmentation == segment["id"]
        assert any((pixels <= mask).all() for mask in masks)

    segmentation, segments = segment_with_masks(model, processor, image, masks, text_embeds, "panoptic", {0, 1}, threshold=0.0)
    stuff = [segment for segment in segments if segment["label_id"] in {0, 1}]
    assert len(stuff) == len({segment["label_id"] for segment in stuff})  # one segment per stuff class


@pytest.mark.parametrize("task, files", [
    ("semantic", {"scene-0_overlay.png", "scene-0_labels.png", "scene-0.json"}),
    ("panoptic", {"scene-0_overlay.png", "scene-0_panoptic.png", "scene-0.json"}),
    ("instance", {"scene-0_overlay.png", "scene-0.json"}),
])
def test_maft_segment_with_sam_proposals_writes_named_segments(tiny_sam, tmp_path, task, files):
    output = tmp_path / "out"
    exit_code = main(["segment", str(EXAMPLES / "scene-0.png"), "--labels", ", ".join(LABELS), "--task", task,
                      "--proposals", "sam", "--sam-model", tiny_sam, "--sam-points-per-side", "4",
                      "--sam-pred-iou-threshold=-1e9", "--sam-stability-threshold", "0",
                      *([] if task == "semantic" else ["--threshold", "0"]), "--output", str(output)])
    assert exit_code == 0
    written = {path.name for path in output.iterdir()}
    assert files <= written
    summary = json.loads((output / "scene-0.json").read_text())
    if task == "semantic":
        assert set(summary["fractions"]) <= set(LABELS) and sum(summary["fractions"].values()) == pytest.approx(1, abs=1e-4)
    elif task == "instance":
        assert summary["instances"] and {f"scene-0_instance-{k}.png" for k in range(1, len(summary["instances"]) + 1)} <= written
    else:
        assert summary["segments_info"]


def test_an_unknown_sam_checkpoint_is_one_line_and_exit_code_one(tmp_path, capsys):
    exit_code = main(["segment", str(EXAMPLES / "scene-0.png"), "--labels", "cat, dog", "--proposals", "sam",
                      "--sam-model", str(tmp_path / "no-such-sam"), "--output", str(tmp_path / "out")])
    assert exit_code == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.strip().splitlines()[-1].startswith("maft segment: ")  # after loading bars


def test_box_suppression_keeps_the_best_of_overlapping_masks():
    masks = torch.zeros(3, 20, 20, dtype=torch.bool)
    masks[0, 2:12, 2:12] = True
    masks[1, 3:12, 2:12] = True  # nearly the same box as mask 0
    masks[2, 14:18, 14:18] = True
    boxes = mask_boxes(masks)
    assert boxes.tolist() == [[2, 2, 12, 12], [2, 3, 12, 12], [14, 14, 18, 18]]
    assert box_nms(boxes, torch.tensor([0.5, 0.9, 0.7]), 0.7).tolist() == [1, 2]
    assert box_nms(boxes, torch.tensor([0.5, 0.9, 0.7]), 0.95).tolist() == [1, 2, 0]
