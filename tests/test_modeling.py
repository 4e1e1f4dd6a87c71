"""MaftModel and MaftProcessor on a tiny random configuration: shapes, text embeddings, initialisation, saving, errors."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor, CLIPConfig, CLIPModel

from maft import MaftConfig, MaftImageProcessor, MaftModel, MaftProcessor
from maft.conversion.convert_original_maft_checkpoint import convert_state_dict

from helpers import TEMPLATES, random_image, tiny_config, tiny_model, tiny_processor


def test_forward_shapes_and_segmentation():
    model, processor = tiny_model(), tiny_processor()
    images = [random_image(80, 60), random_image(50, 90, seed=1)]
    inputs = processor(images=images, text=["cat", "sofa", "wall"])
    assert inputs["input_ids"].shape[:2] == (3, 2)
    with torch.no_grad():
        outputs = model(**inputs)
    batch, _, height, width = inputs["pixel_values"].shape
    assert outputs.class_queries_logits.shape == (2, 5, 4)
    assert outputs.masks_queries_logits.shape == (2, 5, height // 4, width // 4)
    assert outputs.proposal_class_logits.shape == outputs.clip_class_logits.shape == (2, 5, 4)
    assert outputs.text_embeds.shape == (2, 3, 16)
    assert len(outputs.auxiliary_logits) == 2
    maps = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1] for image in images])
    assert [tuple(label_map.shape) for label_map in maps] == [(60, 80), (90, 50)]
    assert all(label_map.dtype == torch.int64 and 0 <= label_map.min() and label_map.max() < 3 for label_map in maps)


def test_batch_of_one_and_per_image_vocabularies():
    model, processor = tiny_model(), tiny_processor()
    inputs = processor(images=random_image(64, 64), text=["cat", "dog"])
    with torch.no_grad():
        single = model(**inputs)
    assert single.class_queries_logits.shape == (1, 5, 3)
    inputs = processor(images=[random_image(64, 64), random_image(64, 64, 1)], text=[["cat", "dog"], ["sky", "road"]])
    assert inputs["input_ids"].shape[:3] == (2, 2, 2)
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.text_embeds.shape == (2, 2, 16)
    assert not torch.allclose(outputs.text_embeds[0], outputs.text_embeds[1])


def test_text_embeds_can_replace_input_ids():
    model, processor = tiny_model(), tiny_processor()
    inputs = processor(images=random_image(64, 64), text=["cat", "dog"])
    with torch.no_grad():
        from_ids = model(**inputs)
        embeds = model.get_text_embeddings(inputs["input_ids"], inputs["attention_mask"])
        inputs.pop("input_ids"), inputs.pop("attention_mask")
        from_embeds = model(**inputs, text_embeds=embeds)
    torch.testing.assert_close(from_ids.class_queries_logits, from_embeds.class_queries_logits)
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(2))


def test_text_embeddings_of_a_class_do_not_depend_on_the_other_classes():
    model, processor = tiny_model(), tiny_processor()
    with torch.no_grad():
        alone = model.get_text_embeddings(**processor.tokenize_class_names(["dog"]))
        with_a_longer_name = model.get_text_embeddings(**processor.tokenize_class_names(["a much longer class name", "dog"]))
    torch.testing.assert_close(with_a_longer_name[1], alone[0])
    assert not torch.allclose(with_a_longer_name[0], alone[0])


def test_the_model_holds_no_training_state_and_no_hidden_cache():
    model = tiny_model()
    assert not any("teacher" in name for name, _ in model.named_parameters())
    assert not hasattr(model.config, "training_stage") and not hasattr(model.config, "use_distillation_teacher")
    attributes = set(vars(model)) - set(vars(torch.nn.Module()))
    assert {name for name in attributes if "cache" in name} == set()


def test_a_checkpoint_with_the_old_distillation_teacher_and_config_loads(tmp_path, caplog):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(training_stage="maft", use_distillation_teacher=True, ignore_index=255, clip_image_size=64,
                  prompt_templates=TEMPLATES, mask_aware_loss_weight=1.0, no_object_weight=0.1)
    (tmp_path / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    state_dict = load_file(tmp_path / "model.safetensors")
    state_dict.update({name.replace("ip_clip.", "distillation_teacher.", 1): tensor.clone()
                       for name, tensor in state_dict.items() if name.startswith("ip_clip.")})
    save_file(state_dict, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="maft.modeling_maft"):
        loaded = MaftModel.from_pretrained(tmp_path)
    assert caplog.text.count("Dropping the distillation teacher") == 1
    assert not any("teacher" in name for name in loaded.state_dict())
    assert "training_stage" not in loaded.config.to_dict() and "prompt_templates" not in loaded.config.to_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_fresh_weights_follow_the_original_initialisation():
    model = MaftModel(tiny_config(backbone_config=dict(
        model_type="maft_deeplab_resnet", depths=[1, 1, 1, 1], stem_out_channels=64, res2_out_channels=256,
        width_per_group=64, res5_multi_grid=[2],
    ), feature_size=64, mask_feature_size=64, hidden_dim=64, decoder_feedforward_dim=256, class_embed_hidden_dim=256))

    def uniform_bound(weight):  # a uniform(-b, b) has std b / sqrt(3)
        return weight.std().item() * 3**0.5

    conv = model.backbone.res5[0].conv2.weight  # c2 MSRA fill: He normal, fan out
    assert conv.std().item() == pytest.approx((2 / (conv.shape[0] * conv[0, 0].numel())) ** 0.5, rel=0.05)
    stem = model.backbone.stem.conv3.weight
    assert stem.std().item() == pytest.approx((2 / (stem.shape[0] * 9)) ** 0.5, rel=0.05)
    assert torch.equal(model.backbone.res2[0].conv1.norm.running_var, torch.full((64,), 1 - 1e-5))
    linear = model.decoder.layers[0].linear1.weight  # Xavier uniform
    assert uniform_bound(linear) == pytest.approx((6 / sum(linear.shape)) ** 0.5, rel=0.05)
    in_proj = model.decoder.layers[0].cross_attn.in_proj_weight
    assert uniform_bound(in_proj) == pytest.approx((6 / (in_proj.shape[1] + in_proj.shape[0])) ** 0.5, rel=0.05)
    assert not model.decoder.layers[0].cross_attn.in_proj_bias.any()
    head = model.decoder.class_embed.layers[0]  # PyTorch's default: kaiming uniform a=sqrt(5) -> bound 1/sqrt(fan_in)
    assert uniform_bound(head.weight) == pytest.approx(head.weight.shape[1] ** -0.5, rel=0.05)
    assert head.bias.abs().max().item() <= head.weight.shape[1] ** -0.5 and head.bias.abs().max().item() > 0
    assert model.decoder.query_features.weight.std().item() == pytest.approx(1.0, rel=0.15)  # nn.Embedding: N(0, 1)
    feed_forward = model.pixel_decoder.layers[0].linear1.weight
    assert uniform_bound(feed_forward) == pytest.approx((6 / sum(feed_forward.shape)) ** 0.5, rel=0.05)
    assert not model.pixel_decoder.layers[0].self_attn.sampling_offsets.weight.any()
    mask_features = model.pixel_decoder.mask_features  # c2 Xavier fill: He uniform a=1 -> bound sqrt(3 / fan_in), no bias
    assert uniform_bound(mask_features.weight) == pytest.approx((3 / mask_features.weight[0].numel()) ** 0.5, rel=0.1)
    assert not mask_features.bias.any()
    assert torch.all(model.context_interaction.layer_scale == 0.1) and not model.context_interaction.q_proj.bias.any()
    assert model.no_object_embedding.std().item() == pytest.approx(32**-0.5, rel=0.5)  # text width 32


def test_ensemble_combines_in_vocabulary_and_clip_scores():
    model, processor = tiny_model(ensemble_weight=0.3), tiny_processor()
    inputs = processor(images=random_image(64, 64), text=["cat", "dog", "sky"])
    seen = torch.tensor([True, False, True])
    with torch.no_grad():
        outputs = model(**inputs, seen_classes=seen)
    in_vocabulary = outputs.proposal_class_logits.softmax(-1)[..., :-1]
    clip = outputs.clip_class_logits[..., :-1].softmax(-1)
    expected = torch.where(seen, in_vocabulary**0.3 * clip**0.7, in_vocabulary**0.7 * clip**0.3)
    has_pixels = (
        torch.nn.functional.interpolate(outputs.masks_queries_logits, scale_factor=4, mode="bilinear", align_corners=True) > 0
    ).flatten(2).any(-1)
    expected = torch.where(has_pixels[..., None], expected, torch.where(seen, in_vocabulary**0.3, in_vocabulary**0.7))
    scores = outputs.class_queries_logits.softmax(-1)[..., :-1]
    representable = expected.sum(-1) <= 1
    torch.testing.assert_close(scores[representable], expected[representable])


def test_save_and_load_round_trip_and_auto_classes(tmp_path):
    model, processor = tiny_model(), tiny_processor()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "maft"
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MaftModel) and isinstance(AutoConfig.from_pretrained(tmp_path), MaftConfig)
    for (name, expected), (_, actual) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(expected, actual), name
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded_processor, MaftProcessor) and loaded_processor.prompt_templates == TEMPLATES
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), MaftImageProcessor)
    assert loaded_processor.image_processor.size["shortest_edge"] == 64
    inputs = loaded_processor(images=random_image(64, 48), text=["cat", "dog"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).class_queries_logits, model(**inputs).class_queries_logits, rtol=0, atol=0)


def test_from_clip_pretrained(tmp_path):
    torch.manual_seed(0)
    clip_config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, vocab_size=49408),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )
    clip = CLIPModel(clip_config)
    clip.save_pretrained(tmp_path)
    overrides = {key: value for key, value in tiny_config().to_dict().items() if key not in ("text_config", "vision_config", "projection_dim")}
    overrides = {key: value for key, value in overrides.items() if key in MaftConfig.__dataclass_fields__}
    model = MaftModel.from_clip_pretrained(str(tmp_path), mask_start_layer=1, **overrides)
    assert model.config.vision_config.mask_start_layer == 1
    torch.testing.assert_close(model.ip_clip.visual_projection.weight, clip.visual_projection.weight)
    torch.testing.assert_close(model.ip_clip.embeddings.class_embedding, clip.vision_model.embeddings.class_embedding)
    torch.testing.assert_close(model.text_encoder.text_projection.weight, clip.text_projection.weight)


def test_from_pretrained_of_another_model_type_names_it(tmp_path):
    CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )).save_pretrained(tmp_path / "clip")
    tiny_model().ip_clip.save_pretrained(tmp_path / "ip_clip")
    for folder, model_type, architecture in (("clip", "clip", "CLIPModel"), ("ip_clip", "maft_clip_vision_model", "MaftClipVisionModel")):
        message = f"{tmp_path / folder} holds a '{model_type}' model \\({architecture}\\), not a MAFT model"
        with pytest.raises(ValueError, match=message):
            MaftModel.from_pretrained(tmp_path / folder)
        with pytest.raises(ValueError, match=message):
            MaftConfig.from_pretrained(tmp_path / folder)


def test_a_truncated_weights_file_is_named(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    weights = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=f"{tmp_path / 'model.safetensors'} is incomplete or corrupt \\(truncated"):
        MaftModel.from_pretrained(tmp_path)


def test_default_config_matches_the_released_checkpoint_layout():
    keys = __import__("golden").released_key_list("maft_vitb16")
    converted = convert_state_dict({name: torch.empty(shape, device="meta") for name, shape in keys.items()})
    with torch.device("meta"):
        model = MaftModel(MaftConfig())
    ours = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert ours == {name: tuple(tensor.shape) for name, tensor in converted.items()}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda model, inputs: model(inputs["pixel_values"], input_ids=inputs["input_ids"]), "clip_pixel_values"),
        (lambda model, inputs: model(inputs["pixel_values"], inputs["clip_pixel_values"]), "exactly one of"),
        (lambda model, inputs: model(inputs["pixel_values"], inputs["clip_pixel_values"][:0], input_ids=inputs["input_ids"]), "same batch size"),
    ],
)
def test_model_input_errors(call, message):
    model, processor = tiny_model(), tiny_processor()
    inputs = processor(images=random_image(64, 64), text=["cat", "dog"])
    with pytest.raises(ValueError, match=message):
        call(model, inputs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(text=[]), "non-empty list"),
        (dict(text="cat"), "non-empty list"),
        (dict(text=["cat", "cat"]), "repeated: \\['cat'\\]"),
        (dict(text=["cat", 3]), "non-empty strings"),
        (dict(text=["cat", " "]), "non-empty strings"),
        (dict(text=[["cat"], ["dog", "sky"]]), "same number of names"),
        (dict(images=np.zeros((0, 5, 3), dtype=np.uint8)), "empty"),
        (dict(images=np.zeros((8, 8, 3), dtype=np.uint8), segmentation_maps=np.zeros((4, 8))), "same size"),
        (dict(images="does-not-exist.png"), "Cannot read image 0"),
        (dict(), "Give `images`"),
    ],
)
def test_processor_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_processor()(**kwargs)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F"])
def test_image_processor_accepts_any_pil_mode(mode):
    image = random_image(40, 30).convert(mode) if mode not in ("I;16", "I", "F") else Image.fromarray(
        (np.random.default_rng(0).random((30, 40)) * 60000).astype(np.uint16 if mode == "I;16" else np.int32 if mode == "I" else np.float32)
    )
    inputs = MaftImageProcessor(shortest_edge=32)(image)
    assert inputs["pixel_values"].shape == (1, 3, 32, 64)
    assert inputs["image_sizes"].tolist() == [[32, 43]]
    assert torch.isfinite(inputs["pixel_values"]).all()


def test_post_processing_by_hand():
    class Outputs:
        class_queries_logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]]])
        masks_queries_logits = torch.randn(1, 2, 3, 4)
        image_sizes = torch.tensor([[10, 13]])

    processor = MaftImageProcessor()
    result = processor.post_process_semantic_segmentation(Outputs, return_segmentation_scores=True)[0]
    probabilities = Outputs.class_queries_logits.softmax(-1)[0, :, :-1]
    masks = torch.nn.functional.interpolate(Outputs.masks_queries_logits, size=(12, 16), mode="bilinear", align_corners=True)
    masks = masks[0, :, :10, :13].sigmoid()
    expected = (probabilities[:, :, None, None] * masks[:, None]).sum(0)
    torch.testing.assert_close(result["segmentation_scores"], expected)
    assert torch.equal(result["segmentation"], expected.argmax(0))
    resized = processor.post_process_semantic_segmentation(Outputs, target_sizes=[(5, 7)])[0]
    assert resized.shape == (5, 7)
    with pytest.raises(ValueError, match="2 target sizes for a batch of 1"):
        processor.post_process_semantic_segmentation(Outputs, target_sizes=[(5, 7), (5, 7)])


def test_config_validation():
    from huggingface_hub.errors import StrictDataclassClassValidationError

    with pytest.raises(StrictDataclassClassValidationError, match="divisible by `decoder_attention_heads`"):
        tiny_config(hidden_dim=30)
    with pytest.raises(StrictDataclassClassValidationError, match="ensemble_weight"):
        tiny_config(ensemble_weight=1.5)
    large = MaftConfig.vit_large_patch14()
    assert large.vision_config.mask_start_layer == 16 and large.projection_dim == 768


def test_any_transformers_backbone_can_replace_the_deeplab_resnet(tmp_path):
    resnet = dict(model_type="resnet", embedding_size=16, hidden_sizes=[32, 32, 32, 32], depths=[1, 1, 1, 1],
                  out_features=["stage1", "stage2", "stage3", "stage4"])
    model, processor = tiny_model(backbone_config=resnet), tiny_processor()
    assert type(model.backbone.model).__name__ == "ResNetBackbone"
    inputs = processor(images=random_image(64, 64), text=["cat", "dog"])
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.masks_queries_logits.shape == (1, 5, 16, 16)
    model.save_pretrained(tmp_path)
    assert MaftModel.from_pretrained(tmp_path).config.backbone_config.model_type == "resnet"
    with pytest.raises(ValueError, match="four feature maps"):
        tiny_model(backbone_config={**resnet, "out_features": ["stage3", "stage4"]})


def test_eager_and_sdpa_attention_give_the_same_segmentation(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    processor = tiny_processor()
    inputs = processor(images=[random_image(64, 48), random_image(40, 64, seed=1)], text=["cat", "dog", "sky"])
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = MaftModel.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert model.ip_clip.config._attn_implementation == implementation
        with torch.no_grad():
            outputs[implementation] = model(**inputs)
    torch.testing.assert_close(outputs["eager"].proposal_embeds, outputs["sdpa"].proposal_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["eager"].class_queries_logits, outputs["sdpa"].class_queries_logits, rtol=1e-4, atol=1e-4)


def test_non_finite_pixel_values_name_the_image():
    model, processor = tiny_model(), tiny_processor()
    inputs = processor(images=[random_image(64, 64), random_image(64, 64, seed=1)], text=["cat", "dog"])
    inputs["pixel_values"][1, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"`pixel_values` of image\(s\) \[1\] holds NaN or infinite values"):
        model(**inputs)


@pytest.mark.parametrize("backend", ["pytorch", "auto"])
def test_the_whole_model_compiles_without_graph_breaks(backend):
    model, processor = tiny_model(deformable_attention_backend=backend), tiny_processor()
    inputs = processor(images=random_image(64, 64), text=["cat", "dog"])
    with torch.no_grad():
        text_embeds = model.get_text_embeddings(inputs.pop("input_ids"), inputs.pop("attention_mask"))
        explanation = torch._dynamo.explain(model)(**inputs, text_embeds=text_embeds)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [str(reason.reason)[:200] for reason in explanation.break_reasons]


def full_size_patch_grid_masks(logits, padded_size, grid_size, clip_view_sizes):
    """IP-CLIP's proposals made the long way: the padded-size masks, each image's CLIP-view region resized to the
    padded size, resized to the patch grid."""
    from torch.nn.functional import interpolate

    from maft.modeling_maft import proposal_masks_from_logits

    masks = proposal_masks_from_logits(logits, padded_size)
    views = [
        interpolate(masks[index : index + 1, :, :height, :width], size=padded_size, mode="bilinear", align_corners=False)
        for index, (height, width) in enumerate(clip_view_sizes.tolist())
    ]
    return interpolate(torch.cat(views), size=grid_size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize(
    "low_size, padded_size, grid_size, clip_view_sizes",
    [
        ((8, 12), (32, 48), (4, 6), [[32, 48], [16, 24]]),  # a whole input and a quarter of one
        ((160, 150), (640, 600), (30, 30), [[427, 555], [640, 600]]),  # the default model's sizes at 640 pixels
        ((5, 7), (20, 28), (9, 11), [[13, 27], [20, 1]]),  # a grid finer than the logits, a one-pixel-wide view
        ((1, 3), (1, 12), (1, 2), [[1, 7], [1, 12]]),
    ],
)
def test_ip_clip_masks_on_the_patch_grid_equal_the_full_size_masks_resized(low_size, padded_size, grid_size, clip_view_sizes):
    from maft.modeling_maft import proposal_masks_on_patch_grid

    torch.manual_seed(0)
    logits = torch.randn(2, 3, *low_size, dtype=torch.float64) * 4
    sizes = torch.tensor(clip_view_sizes)
    expected = full_size_patch_grid_masks(logits, padded_size, grid_size, sizes)
    masks = proposal_masks_on_patch_grid(logits, padded_size, grid_size, sizes)
    assert masks.dtype == torch.float64
    torch.testing.assert_close(masks, expected, rtol=0, atol=1e-12)
    whole = torch.tensor([padded_size] * 2)  # no clip_view_sizes: the whole padded input
    torch.testing.assert_close(proposal_masks_on_patch_grid(logits, padded_size, grid_size), full_size_patch_grid_masks(logits, padded_size, grid_size, whole), rtol=0, atol=1e-12)


def test_ip_clip_masks_of_half_precision_logits_are_computed_in_float32():
    """bfloat16 holds neither 427 nor most pixel centres above 256: positions and sums are taken in float32."""
    from maft.modeling_maft import proposal_masks_on_patch_grid

    torch.manual_seed(0)
    logits = (torch.randn(1, 4, 160, 150) * 4).bfloat16()
    sizes = torch.tensor([[427, 555]])
    masks = proposal_masks_on_patch_grid(logits, (640, 600), (30, 30), sizes)
    assert masks.dtype == torch.float32
    expected = full_size_patch_grid_masks(logits.double(), (640, 600), (30, 30), sizes)
    torch.testing.assert_close(masks.double(), expected, rtol=0, atol=1e-4)  # bfloat16 positions would be off by pixels


def test_context_interaction_equals_attention_computed_the_textbook_way():
    """The reassociated attention (projections folded into the text) is multi-head attention of the projected pixels
    over the projected text, in value and in every parameter's gradient."""
    from maft.modeling_maft import MaftContextInteraction, _split_heads

    torch.manual_seed(0)
    block = MaftContextInteraction(tiny_config(context_dropout=0.0)).double()  # float64: equal up to rounding
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    maps = [torch.randn(2, 32, size, size + 1, dtype=torch.float64) for size in (3, 6)]
    text = torch.randn(2, 5, 16, dtype=torch.float64)

    def textbook(maps, text):
        heads, outputs = block.num_heads, []
        for feature_map in maps:
            batch_size, channels, height, width = feature_map.shape
            text = block.text_norm(text)
            pixels = block.query_norm(feature_map.flatten(2).transpose(1, 2))
            attended = torch.nn.functional.scaled_dot_product_attention(
                _split_heads(block.q_proj(pixels), heads), _split_heads(block.k_proj(text), heads),
                _split_heads(block.v_proj(text), heads),
            )
            pixels = pixels + block.layer_scale * block.out_proj(attended.transpose(1, 2).flatten(2))
            outputs.append(pixels.transpose(1, 2).reshape(batch_size, channels, height, width))
        return outputs

    gradients = {}
    for name, forward in (("ours", block), ("textbook", textbook)):
        outputs = forward(maps, text)
        block.zero_grad()
        sum((output * torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view_as(output)).sum() for output in outputs).backward()
        gradients[name] = ([output.detach() for output in outputs], {n: p.grad.clone() for n, p in block.named_parameters()})
    (ours, our_grads), (expected, expected_grads) = gradients["ours"], gradients["textbook"]
    assert expected[0].abs().max() > 1 and expected_grads["q_proj.weight"].abs().max() > 1e-2  # not a trivial case
    for mine, theirs in zip(ours, expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    for name in expected_grads:
        torch.testing.assert_close(our_grads[name], expected_grads[name], rtol=1e-10, atol=1e-11)
