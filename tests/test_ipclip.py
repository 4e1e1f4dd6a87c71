"""IP-CLIP encoder: the split attention against a dense-mask formulation, CLIP parity, loading, training recipe, errors."""

import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError
import torch
from torch.nn import functional as F
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from ipclip_reference import dense_mask_proposal_embeds
from maft import MaftClipVisionConfig, MaftClipVisionModel, MaftConfig, MaftModel
from maft.training import MASK_AWARE_FINE_TUNING_RECIPE


def tiny_vision_config(**overrides) -> MaftClipVisionConfig:
    values = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
        mask_start_layer=2,
    )
    values.update(overrides)
    return MaftClipVisionConfig(**values)


def tiny_model(dtype: torch.dtype = torch.float32, **overrides) -> MaftClipVisionModel:
    torch.manual_seed(0)
    model = MaftClipVisionModel(tiny_vision_config(**overrides)).eval().to(dtype)
    # Larger class and position embeddings than the init gives, so that masking errors show up clearly.
    with torch.no_grad():
        model.embeddings.class_embedding.normal_()
        model.embeddings.position_embedding.weight.normal_()
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("num_proposals", [1, 3, 7])
@pytest.mark.parametrize("image_size", [(32, 32), (48, 40)])
def test_split_attention_equals_dense_mask(dtype, tolerance, num_proposals, image_size):
    model = tiny_model(dtype)
    interpolate = image_size != (32, 32)
    generator = torch.Generator().manual_seed(num_proposals)
    pixel_values = torch.randn(2, 3, *image_size, generator=generator, dtype=dtype)
    masks = torch.rand(2, num_proposals, 37, 29, generator=generator, dtype=dtype)
    masks[0, 0] = 0.0  # an empty mask: the proposal sees only itself
    masks[1, -1] = 1.0  # a full mask
    with torch.no_grad():
        expected = dense_mask_proposal_embeds(model, pixel_values, masks, interpolate)
        actual = model(pixel_values, mask_proposals=masks, interpolate_pos_encoding=interpolate).proposal_embeds
    assert actual.shape == (2, num_proposals, 16)
    assert torch.isfinite(actual).all()
    assert relative_error(actual, expected) < tolerance


def test_masks_change_the_answer_and_the_empty_mask_is_finite():
    model = tiny_model()
    pixel_values = torch.randn(1, 3, 32, 32)
    left, right, empty, left_again = torch.zeros(4, 32, 32)
    left[:, :16], right[:, 16:], left_again[:, :15] = 1.0, 1.0, 0.9  # left_again is `left` on the 4x4 patch grid
    with torch.no_grad():
        masks = torch.stack([left, right, empty, left_again])[None]
        embeds = model(pixel_values, mask_proposals=masks).proposal_embeds[0]
    assert torch.isfinite(embeds).all()
    assert relative_error(embeds[0], embeds[1]) > 1e-3
    torch.testing.assert_close(embeds[0], embeds[3])


def test_boolean_and_probability_masks_agree():
    model = tiny_model()
    pixel_values = torch.randn(2, 3, 32, 32)
    masks = torch.rand(2, 4, 32, 32) > 0.5
    with torch.no_grad():
        from_bool = model(pixel_values, mask_proposals=masks).proposal_embeds
        from_float = model(pixel_values, mask_proposals=masks.float()).proposal_embeds
    torch.testing.assert_close(from_bool, from_float)


def test_mask_start_layer_zero_and_default():
    assert MaftClipVisionConfig().mask_start_layer == 8
    assert MaftClipVisionConfig(num_hidden_layers=24).mask_start_layer == 16
    model = tiny_model(mask_start_layer=0)
    pixel_values, masks = torch.randn(1, 3, 32, 32), torch.rand(1, 2, 32, 32)
    with torch.no_grad():
        expected = dense_mask_proposal_embeds(model, pixel_values, masks, interpolate=False)
        actual = model(pixel_values, mask_proposals=masks).proposal_embeds
    assert relative_error(actual, expected) < 1e-5


def test_batch_of_one_keeps_its_batch_dimension_and_zero_proposals():
    model = tiny_model()
    with torch.no_grad():
        single = model(torch.randn(1, 3, 32, 32), mask_proposals=torch.rand(1, 1, 32, 32))
        none = model(torch.randn(2, 3, 32, 32), mask_proposals=torch.rand(2, 0, 32, 32))
    assert single.proposal_embeds.shape == (1, 1, 16)
    assert single.last_hidden_state.shape == (1, 1, 32)
    assert none.proposal_embeds.shape == (2, 0, 16)


def save_tiny_clip(path) -> CLIPModel:
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, vocab_size=99),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )
    clip = CLIPModel(config).eval()
    clip.save_pretrained(path)
    return clip


def test_loads_a_clip_checkpoint_and_matches_transformers_without_masks(tmp_path):
    clip = save_tiny_clip(tmp_path)
    model, loading_info = MaftClipVisionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert loading_info["missing_keys"] == set()
    assert loading_info["unexpected_keys"] == set()
    assert loading_info["mismatched_keys"] == set()
    assert model.config.projection_dim == 16
    assert model.config.mask_start_layer == 2

    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.eval()(pixel_values, output_hidden_states=True)
        theirs = CLIPVisionModel.from_pretrained(tmp_path).eval()(pixel_values, output_hidden_states=True)
        theirs_projected = clip.get_image_features(pixel_values=pixel_values).pooler_output
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.image_embeds, theirs_projected, rtol=0, atol=1e-6)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 4
    assert ours.proposal_embeds is None


def test_loads_a_vision_with_projection_checkpoint(tmp_path):
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16
    )
    reference = CLIPVisionModelWithProjection(config).eval()
    reference.save_pretrained(tmp_path / "vision")
    model, loading_info = MaftClipVisionModel.from_pretrained(tmp_path / "vision", output_loading_info=True)
    assert not any(loading_info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(pixel_values).image_embeds, reference(pixel_values).image_embeds, rtol=0, atol=1e-6)


def test_save_and_load_round_trip_is_exact(tmp_path):
    model = tiny_model(mask_threshold=0.3, position_interpolation_align_corners=False)
    model.save_pretrained(tmp_path)
    loaded = MaftClipVisionModel.from_pretrained(tmp_path)
    assert loaded.config.mask_threshold == 0.3
    assert loaded.config.position_interpolation_align_corners is False
    assert loaded.config.mask_start_layer == 2
    for (name, expected), (_, actual) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(expected, actual), name


def test_position_interpolation_switch():
    pixel_values = torch.randn(1, 3, 48, 40)
    transformers_style = tiny_model(position_interpolation_align_corners=False)
    reference = CLIPVisionModel(transformers_style.config).eval()
    reference.load_state_dict(transformers_style.state_dict(), strict=False)
    with torch.no_grad():
        ours = transformers_style(pixel_values, interpolate_pos_encoding=True).last_hidden_state
        theirs = reference(pixel_values, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)

    maft_style = tiny_model()
    embeddings = maft_style.embeddings
    positions = embeddings.position_embedding.weight
    grid = positions[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 5), mode="bicubic", align_corners=True).permute(0, 2, 3, 1).reshape(30, -1)
    with torch.no_grad():
        interpolated = embeddings.interpolate_pos_encoding(torch.zeros(1, 31, 32), 48, 40)[0]
    torch.testing.assert_close(interpolated[0], positions[0])
    torch.testing.assert_close(interpolated[1:], expected)
    assert (interpolated[1:] - theirs.new_tensor(0)).abs().sum() > 0
    with torch.no_grad():
        assert relative_error(maft_style(pixel_values, interpolate_pos_encoding=True).last_hidden_state, ours) > 1e-3


def test_mask_aware_finetuning_recipe_trains_exactly_the_attention_and_norms():
    model = MaftModel(MaftConfig(
        vision_config=tiny_model(num_hidden_layers=2, mask_start_layer=1).config.to_dict(),
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, projection_dim=16),
        backbone_config=dict(model_type="maft_deeplab_resnet", depths=[1, 1, 1, 1], stem_out_channels=16,
                             res2_out_channels=32, width_per_group=8, res5_multi_grid=[2]),
        feature_size=32, mask_feature_size=32, encoder_layers=1, hidden_dim=32, decoder_layers=1, num_queries=3,
        decoder_feedforward_dim=32, class_embed_hidden_dim=32, context_attention_dim=32, projection_dim=16,
    ))
    trainable = MASK_AWARE_FINE_TUNING_RECIPE.apply_to(model)
    expected = ["ip_clip.post_layernorm.weight", "ip_clip.post_layernorm.bias"]
    for index in range(2):
        for part in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "layer_norm1", "layer_norm2"):
            expected += [f"ip_clip.encoder.layers.{index}.{part}.weight", f"ip_clip.encoder.layers.{index}.{part}.bias"]
    assert sorted(trainable) == sorted(expected)
    assert sorted(name for name, p in model.named_parameters() if p.requires_grad) == sorted(expected)

    model.ip_clip.train()
    output = model.ip_clip(torch.randn(2, 3, 32, 32), mask_proposals=torch.rand(2, 3, 32, 32))
    output.proposal_embeds.square().sum().backward()
    for name, parameter in model.named_parameters():
        if name in expected:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


@pytest.mark.parametrize(
    "pixel_shape, mask, message",
    [
        ((3, 32, 32), None, "pixel_values"),
        ((2, 1, 32, 32), None, "pixel_values"),
        ((2, 3, 32, 32), torch.rand(2, 32, 32), "mask_proposals` must have shape"),
        ((2, 3, 32, 32), torch.rand(1, 3, 32, 32), "batch size 1"),
        ((2, 3, 32, 32), torch.full((2, 3, 32, 32), float("nan")), "NaN"),
        ((2, 3, 32, 32), torch.full((2, 3, 32, 32), float("inf")), "NaN or infinite"),
        ((2, 3, 32, 32), torch.ones(2, 3, 32, 32, dtype=torch.int64), "boolean or floating"),
        ((2, 3, 32, 32), torch.ones(2, 3, 0, 32), "non-empty spatial size"),
    ],
)
def test_bad_inputs_raise_clear_errors(pixel_shape, mask, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model(torch.randn(pixel_shape), mask_proposals=mask)


@pytest.mark.parametrize("mask_proposals", [None, torch.rand(3, 2, 32, 32)])
def test_non_finite_pixel_values_are_refused_naming_the_image_as_maft_model_does(mask_proposals):
    pixel_values = torch.randn(3, 3, 32, 32)
    pixel_values[2, 1, 4, 4] = float("nan")
    pixel_values[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"`pixel_values` of image\(s\) \[0, 2\] holds NaN or infinite values"):
        tiny_model()(pixel_values, mask_proposals=mask_proposals)


def test_a_truncated_weights_file_is_named(tmp_path):
    save_tiny_clip(tmp_path)
    weights = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    with pytest.raises(ValueError, match=f"{tmp_path / 'model.safetensors'} is incomplete or corrupt"):
        MaftClipVisionModel.from_pretrained(tmp_path)


def test_hidden_states_with_masks_raise():
    model = tiny_model()
    with pytest.raises(ValueError, match="only available without `mask_proposals`"):
        model(torch.randn(1, 3, 32, 32), mask_proposals=torch.rand(1, 2, 32, 32), output_hidden_states=True)


def test_config_validation():
    # transformers' strict configs wrap the ValueError of a validator.
    with pytest.raises(StrictDataclassClassValidationError, match=r"mask_start_layer` must be in \[0, num_hidden_layers - 1\]"):
        MaftClipVisionConfig(num_hidden_layers=4, mask_start_layer=4)
    with pytest.raises(StrictDataclassClassValidationError, match="mask_threshold"):
        MaftClipVisionConfig(mask_threshold=0.0)


def test_ip_clip_with_masks_compiles_without_graph_breaks():
    model = tiny_model().eval()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 32, 32), mask_proposals=torch.rand(1, 4, 16, 16))
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [str(reason.reason)[:200] for reason in explanation.break_reasons]
