"""MaftModel and MaftProcessor on a tiny random configuration: shapes, text cache, training, saving, errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor, CLIPConfig, CLIPModel

from maft import MaftConfig, MaftImageProcessor, MaftModel, MaftProcessor
from maft.clip_tokenizer import load_clip_tokenizer
from maft.convert_original_checkpoint import convert_state_dict


TEMPLATES = ["a photo of a {}.", "there is a {} in the scene"]


def tiny_config(**overrides) -> MaftConfig:
    values = dict(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=49408, projection_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16, mask_start_layer=2),
        backbone_config=dict(model_type="maft_deeplab_resnet", depths=[1, 1, 1, 1], stem_out_channels=16,
                             res2_out_channels=32, width_per_group=8, res5_multi_grid=[2]),
        feature_size=32, mask_feature_size=32, encoder_layers=1, encoder_attention_heads=4, encoder_feedforward_dim=32,
        context_attention_dim=32, context_attention_heads=4, hidden_dim=32, num_queries=5, decoder_layers=2,
        decoder_attention_heads=4, decoder_feedforward_dim=32, class_embed_hidden_dim=32, projection_dim=16,
        clip_image_size=64, prompt_templates=TEMPLATES, deformable_attention_backend="pytorch",
    )
    values.update(overrides)
    return MaftConfig(**values)


def tiny_model(**overrides) -> MaftModel:
    torch.manual_seed(0)
    return MaftModel(tiny_config(**overrides)).eval()


def tiny_processor() -> MaftProcessor:
    image_processor = MaftImageProcessor(shortest_edge=64, longest_edge=128, clip_image_size=64)
    return MaftProcessor(image_processor, load_clip_tokenizer(), prompt_templates=TEMPLATES)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


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


def test_text_embedding_cache_hits_and_invalidation():
    model, processor = tiny_model(), tiny_processor()
    calls = []
    model.text_encoder.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        first = model.get_text_embeddings(**processor.tokenize_class_names(["cat", "dog"]))
        again = model.get_text_embeddings(**processor.tokenize_class_names(["cat", "dog"]))
        assert calls == [4]  # 2 classes x 2 templates, once
        mixed = model.get_text_embeddings(**processor.tokenize_class_names(["dog", "a much longer class name"]))
        assert calls == [4, 2]  # only the new class is encoded; the cached one ignores the new padding length
        torch.testing.assert_close(mixed[0], first[1])
        torch.testing.assert_close(first, again)
        model.text_encoder.text_projection.weight.add_(0.1 * torch.randn_like(model.text_encoder.text_projection.weight))
        changed = model.get_text_embeddings(**processor.tokenize_class_names(["cat", "dog"]))
    assert calls == [4, 2, 4]
    assert not torch.allclose(changed, first)


def test_stage_two_training_updates_exactly_the_ip_clip_recipe():
    model, processor = tiny_model(), tiny_processor()
    trainable = set(model.apply_mask_aware_finetuning_recipe())
    assert trainable and all(name.startswith("ip_clip.") for name in trainable)
    assert not any(".mlp." in name for name in trainable)
    label_map = np.zeros((64, 64), dtype=np.int64)
    label_map[:, 32:] = 1
    label_map[:8] = 255
    inputs = processor(images=[random_image(64, 64)], text=["cat", "dog"], segmentation_maps=[label_map])
    model.train()
    assert not model.decoder.training and not model.backbone.training and model.ip_clip.training
    outputs = model(**inputs)
    assert set(outputs.loss_dict) == {"mask_aware_loss", "distillation_loss"}
    outputs.loss.backward()
    with_gradient = {name for name, parameter in model.named_parameters() if parameter.grad is not None}
    assert with_gradient == trainable


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


def test_a_model_without_its_distillation_teacher_saves_smaller_and_predicts_the_same(tmp_path):
    model, processor = tiny_model().eval(), tiny_processor()
    inputs = processor(images=random_image(64, 48), text=["cat", "dog"])
    with torch.no_grad():
        expected = model(**inputs).class_queries_logits
    model.remove_distillation_teacher()
    model.save_pretrained(tmp_path)
    loaded = MaftModel.from_pretrained(tmp_path).eval()
    assert loaded.distillation_teacher is None and not loaded.config.use_distillation_teacher
    assert not any(name.startswith("distillation_teacher.") for name in loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).class_queries_logits, expected, rtol=0, atol=0)


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
    torch.testing.assert_close(model.distillation_teacher.embeddings.class_embedding, clip.vision_model.embeddings.class_embedding)
    torch.testing.assert_close(model.text_encoder.text_projection.weight, clip.text_projection.weight)


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
        (lambda model, inputs: model(inputs["pixel_values"], inputs["clip_pixel_values"], input_ids=inputs["input_ids"][:, :1]), "2 prompt templates"),
        (lambda model, inputs: model(inputs["pixel_values"], inputs["clip_pixel_values"][:0], input_ids=inputs["input_ids"]), "same batch size"),
        (lambda model, inputs: model(**inputs, labels=torch.zeros(1, 8, 8, dtype=torch.long)), "padded image size"),
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
    with pytest.raises(StrictDataclassClassValidationError, match="contain '\\{\\}'"):
        tiny_config(prompt_templates=["no placeholder"])
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
