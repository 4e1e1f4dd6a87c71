"""OpenAI CLIP layout (the original MAFT checkpoints) -> transformers' CLIP layout."""

import torch


def convert_openai_clip_transformer_block(
    state_dict: dict[str, torch.Tensor], source_prefix: str, target_prefix: str
) -> dict[str, torch.Tensor]:
    """One residual attention block: fused `attn.in_proj_*` (q, k, v stacked) split into q/k/v projections."""
    converted = {}
    for kind in ("weight", "bias"):
        query, key, value = state_dict[f"{source_prefix}attn.in_proj_{kind}"].chunk(3, dim=0)
        converted[f"{target_prefix}self_attn.q_proj.{kind}"] = query
        converted[f"{target_prefix}self_attn.k_proj.{kind}"] = key
        converted[f"{target_prefix}self_attn.v_proj.{kind}"] = value
        for source, target in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            converted[f"{target_prefix}{target}.{kind}"] = state_dict[f"{source_prefix}{source}.{kind}"]
    return converted


def convert_openai_clip_transformer(
    state_dict: dict[str, torch.Tensor], prefix: str, target_prefix: str
) -> dict[str, torch.Tensor]:
    """Every `{prefix}transformer.resblocks.N.` block -> `{target_prefix}N.` in transformers' layout."""
    block_prefix = f"{prefix}transformer.resblocks."
    indices = {int(key[len(block_prefix) :].split(".")[0]) for key in state_dict if key.startswith(block_prefix)}
    converted = {}
    for index in sorted(indices):
        converted.update(
            convert_openai_clip_transformer_block(state_dict, f"{block_prefix}{index}.", f"{target_prefix}{index}.")
        )
    return converted


def convert_openai_clip_vision(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An OpenAI CLIP image tower under `prefix` -> the state dict of a `MaftClipVisionModel`."""
    converted = {
        "embeddings.class_embedding": state_dict[f"{prefix}class_embedding"],
        "embeddings.patch_embedding.weight": state_dict[f"{prefix}conv1.weight"],
        "embeddings.position_embedding.weight": state_dict[f"{prefix}positional_embedding"],
        "pre_layrnorm.weight": state_dict[f"{prefix}ln_pre.weight"],
        "pre_layrnorm.bias": state_dict[f"{prefix}ln_pre.bias"],
        "post_layernorm.weight": state_dict[f"{prefix}ln_post.weight"],
        "post_layernorm.bias": state_dict[f"{prefix}ln_post.bias"],
        "visual_projection.weight": state_dict[f"{prefix}proj"].t(),
    }
    return converted | convert_openai_clip_transformer(state_dict, prefix, "encoder.layers.")


def convert_openai_clip_text(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The text tower of an OpenAI CLIP model under `prefix` -> the state dict of a `CLIPTextModelWithProjection`."""
    converted = {
        "text_model.embeddings.token_embedding.weight": state_dict[f"{prefix}token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state_dict[f"{prefix}positional_embedding"],
        "text_model.final_layer_norm.weight": state_dict[f"{prefix}ln_final.weight"],
        "text_model.final_layer_norm.bias": state_dict[f"{prefix}ln_final.bias"],
        "text_projection.weight": state_dict[f"{prefix}text_projection"].t(),
    }
    return converted | convert_openai_clip_transformer(state_dict, prefix, "text_model.encoder.layers.")
