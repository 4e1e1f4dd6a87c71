"""MAFT's stage-2 losses: the golden values of the original, hand-computed cases and edge cases."""

import pytest
import torch
from torch.nn import functional as F

from golden import golden_ipclip, golden_tensors
from maft.loss_maft import distillation_loss, mask_aware_loss


def golden_training_batch():
    tensors = golden_tensors()
    labels = torch.full((2, 320, 320), 255, dtype=torch.long)
    for index in range(2):
        label = tensors[f"train_label_{index}"]
        labels[index, : label.shape[0], : label.shape[1]] = label.long()
    masks = F.interpolate(tensors["train_pred_masks"], size=(320, 320), mode="bilinear", align_corners=True).sigmoid()
    return tensors, labels, masks


def test_mask_aware_loss_matches_the_original():
    tensors, labels, masks = golden_training_batch()
    text_features = tensors["train_text_features"]
    embeds = F.normalize(tensors["train_ipclip_output"], dim=-1)
    probabilities = (100 * embeds @ text_features.T)[..., :-1].softmax(dim=-1)
    loss = mask_aware_loss(probabilities, masks, labels)
    torch.testing.assert_close(loss, tensors["train_ma_loss"][0], rtol=1e-5, atol=0)


def test_mask_aware_loss_by_hand():
    # One image, two proposals over four pixels, one class present (class 1) on pixels 0 and 1, pixel 3 ignored.
    labels = torch.tensor([[[1, 1], [0, 255]]])
    masks = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [1.0, 1.0]]]])
    probabilities = torch.tensor([[[0.2, 0.8], [0.6, 0.4]]])
    # class 1: IoUs 2/2 = 1 and 1/(2+3-1) = 0.25 -> normalised 1 and 0; class 0 (pixel 2): IoUs 0 and 1/3 -> 0 and 1.
    # SmoothL1 (beta 1): 0.5 * mean((0.8-1)^2, (0.4-0)^2, (0.2-0)^2, (0.6-1)^2)
    expected = 0.5 * (0.04 + 0.16 + 0.04 + 0.16) / 4
    assert mask_aware_loss(probabilities, masks, labels).item() == pytest.approx(expected, rel=1e-6)


def test_mask_aware_loss_of_an_unlabelled_crop_is_zero_with_a_gradient():
    probabilities = torch.rand(2, 3, 4, requires_grad=True)
    loss = mask_aware_loss(probabilities, torch.rand(2, 3, 8, 8), torch.full((2, 8, 8), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(probabilities.grad, torch.zeros_like(probabilities))


def test_mask_aware_loss_rejects_labels_outside_the_vocabulary():
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\] or 255"):
        mask_aware_loss(torch.rand(1, 2, 4), torch.rand(1, 2, 4, 4), torch.full((1, 4, 4), 7))


def test_mask_aware_loss_gradient_reaches_only_the_probabilities():
    _, labels, masks = golden_training_batch()
    probabilities = torch.rand(2, 100, 6).softmax(-1).requires_grad_()
    masks.requires_grad_()
    mask_aware_loss(probabilities, masks, labels).backward()
    assert probabilities.grad.abs().sum() > 0
    assert masks.grad is None


def test_distillation_loss_by_hand():
    student, teacher = torch.randn(2, 6), torch.randn(2, 6)
    expected = F.smooth_l1_loss(student.softmax(-1), teacher.softmax(-1))
    torch.testing.assert_close(distillation_loss(student, teacher), expected)
    assert distillation_loss(teacher, teacher).item() == 0.0


def test_weighted_distillation_loss_matches_the_original():
    # Student: IP-CLIP without masks; teacher: the frozen CLIP image tower (clip_adapter's), both on the CLIP input.
    tensors = golden_tensors()
    text_features = tensors["train_text_features"]

    def class_logits(tower_prefix: str) -> torch.Tensor:
        tower = golden_ipclip(tower_prefix)
        with torch.no_grad():
            embeds = tower(tensors["train_ipclip_images"], interpolate_pos_encoding=True).image_embeds
        return (100 * F.normalize(embeds, dim=-1) @ text_features.T)[..., :-1]

    loss = 0.1 * distillation_loss(class_logits("IPCLIP."), class_logits("clip_adapter.clip_model.visual."))
    torch.testing.assert_close(loss, tensors["train_dis_loss_weighted"][0], rtol=1e-4, atol=0)
