"""The whole model, converted from the original's weights, reproduces the original's outputs (golden data)."""

import pytest
import torch
from torch.nn import functional as F

from golden import (
    golden_config,
    golden_image_processor,
    golden_ipclip,
    golden_model,
    golden_state_dict,
    golden_tensors,
    relative_error,
)
from maft import MaftImageProcessor, convert_original_checkpoint
from maft.training import MASK_AWARE_FINE_TUNING_RECIPE


def test_configuration_is_derived_from_the_checkpoint_and_its_yaml():
    config = golden_model().config
    assert config.backbone_config.depths == [3, 4, 6, 3] and config.backbone_config.stem_out_channels == 16
    assert (config.feature_size, config.encoder_layers, config.hidden_dim, config.decoder_layers) == (32, 2, 32, 4)
    assert (config.context_attention_dim, config.class_embed_hidden_dim, config.projection_dim) == (64, 64, 32)
    assert (config.vision_config.hidden_size, config.vision_config.num_attention_heads, config.vision_config.image_size) == (128, 2, 64)
    assert (config.text_config.hidden_size, config.text_config.num_attention_heads) == (64, 1)
    assert config.decoder_attention_heads == 8 and config.ensemble_weight == 0.0


def test_unknown_original_keys_are_listed_by_module():
    state_dict = dict(golden_state_dict())
    state_dict["sem_seg_head.extra_head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"sem_seg_head.extra_head: 1 keys"):
        convert_original_checkpoint(state_dict, golden_config()["config"], deformable_attention_backend="pytorch")


def test_a_missing_original_key_fails():
    state_dict = {key: value for key, value in golden_state_dict().items() if key != "sem_seg_head.interaction.gamma"}
    with pytest.raises(ValueError, match="missing.*context_interaction.layer_scale"):
        convert_original_checkpoint(state_dict, golden_config()["config"], deformable_attention_backend="pytorch")


def test_inference_matches_the_original():
    tensors = golden_tensors()
    image = tensors["infer_image"]  # (3, H, W), float, already at its processing size
    inputs = golden_image_processor()(image.numpy(), return_tensors="pt")
    assert relative_error(inputs["clip_pixel_values"], tensors["infer_ipclip_images"]) < 1e-5
    text_embeds = tensors["infer_text_features"][:-1]
    with torch.no_grad():
        outputs = golden_model()(
            inputs["pixel_values"], inputs["clip_pixel_values"], text_embeds=text_embeds, image_sizes=inputs["image_sizes"]
        )
    assert relative_error(outputs.masks_queries_logits, tensors["infer_pred_masks"]) < 1e-4
    expected_embeds = F.normalize(tensors["infer_ipclip_output"], dim=-1)
    assert relative_error(outputs.proposal_embeds, expected_embeds) < 1e-4
    scores = MaftImageProcessor().post_process_semantic_segmentation(outputs, return_segmentation_scores=True)[0]["segmentation_scores"]
    assert scores.shape == tensors["infer_sem_seg"].shape
    assert relative_error(scores, tensors["infer_sem_seg"]) < 1e-4


def test_training_losses_match_the_original():
    """Stage 2: the mask-aware loss and the weighted self-distillation loss, the teacher being the original's frozen
    CLIP image tower (a converted model has no teacher: training supplies it)."""
    tensors = golden_tensors()
    images = [tensors[f"train_image_{index}"].numpy() for index in range(2)]
    labels = [tensors[f"train_label_{index}"].numpy() for index in range(2)]
    inputs = golden_image_processor()(images, segmentation_maps=labels, per_image_clip_view=False)
    assert relative_error(inputs["clip_pixel_values"], tensors["train_ipclip_images"]) < 1e-5
    model = golden_model()
    stage_loss = MASK_AWARE_FINE_TUNING_RECIPE.training_loss(model, teacher=golden_ipclip("clip_adapter.clip_model.visual."))
    with torch.no_grad():
        losses = stage_loss(model, inputs, tensors["train_text_features"][:-1])
    torch.testing.assert_close(losses["mask_aware_loss"], tensors["train_ma_loss"][0], rtol=1e-4, atol=0)
    torch.testing.assert_close(losses["distillation_loss"], tensors["train_dis_loss_weighted"][0], rtol=1e-4, atol=0)
