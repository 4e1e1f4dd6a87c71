"""Conversion of the original MAFT / FreeSeg checkpoints (detectron2 state dicts) to `MaftModel`."""

import os
import re
from collections import defaultdict
from pathlib import Path

import torch

from ..configuration_maft import MaftConfig
from .convert_openai_clip import convert_openai_clip_text, convert_openai_clip_vision
from ..modeling_maft import MaftModel


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

FROZEN_IMAGE_TOWER = "clip_adapter.clip_model.visual."
CLIP_TOWERS = {
    "IPCLIP.": ("ip_clip.", convert_openai_clip_vision),
    "clip_adapter.clip_model.": ("text_encoder.", convert_openai_clip_text),
}


def image_tower_prefix(state_dict: dict[str, torch.Tensor]) -> str:
    """IP-CLIP's tower: the fine-tuned `IPCLIP.*` of MAFT checkpoints, or the frozen CLIP of FreeSeg ones (which
    classify with CLIP as released)."""
    return "IPCLIP." if any(key.startswith("IPCLIP.") for key in state_dict) else FROZEN_IMAGE_TOWER


def _module_of(key: str) -> str:
    """The module a parameter belongs to, at most three levels deep: `backbone.res2.0.conv1.weight` -> `backbone.res2.0`."""
    return ".".join(key.split(".")[:-1][:3])


def _listing_by_module(keys, indent: str = "  ") -> str:
    """One line per module: how many of `keys` it holds, all of them when few, else the first as an example."""
    by_module = defaultdict(list)
    for key in sorted(keys):
        by_module[_module_of(key)].append(key)
    lines = []
    for module, names in sorted(by_module.items()):
        shown = ", ".join(names) if len(names) <= 3 else f"e.g. {names[0]}"
        lines.append(f"{indent}{module}: {len(names)} keys, {shown}")
    return "\n".join(lines)


class _RecordingStateDict(dict):
    """A state dict that records which entries a tower conversion reads, and which it looks for in vain (answering
    those with a placeholder, so that one pass finds every missing entry of a tower)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        super().__init__(state_dict)
        self.read, self.missing = set(), set()

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self:
            self.read.add(key)
            return super().__getitem__(key)
        self.missing.add(key)
        return torch.empty(3, 3, device="meta")


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
    """
    A whole original MAFT (or FreeSeg) state dict -> `MaftModel`'s. Raises ValueError listing, by module, the keys it
    does not know (also inside the CLIP towers) and the keys of a CLIP tower that are missing. Missing entries of the
    proposal generator show when the result is loaded into a model (`convert_original_checkpoint` does, strictly).
    """
    converted = convert_proposal_generator_state_dict(original)
    claimed = {key for key in original if any(re.match(pattern, key) for pattern, _ in PROPOSAL_GENERATOR_RENAMES)}
    recording = _RecordingStateDict(original)
    towers = [
        (source_prefix, target_prefix, convert)
        for source_prefix, (target_prefix, convert) in CLIP_TOWERS.items()
        if any(
            key.startswith(source_prefix) and not (source_prefix == "clip_adapter.clip_model." and key.startswith(FROZEN_IMAGE_TOWER))
            for key in original
        )
    ]
    if image_tower_prefix(original) == FROZEN_IMAGE_TOWER:  # FreeSeg: IP-CLIP starts as the frozen CLIP image tower
        towers.append((FROZEN_IMAGE_TOWER, "ip_clip.", convert_openai_clip_vision))
    else:  # MAFT: the frozen CLIP image tower was the distillation teacher, which only training needs
        convert_openai_clip_vision(recording, FROZEN_IMAGE_TOWER)
    for source_prefix, target_prefix, convert in towers:
        converted.update({target_prefix + key: tensor for key, tensor in convert(recording, source_prefix).items()})
    claimed |= recording.read
    claimed |= {key for key in original if any(re.match(pattern, key) for pattern in DROPPED_KEYS)}
    unknown = sorted(set(original) - claimed)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} entries this converter does not know:\n{_listing_by_module(unknown)}")
    if recording.missing:
        problems.append(f"{len(recording.missing)} entries of its CLIP towers missing:\n{_listing_by_module(recording.missing)}")
    if problems:
        raise ValueError("The checkpoint has " + "\nand ".join(problems))
    return converted


def load_original_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a detectron2 checkpoint file, read without executing arbitrary pickled code: only tensors,
    containers, numbers and the numpy array reconstruction detectron2 files may hold are allowed. Raises ValueError
    naming the file when it is empty, truncated, not a checkpoint, or holds other pickled objects."""
    import numpy

    # numpy 2 moved `numpy.core` to `numpy._core`; pickles written before name the old module.
    core = numpy._core if hasattr(numpy, "_core") else numpy.core
    reconstruct = core.multiarray._reconstruct
    allowed = [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), numpy.ndarray, numpy.dtype, type(numpy.dtype("float32"))]
    with open(path, "rb") as file:  # a missing or unreadable file fails here, with its own error
        try:
            with torch.serialization.safe_globals(allowed):
                checkpoint = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises many kinds (EOFError, RuntimeError, OSError, KeyError...) on bad bytes
            raise _unreadable_checkpoint_error(path, error) from error
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} does not hold a state dict (or a dict with one under 'model').")
    return tensors_of(state_dict, str(path))


def _unreadable_checkpoint_error(path: str | os.PathLike, error: Exception) -> ValueError:
    """What went wrong reading a checkpoint file: an object the safe unpickler refused, or bytes that are no (complete)
    checkpoint."""
    refused = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
    if refused:
        return ValueError(
            f"{path} holds pickled objects that a checkpoint of weights does not need ({refused.group(1)}), so it was not "
            "loaded (this protects against code hidden in pickles)"
        )
    detail = str(error).split("WeightsUnpickler error:")[-1]  # after torch's advice on `weights_only`, if any
    cause = next((line.strip() for line in detail.splitlines() if line.strip()), type(error).__name__).split(". ")[0]
    return ValueError(f"cannot read {path}: it is empty, truncated or not a PyTorch checkpoint ({cause})")


def tensors_of(state_dict: dict, source: str) -> dict[str, torch.Tensor]:
    """The state dict's entries as tensors (numpy arrays and numbers converted); an entry that is none of these, e.g. a
    string, is refused naming it and `source` (the file or "the state dict")."""
    tensors = {}
    for name, value in state_dict.items():
        try:
            tensors[name] = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as error:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ValueError(
                f"{source}: the entry {name!r} holds a {type(value).__name__} ({shown}) where a tensor should be"
            ) from error
    return tensors


def _read_original_config(original_config: str | os.PathLike | None) -> dict:
    """The detectron2 YAML config (a path, or the YAML text: several lines) as nested dicts; empty when not given."""
    if original_config is None:
        return {}
    import yaml

    is_text = isinstance(original_config, str) and "\n" in original_config
    text = str(original_config) if is_text else Path(original_config).read_text()
    return yaml.safe_load(text) or {}


def _lookup(config: dict, dotted: str, default):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _count(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of numbered children `{prefix}N.` in the state dict."""
    return len({key[len(prefix) :].split(".")[0] for key in state_dict if key.startswith(prefix)})


def config_from_state_dict(state_dict: dict[str, torch.Tensor], original_config=None, **overrides) -> MaftConfig:
    """
    The `MaftConfig` of an original checkpoint: sizes from the tensors' shapes; head counts, sampling points and the
    IP-CLIP start layer (which shapes cannot tell) from the original YAML config, else the published values.
    """
    yaml_config = _read_original_config(original_config)

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ValueError(
                f"The checkpoint has no {key}, one of the entries the configuration is derived from: it is not a "
                "complete MAFT or FreeSeg checkpoint."
            )
        return tuple(state_dict[key].shape)

    vision, text = image_tower_prefix(state_dict), "clip_adapter.clip_model."
    vision_width, vision_layers = shape(f"{vision}conv1.weight")[0], _count(state_dict, f"{vision}transformer.resblocks.")
    patch_size = shape(f"{vision}conv1.weight")[-1]
    text_width = shape(f"{text}ln_final.weight")[0]
    projection_dim = shape(f"{vision}proj")[1]
    published_start_layer = 2 * vision_layers // 3  # 8 of 12 for ViT-B/16, 16 of 24 for ViT-L/14
    values = dict(
        vision_config=dict(
            hidden_size=vision_width,
            intermediate_size=shape(f"{vision}transformer.resblocks.0.mlp.c_fc.weight")[0],
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_width // 64 if vision_width >= 64 else 1,
            patch_size=patch_size,
            image_size=round((shape(f"{vision}positional_embedding")[0] - 1) ** 0.5) * patch_size,
            projection_dim=projection_dim,
            mask_start_layer=int(_lookup(yaml_config, "MODEL.START_LAYERS", published_start_layer)),
        ),
        text_config=dict(
            hidden_size=text_width,
            intermediate_size=shape(f"{text}transformer.resblocks.0.mlp.c_fc.weight")[0],
            num_hidden_layers=_count(state_dict, f"{text}transformer.resblocks."),
            num_attention_heads=max(text_width // 64, 1),
            vocab_size=shape(f"{text}token_embedding.weight")[0],
            max_position_embeddings=shape(f"{text}positional_embedding")[0],
            projection_dim=projection_dim,
        ),
        backbone_config=dict(
            model_type="maft_deeplab_resnet",
            depths=[_count(state_dict, f"backbone.res{stage}.") for stage in range(2, 6)],
            stem_out_channels=shape("backbone.stem.conv3.weight")[0],
            res2_out_channels=shape("backbone.res2.0.conv3.weight")[0],
            width_per_group=shape("backbone.res2.0.conv1.weight")[0],
            res5_multi_grid=list(_lookup(yaml_config, "MODEL.RESNETS.RES5_MULTI_GRID", [1, 2, 4])),
        ),
        feature_size=shape("sem_seg_head.pixel_decoder.input_proj.0.0.weight")[0],
        mask_feature_size=shape("sem_seg_head.pixel_decoder.mask_features.weight")[0],
        encoder_layers=_count(state_dict, "sem_seg_head.pixel_decoder.transformer.encoder.layers."),
        encoder_feedforward_dim=shape("sem_seg_head.pixel_decoder.transformer.encoder.layers.0.linear1.weight")[0],
        encoder_attention_heads=int(_lookup(yaml_config, "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS", 8)),
        encoder_num_points=int(_lookup(yaml_config, "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS", 4)),
        context_attention_dim=shape("sem_seg_head.interaction.attn.q_proj.weight")[0],
        context_attention_heads=int(_lookup(yaml_config, "MODEL.SEM_SEG_HEAD.NUM_HEADS", 8)),
        hidden_dim=shape("sem_seg_head.predictor.query_feat.weight")[1],
        num_queries=shape("sem_seg_head.predictor.query_feat.weight")[0],
        decoder_layers=_count(state_dict, "sem_seg_head.predictor.transformer_cross_attention_layers."),
        decoder_attention_heads=int(_lookup(yaml_config, "MODEL.MASK_FORMER.NHEADS", 8)),
        decoder_feedforward_dim=shape("sem_seg_head.predictor.transformer_ffn_layers.0.linear1.weight")[0],
        class_embed_hidden_dim=shape("sem_seg_head.predictor.class_embed.layers.0.weight")[0],
        projection_dim=projection_dim,
        ensemble_weight=float(_lookup(yaml_config, "MODEL.CLIP_ADAPTER.CLIP_ENSEMBLE_WEIGHT", 0.0)),
    )
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return MaftConfig(**values)


def convert_original_checkpoint(checkpoint, original_config=None, **config_overrides) -> MaftModel:
    """
    An original MAFT checkpoint -> `MaftModel`, loaded strictly. `checkpoint`: a state dict or a detectron2 `.pt`/`.pth`
    path (read safely); `original_config`: the original YAML config (path or text), for what shapes cannot tell;
    `config_overrides`: `MaftConfig` values to set explicitly.
    """
    state_dict = tensors_of(checkpoint, "the state dict") if isinstance(checkpoint, dict) else load_original_checkpoint(checkpoint)
    state_dict = {key: value.float() if value.is_floating_point() else value for key, value in state_dict.items()}
    converted = convert_state_dict(state_dict)
    config = config_from_state_dict(state_dict, original_config, **config_overrides)
    model = MaftModel(config).eval()
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} entries of the model:\n{_listing_by_module(missing, '  missing ')}")
        if unexpected:
            problems.append(
                f"unexpected {len(unexpected)} entries the model does not have:\n{_listing_by_module(unexpected, '  unexpected ')}"
            )
        raise ValueError("The converted checkpoint does not fit the config: " + "\n".join(problems))
    return model


CONVERTED_CARD_TEXT = """MAFT with CLIP {clip}. Open-vocabulary semantic segmentation with MAFT (Mask-aware Fine-Tuning of CLIP, Jiao
et al., NeurIPS 2023): a Mask2Former-style proposal generator proposes {num_queries} class-agnostic masks, and IP-CLIP
classifies all of them against any class names in one CLIP pass. Converted with `maft convert` from the original
checkpoint `{source}` (detectron2 format). IP-CLIP masks from layer {mask_start_layer} of {num_layers}.

The original implementation: https://github.com/jiaosiyu1999/MAFT (paper: https://arxiv.org/abs/2310.00240). The
weights are the original authors'; their license is theirs to state.
"""


def converted_model_card(model: MaftModel, source: str | os.PathLike | None = None, name: str | None = None):
    """A `huggingface_hub.ModelCard` for a converted model: Hub metadata, where it came from and how to use it."""
    from ..utils.model_card import maft_model_card

    vision = model.config.vision_config
    text = CONVERTED_CARD_TEXT.format(
        clip={(768, 16): "ViT-B/16", (1024, 14): "ViT-L/14"}.get(
            (vision.hidden_size, vision.patch_size), f"image tower of width {vision.hidden_size}, patch {vision.patch_size}"
        ),
        num_queries=model.config.num_queries,
        source=Path(source).name if source is not None else "unknown",
        mask_start_layer=vision.mask_start_layer,
        num_layers=vision.num_hidden_layers,
    )
    return maft_model_card(name or "maft", text, license="unknown")


def write_converted_model(
    model: MaftModel,
    output_dir: str | os.PathLike,
    source: str | os.PathLike | None = None,
    model_card: str | os.PathLike | None = None,
) -> None:
    """
    `save_pretrained` of the model and of a processor with CLIP's tokenizer and the 14 ViLD prompt templates, and a
    model card (README.md): `model_card` (a card file, e.g. one of the repository's `model_cards/`) when given, else
    one generated from the model and the `source` checkpoint's name.
    """
    from huggingface_hub import ModelCard

    from ..data.clip_tokenizer import load_clip_tokenizer
    from ..processing_maft import MaftImageProcessor, MaftProcessor

    model.save_pretrained(output_dir)
    processor = MaftProcessor(MaftImageProcessor(), load_clip_tokenizer(model.config.text_config.max_position_embeddings))
    processor.save_pretrained(output_dir)
    card = ModelCard.load(model_card) if model_card is not None else converted_model_card(model, source, Path(output_dir).name)
    card.save(Path(output_dir) / "README.md")
