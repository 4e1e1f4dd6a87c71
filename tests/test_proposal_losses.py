"""Stage 1: Hungarian matching, the proposal losses (equal to the original's, golden data), and training the proposal
generator."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from golden import golden_image_processor, golden_model, golden_tensors, relative_error, require_golden
from helpers import overfit_stage_one, synthetic_dataset, tiny_model, tiny_processor
from maft.loss_maft import (
    MaftHungarianMatcher,
    MaftProposalLoss,
    dice_loss_per_mask,
    semantic_targets,
    sigmoid_focal_loss_per_pixel,
)
from maft.training import PROPOSAL_GENERATOR_RECIPE, MaftTrainingCollator


def test_focal_and_dice_by_hand():
    logits, targets = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    p = torch.sigmoid(logits)
    # pixel 0: positive, p = 0.5; pixel 1: negative, p = sigmoid(2)
    expected = torch.stack([0.25 * torch.log(torch.tensor(2.0)) * 0.5**2, 0.75 * -torch.log(1 - p[0, 1]) * p[0, 1] ** 2])[None]
    torch.testing.assert_close(sigmoid_focal_loss_per_pixel(logits, targets), expected)
    torch.testing.assert_close(dice_loss_per_mask(logits, targets), 1 - (2 * 0.5 + 1) / (p.sum(-1) + 1 + 1))


def test_matching_finds_the_obvious_assignment():
    labels = torch.full((1, 4, 4), 255)
    labels[0, :2], labels[0, 2:] = 1, 3
    mask_logits = torch.full((1, 3, 4, 4), -8.0)
    mask_logits[0, 2, :2], mask_logits[0, 0, 2:] = 8.0, 8.0  # query 2 draws class 1's mask, query 0 class 3's
    class_logits = torch.zeros(1, 3, 5)
    class_logits[0, 2, 1], class_logits[0, 0, 3] = 5.0, 5.0
    [(queries, targets)] = MaftHungarianMatcher()(class_logits, mask_logits, semantic_targets(labels, 255))
    assert dict(zip(queries.tolist(), targets.tolist())) == {2: 0, 0: 1}


def perfect_and_bad_predictions(labels: torch.Tensor) -> tuple[dict, dict]:
    perfect_masks = torch.full((1, 5, 4, 4), -20.0)
    perfect_masks[0, 0, :2], perfect_masks[0, 1, 2:3] = 20.0, 20.0
    perfect_classes = torch.full((1, 5, 4), -20.0)
    perfect_classes[0, :, 3] = 20.0
    perfect_classes[0, 0], perfect_classes[0, 1] = torch.tensor([20.0, -20, -20, -20]), torch.tensor([-20.0, -20, 20, -20])
    good = {"class_queries_logits": perfect_classes, "masks_queries_logits": perfect_masks}
    bad = {"class_queries_logits": torch.zeros(1, 5, 4), "masks_queries_logits": torch.zeros(1, 5, 4, 4)}
    return good, bad


def test_losses_are_low_for_perfect_predictions_and_deep_supervision_skips_the_last_auxiliary():
    labels = torch.full((1, 16, 16), 255)
    labels[0, :8], labels[0, 8:12] = 0, 2
    good, bad = perfect_and_bad_predictions(labels)
    criterion = MaftProposalLoss()
    good_losses, bad_losses = criterion(**good, labels=labels), criterion(**bad, labels=labels)
    assert all(good_losses[name] < 0.05 < 1 < bad_losses[name] for name in good_losses)
    # auxiliary predictions earliest first: all but the last are supervised, as the original does
    deep = criterion(**bad, labels=labels, auxiliary_predictions=[good, bad, good])
    assert set(deep) == {f"{term}_loss{suffix}" for term in ("class", "mask", "dice") for suffix in ("", "_0", "_1")}
    assert deep["class_loss_0"] < 0.05 and torch.isclose(deep["class_loss_1"], bad_losses["class_loss"])
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\]"):
        criterion(**bad, labels=torch.full((1, 16, 16), 7))


def test_mask_losses_compare_at_the_labels_resolution():
    """A one-pixel-wide stripe that nearest downsampling to the prediction's 4x4 grid loses: at 1/4 resolution the
    ground truth would be empty there; at the labels' 16x16 it is not, and the losses show the difference."""
    labels = torch.full((1, 16, 16), 1)
    labels[0, :, 5] = 0  # column 5 is not sampled by nearest resizing to 4 columns (it takes 0, 4, 8, 12)
    mask_logits = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    class_logits = torch.zeros(1, 2, 3)
    losses = MaftProposalLoss()(class_logits, mask_logits, labels)
    [(queries, targets)] = MaftHungarianMatcher()(class_logits, mask_logits, semantic_targets(labels, 255))
    upsampled = F.interpolate(mask_logits[0, queries][:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    full = semantic_targets(labels, 255)[0][1][targets]
    expected_focal = 20 * sigmoid_focal_loss_per_pixel(upsampled.flatten(1), full.flatten(1)).mean(-1).sum() / 2
    expected_dice = 5 * dice_loss_per_mask(upsampled.flatten(1), full.flatten(1)).sum() / 2
    torch.testing.assert_close(losses["mask_loss"], expected_focal)
    torch.testing.assert_close(losses["dice_loss"], expected_dice)
    quarter = F.interpolate(full[:, None], size=(4, 4), mode="nearest")[:, 0]
    assert not quarter[targets.tolist().index(0)].any()  # at 1/4 resolution the stripe is gone
    quarter_dice = 5 * dice_loss_per_mask(mask_logits[0, queries].flatten(1), quarter.flatten(1)).sum() / 2
    assert not torch.isclose(quarter_dice, expected_dice, rtol=1e-2)


def test_padding_is_negative_for_every_mask_and_an_unlabelled_image_only_teaches_no_object():
    labels = torch.full((2, 8, 8), 255)
    labels[0, :4, :4] = 0  # image 0: class 0 in its top-left; everything else ignored or padding
    mask_logits = torch.zeros(2, 3, 2, 2, requires_grad=True)
    class_logits = torch.zeros(2, 3, 2, requires_grad=True)
    losses = MaftProposalLoss()(class_logits, mask_logits, labels)
    # one ground-truth mask in the batch; its matched logits are 0 everywhere: focal over all 64 pixels, 16 positive
    focal_positive, focal_negative = 0.25 * 0.25 * torch.log(torch.tensor(2.0)), 0.75 * 0.25 * torch.log(torch.tensor(2.0))
    torch.testing.assert_close(losses["mask_loss"], 20 * (16 * focal_positive + 48 * focal_negative) / 64)
    torch.testing.assert_close(losses["dice_loss"], torch.tensor(5 * (1 - (2 * 8 + 1) / (32 + 16 + 1))))
    sum(losses.values()).backward()
    assert class_logits.grad[1].abs().sum() > 0 and mask_logits.grad[1].abs().sum() == 0  # image 1: no object only


def test_stage_one_losses_equal_the_original_term_by_term():
    """The golden stage-1 case: the original's `SetCriterion` losses of its final and three auxiliary predictions."""
    tensors = golden_tensors()
    reference = load_file(require_golden() / "stage1_reference_tensors.safetensors")
    expected = json.loads((require_golden() / "stage1_losses.json").read_text())
    images = [tensors[f"train_image_{index}"].numpy() for index in range(2)]
    labels = [tensors[f"train_label_{index}"].numpy() for index in range(2)]
    inputs = golden_image_processor()(images, segmentation_maps=labels)
    model = golden_model()
    with torch.no_grad():
        outputs = model(inputs["pixel_values"], inputs["clip_pixel_values"], text_embeds=tensors["train_text_features"][:-1])
    assert relative_error(outputs.proposal_class_logits, reference["stage1_pred_logits"]) < 1e-4
    assert relative_error(outputs.masks_queries_logits, reference["stage1_pred_masks"]) < 1e-4
    losses = PROPOSAL_GENERATOR_RECIPE.training_loss(model).criterion(
        outputs.proposal_class_logits, outputs.masks_queries_logits, inputs["labels"], outputs.auxiliary_logits
    )
    names = {"class": "ce", "mask": "mask", "dice": "dice"}
    ours = {f"loss_{names[name.split('_')[0]]}{name[len(name.split('_')[0]) + 5:]}": value.item() for name, value in losses.items()}
    assert set(ours) == set(expected)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, rel=1e-4), name


def test_stage_one_overfits_and_trains_only_the_proposal_generator(tmp_path):
    model, processor = tiny_model(), tiny_processor()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trained, *_, initial, final = overfit_stage_one(model, processor, synthetic_dataset(2), MaftTrainingCollator(processor), 30, tmp_path)
    assert final < 0.6 * initial
    changed = {name for name, tensor in trained.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and all(name.startswith(("backbone.", "pixel_decoder.", "context_interaction.", "decoder.", "no_object")) for name in changed)
    assert not any("running_" in name for name in changed)  # frozen batch norm


def original_stage_one_losses(class_logits, mask_logits, labels, ignore_index=255):
    """An independent, pair-by-pair transcription of the original's `SetCriterion` (no point sampling) for one
    prediction: per image, classes present and their masks; the matcher's cost entry by entry at the prediction's
    resolution; cross-entropy with the no-object weight; focal and dice at the labels' resolution."""
    from scipy.optimize import linear_sum_assignment

    num_classes = class_logits.shape[-1] - 1
    matched, num_masks, ce_numerator, ce_denominator = [], 0, 0.0, 0.0
    for image in range(labels.shape[0]):
        classes = [int(c) for c in labels[image].unique() if c != ignore_index]
        masks = [(labels[image] == c).double() for c in classes]
        small = [F.interpolate(m[None, None], size=mask_logits.shape[-2:], mode="nearest")[0, 0] for m in masks]
        probabilities = class_logits[image].double().softmax(-1)
        cost = torch.zeros(class_logits.shape[1], len(classes), dtype=torch.float64)
        for query in range(class_logits.shape[1]):
            p = mask_logits[image, query].double().sigmoid()
            for target, (c, m) in enumerate(zip(classes, small)):
                focal = torch.where(m > 0, -0.25 * (1 - p) ** 2 * torch.log(p), -0.75 * p**2 * torch.log(1 - p)).mean()
                dice = 1 - (2 * (p * m).sum() + 1) / (p.sum() + m.sum() + 1)
                cost[query, target] = -probabilities[query, c] + 20 * focal + 5 * dice
        queries, targets = linear_sum_assignment(cost.numpy())
        assigned = dict(zip(queries.tolist(), targets.tolist()))
        for query in range(class_logits.shape[1]):
            target_class = classes[assigned[query]] if query in assigned else num_classes
            weight = 1.0 if query in assigned else 0.1
            ce_numerator += -weight * torch.log_softmax(class_logits[image, query].double(), -1)[target_class]
            ce_denominator += weight
        matched += [(mask_logits[image, query], masks[target]) for query, target in assigned.items()]
        num_masks += len(classes)
    focal_sum, dice_sum = 0.0, 0.0
    for logits, mask in matched:
        logits = F.interpolate(logits[None, None].double(), size=mask.shape, mode="bilinear", align_corners=False)[0, 0]
        p = logits.sigmoid()
        focal_sum += torch.where(mask > 0, -0.25 * (1 - p) ** 2 * F.logsigmoid(logits), -0.75 * p**2 * F.logsigmoid(-logits)).mean()
        dice_sum += 1 - (2 * (p * mask).sum() + 1) / (p.sum() + mask.sum() + 1)
    num_masks = max(num_masks, 1)
    return {"class_loss": ce_numerator / ce_denominator, "mask_loss": 20 * focal_sum / num_masks, "dice_loss": 5 * dice_sum / num_masks}


def test_a_held_out_case_equals_an_independent_transcription_of_the_original():
    """The golden inference image, padded with a second, smaller image, and label maps drawn here."""
    tensors = golden_tensors()
    image = tensors["infer_image"].numpy()
    height, width = image.shape[1:]
    first = torch.full((height, width), 255, dtype=torch.long)
    first[: height // 2], first[height // 2 :, : width // 3] = 3, 0
    first[height // 3 : height // 2 + 20, width // 2 :] = 5
    second = torch.full((height - 40, width - 64), 1, dtype=torch.long)
    second[:, :50] = 255
    inputs = golden_image_processor()([image, image[:, : height - 40, : width - 64]], segmentation_maps=[first.numpy(), second.numpy()])
    with torch.no_grad():
        outputs = golden_model()(inputs["pixel_values"], inputs["clip_pixel_values"], text_embeds=tensors["infer_text_features"][:-1])
        losses = MaftProposalLoss()(outputs.proposal_class_logits, outputs.masks_queries_logits, inputs["labels"], outputs.auxiliary_logits)
    predictions = [(outputs.proposal_class_logits, outputs.masks_queries_logits, "")] + [
        (p["class_queries_logits"], p["masks_queries_logits"], f"_{i}") for i, p in enumerate(outputs.auxiliary_logits[:-1])
    ]
    for class_logits, mask_logits, suffix in predictions:
        expected = original_stage_one_losses(class_logits, mask_logits, inputs["labels"])
        for name, value in expected.items():
            assert losses[name + suffix].item() == pytest.approx(value.item(), rel=1e-4), name + suffix
