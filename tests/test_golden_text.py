"""The bundled CLIP tokenizer and the converted text tower reproduce the original's class text features."""

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from golden import golden_config, golden_state_dict, golden_tensors, relative_error
from maft.data.clip_tokenizer import load_clip_tokenizer
from maft.conversion.convert_openai_clip import convert_openai_clip_text


VILD_TEMPLATES = [
    "a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene", "There is the {} in the scene",
    "a photo of a {} in the scene", "a photo of a small {}.", "a photo of a medium {}.", "a photo of a large {}.",
    "This is a photo of a small {}.", "This is a photo of a medium {}.", "This is a photo of a large {}.",
    "There is a small {} in the scene.", "There is a medium {} in the scene.", "There is a large {} in the scene.",
]


def test_bundled_tokenizer_is_clips():
    tokenizer = load_clip_tokenizer()
    assert len(tokenizer) == 49408
    # Token ids of OpenAI's CLIP for this sentence.
    assert tokenizer("a photo of a cat.")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert tokenizer.model_max_length == 77


def test_template_ensembled_text_features_match_the_original():
    # The golden model's text tower: width 64, 1 head, 2 layers, context 77, embed dim 32.
    config = CLIPTextConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
        vocab_size=49408, max_position_embeddings=77, projection_dim=32,
    )
    text_model = CLIPTextModelWithProjection(config).eval()
    text_model.load_state_dict(convert_openai_clip_text(golden_state_dict(), "clip_adapter.clip_model."), strict=True)
    tokenizer = load_clip_tokenizer()
    features = []
    for name in golden_config()["class_names"]:
        tokens = tokenizer([template.format(name) for template in VILD_TEMPLATES], padding=True, return_tensors="pt")
        with torch.no_grad():
            embeds = text_model(**tokens).text_embeds
        mean = (embeds / embeds.norm(dim=-1, keepdim=True)).mean(dim=0)
        features.append(mean / mean.norm())
    expected = golden_tensors()["infer_text_features"]
    assert relative_error(torch.stack(features), expected[:-1]) < 1e-5
