"""Stage 1: Hungarian matching, the proposal losses, and training the proposal generator."""

import pytest
import torch

from maft.modeling_maft import dice_loss_per_mask, hungarian_match, proposal_losses, sigmoid_focal_loss_per_pixel
from maft.training import MaftTrainingArguments, MaftTrainingCollator, train
from test_modeling import tiny_config, tiny_model, tiny_processor
from test_training import CLASS_NAMES, synthetic_dataset


def test_focal_and_dice_by_hand():
    logits, targets = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    p = torch.sigmoid(logits)
    # pixel 0: positive, p = 0.5; pixel 1: negative, p = sigmoid(2)
    expected = torch.stack([0.25 * torch.log(torch.tensor(2.0)) * 0.5**2, 0.75 * -torch.log(1 - p[0, 1]) * p[0, 1] ** 2])[None]
    torch.testing.assert_close(sigmoid_focal_loss_per_pixel(logits, targets), expected)
    torch.testing.assert_close(dice_loss_per_mask(logits, targets), 1 - (2 * 0.5 + 1) / (p.sum(-1) + 1 + 1))


def test_matching_finds_the_obvious_assignment():
    masks = torch.zeros(2, 4, 4)
    masks[0, :2], masks[1, 2:] = 1, 1
    mask_logits = torch.full((3, 4, 4), -8.0)
    mask_logits[2, :2], mask_logits[0, 2:] = 8.0, 8.0  # query 2 draws mask 0, query 0 draws mask 1
    class_logits = torch.zeros(3, 4)
    class_logits[2, 1], class_logits[0, 3] = 5.0, 5.0
    queries, targets = hungarian_match(class_logits, mask_logits, torch.tensor([1, 3]), masks, 1.0, 20.0, 5.0)
    assert dict(zip(queries.tolist(), targets.tolist())) == {2: 0, 0: 1}


def test_losses_are_low_for_perfect_predictions_and_use_every_layer():
    config = tiny_config()
    labels = torch.full((1, 16, 16), 255)
    labels[0, :8], labels[0, 8:12] = 0, 2
    perfect_masks = torch.full((1, 5, 4, 4), -20.0)
    perfect_masks[0, 0, :2], perfect_masks[0, 1, 2:3] = 20.0, 20.0
    perfect_classes = torch.full((1, 5, 4), -20.0)
    perfect_classes[0, :, 3] = 20.0
    perfect_classes[0, 0], perfect_classes[0, 1] = torch.tensor([20.0, -20, -20, -20]), torch.tensor([-20.0, -20, 20, -20])
    good = [{"class_queries_logits": perfect_classes, "masks_queries_logits": perfect_masks}]
    bad = [{"class_queries_logits": torch.zeros(1, 5, 4), "masks_queries_logits": torch.zeros(1, 5, 4, 4)}]
    good_losses, bad_losses = proposal_losses(good, labels, config), proposal_losses(bad, labels, config)
    assert all(good_losses[name] < 1e-3 < bad_losses[name] for name in good_losses)
    twice = proposal_losses(bad * 2, labels, config)
    assert all(torch.isclose(twice[name], 2 * bad_losses[name]) for name in bad_losses)
    with pytest.raises(ValueError, match="vocabulary has 3 classes"):
        proposal_losses(bad, torch.full((1, 16, 16), 7), config)


def test_stage_one_overfits_and_trains_only_the_proposal_generator(tmp_path):
    model, processor = tiny_model(), tiny_processor()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    collator = MaftTrainingCollator(processor, CLASS_NAMES)
    batch = collator(synthetic_dataset(2))
    model.config.training_stage = "proposals"
    model.train()
    initial = model(**batch).loss.item()
    arguments = MaftTrainingArguments(output_dir=str(tmp_path), stage="proposals", per_device_batch_size=2, max_steps=30,
                                      save_steps=30, learning_rate=1e-3, gradient_clip_norm=1.0)
    trained = train(model, processor, synthetic_dataset(2), collator, arguments)
    trained.train()
    final = trained(**batch).loss.item()
    assert final < 0.6 * initial
    changed = {name for name, tensor in trained.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and all(name.startswith(("backbone.", "pixel_decoder.", "context_interaction.", "decoder.", "no_object")) for name in changed)
    assert not any("running_" in name for name in changed)  # frozen batch norm
