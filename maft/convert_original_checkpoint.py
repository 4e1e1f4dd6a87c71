"""Conversion of the original MAFT / FreeSeg checkpoints (detectron2 state dicts) to `MaftModel`."""

import re
from collections import defaultdict

import torch

from .convert_openai_clip import convert_openai_clip_text, convert_openai_clip_vision


# Original name (regex) -> ours, for the proposal generator. Checked in order; the first match wins.
PROPOSAL_GENERATOR_RENAMES = [
    (r"^backbone\.(.+)$", r"backbone.\1"),
    (r"^sem_seg_head\.pixel_decoder\.input_proj\.(\d+)\.(\d)\.(.+)$", r"pixel_decoder.input_projections.\1.\2.\3"),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.level_embed$", r"pixel_decoder.level_embed"),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.(.+)$", r"pixel_decoder.layers.\1.\2"),
    (r"^sem_seg_head\.pixel_decoder\.adapter_1\.(.+)$", r"pixel_decoder.lateral_conv.\1"),
    (r"^sem_seg_head\.pixel_decoder\.layer_1\.(.+)$", r"pixel_decoder.output_conv.\1"),
    (r"^sem_seg_head\.pixel_decoder\.mask_features\.(.+)$", r"pixel_decoder.mask_features.\1"),
    (r"^sem_seg_head\.interaction\.layer_norm_q_1\.(.+)$", r"context_interaction.query_norm.\1"),
    (r"^sem_seg_head\.interaction\.layer_norm_k_1\.(.+)$", r"context_interaction.text_norm.\1"),
    (r"^sem_seg_head\.interaction\.attn\.(q_proj|k_proj|v_proj|out_proj)\.(.+)$", r"context_interaction.\1.\2"),
    (r"^sem_seg_head\.interaction\.gamma$", r"context_interaction.layer_scale"),
    (r"^sem_seg_head\.predictor\.query_feat\.weight$", r"decoder.query_features.weight"),
    (r"^sem_seg_head\.predictor\.query_embed\.weight$", r"decoder.query_position_embeddings.weight"),
    (r"^sem_seg_head\.predictor\.(level_embed|decoder_norm|class_embed|mask_embed)\.(.+)$", r"decoder.\1.\2"),
    (r"^sem_seg_head\.predictor\.transformer_cross_attention_layers\.(\d+)\.multihead_attn\.(.+)$", r"decoder.layers.\1.cross_attn.\2"),
    (r"^sem_seg_head\.predictor\.transformer_cross_attention_layers\.(\d+)\.norm\.(.+)$", r"decoder.layers.\1.cross_attn_norm.\2"),
    (r"^sem_seg_head\.predictor\.transformer_self_attention_layers\.(\d+)\.self_attn\.(.+)$", r"decoder.layers.\1.self_attn.\2"),
    (r"^sem_seg_head\.predictor\.transformer_self_attention_layers\.(\d+)\.norm\.(.+)$", r"decoder.layers.\1.self_attn_norm.\2"),
    (r"^sem_seg_head\.predictor\.transformer_ffn_layers\.(\d+)\.(linear1|linear2)\.(.+)$", r"decoder.layers.\1.\2.\3"),
    (r"^sem_seg_head\.predictor\.transformer_ffn_layers\.(\d+)\.norm\.(.+)$", r"decoder.layers.\1.ffn_norm.\2"),
    (r"^clip_adapter\.non_object_embedding$", r"no_object_embedding"),
]

# Original entries that have no counterpart: the unused third image tower, the loss's class weights, and buffers.
DROPPED_KEYS = [
    r"^T\.",
    r"^criterion\.empty_weight$",
    r"^clip_adapter\.pixel_(mean|std)$",
    r"^clip_adapter\.clip_model\.logit_scale$",
]

CLIP_TOWERS = {
    "IPCLIP.": ("ip_clip.", convert_openai_clip_vision),
    "clip_adapter.clip_model.visual.": ("distillation_teacher.", convert_openai_clip_vision),
    "clip_adapter.clip_model.": ("text_encoder.", convert_openai_clip_text),
}


def _module_of(key: str) -> str:
    """The module a parameter belongs to, at most three levels deep: `backbone.res2.0.conv1.weight` -> `backbone.res2.0`."""
    return ".".join(key.split(".")[:-1][:3])


def convert_proposal_generator_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The proposal-generator entries of an original state dict under our names; every other key is ignored here."""
    converted = {}
    for key, tensor in original.items():
        for pattern, replacement in PROPOSAL_GENERATOR_RENAMES:
            if re.match(pattern, key):
                converted[re.sub(pattern, replacement, key)] = tensor
                break
    return converted


def convert_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole original MAFT state dict -> `MaftModel`'s. Raises ValueError listing, by module, keys it does not know."""
    converted = convert_proposal_generator_state_dict(original)
    claimed = {key for key in original if any(re.match(pattern, key) for pattern, _ in PROPOSAL_GENERATOR_RENAMES)}
    for source_prefix, (target_prefix, convert) in CLIP_TOWERS.items():
        tower_keys = {key for key in original if key.startswith(source_prefix) and key not in claimed}
        if source_prefix == "clip_adapter.clip_model.":
            tower_keys = {key for key in tower_keys if not key.startswith("clip_adapter.clip_model.visual.")}
        if not tower_keys:
            continue
        converted.update({target_prefix + key: tensor for key, tensor in convert(original, source_prefix).items()})
        claimed |= tower_keys
    claimed |= {key for key in original if any(re.match(pattern, key) for pattern in DROPPED_KEYS)}
    unknown = sorted(set(original) - claimed)
    if unknown:
        by_module = defaultdict(list)
        for key in unknown:
            by_module[_module_of(key)].append(key)
        listing = "\n".join(f"  {module}: {len(keys)} keys, e.g. {keys[0]}" for module, keys in sorted(by_module.items()))
        raise ValueError(f"The checkpoint has {len(unknown)} entries this converter does not know:\n{listing}")
    return converted


def convert_original_checkpoint(checkpoint, config=None):
    """An original MAFT checkpoint (a state dict, or a path to a detectron2 `.pt`/`.pth` file) -> `MaftModel`.

    `config` is the `MaftConfig` of the checkpoint (the ViT-B/16 defaults when None). Loads strictly."""
    from .configuration_maft import MaftConfig
    from .modeling_maft import MaftModel

    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
        checkpoint = checkpoint.get("model", checkpoint)
    state_dict = {key: value.float() if value.is_floating_point() else value for key, value in checkpoint.items()}
    model = MaftModel(config or MaftConfig()).eval()
    converted = convert_state_dict(state_dict)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"The converted checkpoint does not fit the config: missing {sorted(missing)}, unexpected {sorted(unexpected)}."
        )
    return model
