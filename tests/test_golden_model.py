"""The whole model, converted from the original's weights, reproduces the original's outputs (golden data)."""

import functools

import pytest
import torch
from torch.nn import functional as F

from golden import golden_config, golden_state_dict, golden_tensors, relative_error
from maft import MaftConfig, MaftImageProcessor, MaftModel, convert_original_checkpoint


def golden_image_processor() -> MaftImageProcessor:
    """The golden run rounded every tensor to float16 first, the normalisation constants included."""
    defaults = MaftImageProcessor()
    rounded = {
        name: torch.tensor(getattr(defaults, name)).half().float().tolist()
        for name in ("image_mean", "image_std", "clip_image_mean", "clip_image_std")
    }
    return MaftImageProcessor(do_resize=False, **rounded)


@functools.cache
def golden_model() -> MaftModel:
    """The golden configuration (its README): DeepLab ResNet-50 (stem 16, res2 32, width 8), 32-wide heads, a 4-layer
    decoder, a 64-wide 2-layer text tower and a 128-wide 6-layer image tower with embed dim 32."""
    config = MaftConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                         vocab_size=49408, max_position_embeddings=77, projection_dim=32),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=2, image_size=64,
                           patch_size=16, projection_dim=32, mask_start_layer=golden_config()["ipclip_start_layer"]),
        backbone_config=dict(model_type="maft_deeplab_resnet", depths=[3, 4, 6, 3], stem_out_channels=16,
                             res2_out_channels=32, width_per_group=8),
        feature_size=32, mask_feature_size=32, encoder_layers=2, context_attention_dim=64, hidden_dim=32,
        decoder_layers=4, decoder_feedforward_dim=64, class_embed_hidden_dim=64, projection_dim=32,
        deformable_attention_backend="pytorch",
    )
    return convert_original_checkpoint(golden_state_dict(), config)


def test_unknown_original_keys_are_listed_by_module():
    state_dict = dict(golden_state_dict())
    state_dict["sem_seg_head.extra_head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"sem_seg_head.extra_head: 1 keys"):
        convert_original_checkpoint(state_dict, golden_model().config)


def test_a_missing_original_key_fails():
    state_dict = {key: value for key, value in golden_state_dict().items() if key != "sem_seg_head.interaction.gamma"}
    with pytest.raises(ValueError, match="missing.*context_interaction.layer_scale"):
        convert_original_checkpoint(state_dict, golden_model().config)


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
    scores = MaftImageProcessor().post_process_semantic_segmentation(outputs, return_scores=True)[0]["scores"]
    assert scores.shape == tensors["infer_sem_seg"].shape
    assert relative_error(scores, tensors["infer_sem_seg"]) < 1e-4


def test_training_losses_match_the_original():
    tensors = golden_tensors()
    images = [tensors[f"train_image_{index}"].numpy() for index in range(2)]
    labels = [tensors[f"train_label_{index}"].numpy() for index in range(2)]
    inputs = golden_image_processor()(images, segmentation_maps=labels)
    assert relative_error(inputs["clip_pixel_values"], tensors["train_ipclip_images"]) < 1e-5
    model = golden_model()
    model.train()
    outputs = model(
        inputs["pixel_values"], inputs["clip_pixel_values"], text_embeds=tensors["train_text_features"][:-1],
        labels=inputs["labels"],
    )
    model.eval()
    assert relative_error(outputs.masks_queries_logits.detach(), tensors["train_pred_masks"]) < 1e-4
    torch.testing.assert_close(outputs.loss_dict["mask_aware_loss"].detach(), tensors["train_ma_loss"][0], rtol=1e-4, atol=0)
    torch.testing.assert_close(
        outputs.loss_dict["distillation_loss"].detach(), tensors["train_dis_loss_weighted"][0], rtol=1e-4, atol=0
    )
