"""MAFT model configurations."""

import os
from typing import Any, ClassVar, Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, CLIPTextConfig, CLIPVisionConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging


logger = logging.get_logger(__name__)

# The task of MAFT's pipeline (`pipeline_maft.py`), which saved models name in `custom_pipelines`, and the Hub task that
# model cards name, which saved models' `custom_pipelines` also point at it (remote code only: maft does not replace
# transformers' own image-segmentation pipeline).
PIPELINE_TASK = "zero-shot-image-segmentation"
HUB_PIPELINE_TASK = "image-segmentation"

# Attributes that configurations saved by maft 0.1.0.dev0 carry, now owned by the training recipe or the processor.
RETIRED_MAFT_CONFIG_ATTRIBUTES = (
    "training_stage", "use_distillation_teacher", "ignore_index", "clip_image_size", "prompt_templates",
    "mask_aware_loss_weight", "distillation_loss_weight", "class_loss_weight", "mask_loss_weight", "dice_loss_weight",
    "no_object_weight",
)


@strict
class MaftClipVisionConfig(CLIPVisionConfig):
    r"""
    Configuration of the IP-CLIP image encoder ([`MaftClipVisionModel`]): a CLIP vision tower that also classifies
    mask proposals. It extends [`CLIPVisionConfig`] (every CLIP attribute keeps its meaning) with:

    mask_start_layer (`int`, *optional*):
        Index of the first encoder layer whose attention is restricted by the mask proposals. Layers before it are
        plain CLIP; at this layer the class token is replicated once per proposal. Defaults to two thirds of
        `num_hidden_layers`: 8 for ViT-B/16 (12 layers) and 16 for ViT-L/14 (24 layers), as MAFT uses.
    mask_threshold (`float`, *optional*, defaults to 0.5):
        A proposal token attends to the patches where its mask, resized to the patch grid, is >= this value.
    position_interpolation_align_corners (`bool`, *optional*, defaults to `True`):
        How position embeddings are interpolated (bicubic) for inputs of another size than `image_size`. `True`
        is the original MAFT implementation, which converted MAFT weights need to reproduce published numbers;
        `False` is transformers' CLIP default.

    Example:

    ```python
    >>> from maft import MaftClipVisionConfig, MaftClipVisionModel

    >>> configuration = MaftClipVisionConfig(patch_size=16, mask_start_layer=8)
    >>> model = MaftClipVisionModel(configuration)
    ```"""

    model_type = "maft_clip_vision_model"

    mask_start_layer: int | None = None
    mask_threshold: float = 0.5
    position_interpolation_align_corners: bool = True

    def __post_init__(self, **kwargs):
        if self.mask_start_layer is None:
            self.mask_start_layer = 2 * self.num_hidden_layers // 3
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Checks the CLIP sizes, then that masking starts at an existing layer."""
        super().validate_architecture()
        if not 0 <= self.mask_start_layer < self.num_hidden_layers:
            raise ValueError(
                f"`mask_start_layer` must be in [0, num_hidden_layers - 1] = [0, {self.num_hidden_layers - 1}], "
                f"got {self.mask_start_layer}."
            )
        if not 0.0 < self.mask_threshold <= 1.0:
            raise ValueError(f"`mask_threshold` must be in (0, 1], got {self.mask_threshold}.")

    @classmethod
    def get_config_dict(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Reads a config file; a full `CLIPConfig` gives its vision part with the model's projection size."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if "vision_config" in config_dict and "projection_dim" in config_dict:
            vision_config = dict(config_dict["vision_config"])
            vision_config["projection_dim"] = config_dict["projection_dim"]
            vision_config["model_type"] = cls.model_type
            config_dict = {**config_dict, "vision_config": vision_config}
        return config_dict, kwargs


@strict
class MaftDeepLabResNetConfig(PreTrainedConfig):
    r"""
    Configuration of the DeepLab-style ResNet that MAFT's proposal generator uses (detectron2's
    `build_resnet_deeplab_backbone`): a stem of three 3x3 convolutions, bottleneck stages res2..res5 with frozen batch
    norm, and multi-grid dilations in res5. Defaults are the ResNet-101 of the released MAFT and FreeSeg models.

    depths (`list[int]`, *optional*, defaults to `[3, 4, 23, 3]`):
        Number of bottleneck blocks in res2, res3, res4 and res5 (`[3, 4, 6, 3]` is ResNet-50).
    stem_out_channels (`int`, *optional*, defaults to 128):
        Output channels of the stem (its first two convolutions have half as many).
    res2_out_channels (`int`, *optional*, defaults to 256):
        Output channels of res2; each later stage doubles them.
    num_groups (`int`, *optional*, defaults to 1):
        Groups of the 3x3 convolutions (ResNeXt when > 1).
    width_per_group (`int`, *optional*, defaults to 64):
        Bottleneck width of res2 per group; each later stage doubles it.
    stride_in_1x1 (`bool`, *optional*, defaults to `False`):
        Whether a block's stride is on its first 1x1 convolution (else on the 3x3).
    res4_dilation (`int`, *optional*, defaults to 1), res5_dilation (`int`, *optional*, defaults to 1):
        Dilation of res4 and res5; a stage with dilation > 1 keeps its input resolution.
    res5_multi_grid (`list[int]`, *optional*, defaults to `[1, 2, 4]`):
        Per-block multipliers of res5's dilation.
    batch_norm_eps (`float`, *optional*, defaults to 1e-5):
        Epsilon of the frozen batch norms.
    """

    model_type = "maft_deeplab_resnet"

    depths: list[int] | tuple[int, ...] = (3, 4, 23, 3)
    stem_out_channels: int = 128
    res2_out_channels: int = 256
    num_groups: int = 1
    width_per_group: int = 64
    stride_in_1x1: bool = False
    res4_dilation: int = 1
    res5_dilation: int = 1
    res5_multi_grid: list[int] | tuple[int, ...] = (1, 2, 4)
    batch_norm_eps: float = 1e-5

    def validate_architecture(self):
        """The four stages, and res5's multi-grid with one multiplier per block."""
        if len(self.depths) != 4 or min(self.depths) < 1:
            raise ValueError(f"`depths` must give at least one block for each of res2..res5, got {list(self.depths)}.")
        if len(self.res5_multi_grid) != self.depths[3]:
            raise ValueError(
                f"`res5_multi_grid` needs one dilation multiplier per res5 block ({self.depths[3]}), "
                f"got {list(self.res5_multi_grid)}."
            )
        if self.stem_out_channels % 2:
            raise ValueError(f"`stem_out_channels` must be even, got {self.stem_out_channels}.")


@strict
class MaftConfig(PreTrainedConfig):
    r"""
    Configuration of [`MaftModel`]. The defaults reproduce MAFT with CLIP ViT-B/16 and the ResNet-101 FreeSeg proposal
    generator exactly (DESIGN.md §2-§4); [`MaftConfig.vit_large_patch14`] gives the ViT-L/14 model.

    text_config (`dict` or `CLIPTextConfig`, *optional*):
        CLIP's text tower (defaults: ViT-B/16's, 512 wide, 12 layers).
    vision_config (`dict` or `MaftClipVisionConfig`, *optional*):
        The IP-CLIP image tower (defaults: ViT-B/16, `mask_start_layer` 8).
    backbone_config (`dict` or `PreTrainedConfig`, *optional*):
        The proposal generator's backbone: a [`MaftDeepLabResNetConfig`] (default, ResNet-101) or the config of any
        transformers backbone (`AutoBackbone`, e.g. `ResNetConfig`, `SwinConfig`) with four feature maps at strides
        4, 8, 16 and 32.
    feature_size (`int`, *optional*, defaults to 256):
        Channels of the pixel decoder's feature maps.
    mask_feature_size (`int`, *optional*, defaults to 256):
        Channels of the per-pixel mask features.
    encoder_layers (`int`, *optional*, defaults to 6):
        Deformable-attention layers of the pixel decoder.
    encoder_attention_heads (`int`, *optional*, defaults to 8), encoder_feedforward_dim (`int`, *optional*, defaults to 1024):
        Heads and feed-forward width of the pixel decoder's layers.
    encoder_num_points (`int`, *optional*, defaults to 4):
        Sampling points per head and level of the deformable attention.
    num_feature_levels (`int`, *optional*, defaults to 3):
        Feature levels (res3, res4, res5) the pixel decoder and the transformer decoder use.
    encoder_dropout (`float`, *optional*, defaults to 0.1):
        Dropout of the pixel decoder's layers.
    deformable_attention_backend (`str`, *optional*, defaults to `"auto"`):
        Implementation of multi-scale deformable attention: "auto", "cuda", "cpu" or "pytorch" (see `maft.deformable_attention`;
        the environment variable `MAFT_DEFORMABLE_ATTENTION_BACKEND` overrides it).
    context_attention_dim (`int`, *optional*, defaults to 2048), context_attention_heads (`int`, *optional*, defaults to 8):
        Inner width and heads of the text-to-pixel context interaction.
    context_layer_scale_init (`float`, *optional*, defaults to 0.1):
        Initial layer-scale of the context interaction's residual.
    context_dropout (`float`, *optional*, defaults to 0.1):
        Attention dropout of the context interaction.
    hidden_dim (`int`, *optional*, defaults to 256):
        Width of the transformer decoder.
    num_queries (`int`, *optional*, defaults to 100):
        Number of mask proposals.
    decoder_layers (`int`, *optional*, defaults to 10):
        Masked-attention decoder layers, each followed by a prediction (one more prediction comes before them). The
        released models have 10: the original builds as many layers as its `DEC_LAYERS`.
    decoder_attention_heads (`int`, *optional*, defaults to 8), decoder_feedforward_dim (`int`, *optional*, defaults to 2048):
        Heads and feed-forward width of the decoder layers.
    class_embed_hidden_dim (`int`, *optional*, defaults to 1024):
        Hidden width of the MLP that maps a query to its CLIP-space class embedding.
    projection_dim (`int`, *optional*, defaults to 512):
        Dimension of CLIP's joint image-text space.
    logit_scale (`float`, *optional*, defaults to 100.0):
        Fixed temperature of every class logit: `logit_scale * cos(embedding, text)`.
    ensemble_weight (`float`, *optional*, defaults to 0.0):
        Weight lambda of the in-vocabulary scores in `p_in^lambda * p_clip^(1 - lambda)` for seen classes (swapped
        for unseen ones). The released MAFT models use 0: IP-CLIP's scores only.

    The configuration describes the model only. How it is trained (which parameters, the losses and their weights) is
    the training recipe's (`maft.training.recipes`); the prompt templates, the CLIP input size and the label ignore
    index are the processor's (`MaftProcessor`, `MaftImageProcessor`).
    """

    model_type = "maft"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "text_config": SubConfigSpec(CLIPTextConfig),
        "vision_config": SubConfigSpec(MaftClipVisionConfig, init_kwargs={"patch_size": 16}),
        "backbone_config": SubConfigSpec(MaftDeepLabResNetConfig),
    }

    text_config: dict | CLIPTextConfig | None = None
    vision_config: dict | MaftClipVisionConfig | None = None
    backbone_config: dict | PreTrainedConfig | None = None
    feature_size: int = 256
    mask_feature_size: int = 256
    encoder_layers: int = 6
    encoder_attention_heads: int = 8
    encoder_feedforward_dim: int = 1024
    encoder_num_points: int = 4
    num_feature_levels: int = 3
    encoder_dropout: float = 0.1
    deformable_attention_backend: Literal["auto", "cuda", "cpu", "pytorch"] = "auto"
    context_attention_dim: int = 2048
    context_attention_heads: int = 8
    context_layer_scale_init: float = 0.1
    context_dropout: float = 0.1
    hidden_dim: int = 256
    num_queries: int = 100
    decoder_layers: int = 10
    decoder_attention_heads: int = 8
    decoder_feedforward_dim: int = 2048
    class_embed_hidden_dim: int = 1024
    projection_dim: int = 512
    logit_scale: float = 100.0
    ensemble_weight: float = 0.0

    def __post_init__(self, **kwargs):
        retired = sorted(name for name in RETIRED_MAFT_CONFIG_ATTRIBUTES if kwargs.pop(name, None) is not None)
        if retired:
            logger.info(f"Ignoring {', '.join(retired)} of an older maft config: the training recipe and the processor own them now.")
        if "custom_pipelines" in kwargs and pipeline_is_registered():
            # transformers' `pipeline()` prefers a config's custom pipeline (remote code, behind `trust_remote_code`) to
            # the registered one; where maft registered its own, that one runs. `MaftModel.save_pretrained` writes it.
            kwargs["custom_pipelines"] = {task: spec for task, spec in kwargs["custom_pipelines"].items() if task != PIPELINE_TASK}
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Sizes that must divide or match each other, and the values each option allows."""
        for size, heads in (
            ("feature_size", "encoder_attention_heads"),
            ("hidden_dim", "decoder_attention_heads"),
            ("context_attention_dim", "context_attention_heads"),
        ):
            if getattr(self, size) % getattr(self, heads):
                raise ValueError(f"`{size}` ({getattr(self, size)}) must be divisible by `{heads}` ({getattr(self, heads)}).")
        for name, sub_config in (("text_config", self.text_config), ("vision_config", self.vision_config)):
            if sub_config.projection_dim != self.projection_dim:
                raise ValueError(
                    f"`{name}.projection_dim` ({sub_config.projection_dim}) must equal `projection_dim` ({self.projection_dim})."
                )
        if not 0.0 <= self.ensemble_weight <= 1.0:
            raise ValueError(f"`ensemble_weight` must be in [0, 1], got {self.ensemble_weight}.")
        if self.num_feature_levels != 3:
            raise ValueError(f"`num_feature_levels` must be 3 (res3, res4, res5), got {self.num_feature_levels}.")

    @classmethod
    def get_config_dict(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Reads a config file; the config of another model (e.g. a CLIP checkpoint's) is refused, naming its type."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if "model_type" in config_dict:
            check_is_maft_config(config_dict, pretrained_model_name_or_path)
        return config_dict, kwargs

    @classmethod
    def vit_large_patch14(cls, **kwargs) -> "MaftConfig":
        """MAFT with CLIP ViT-L/14 (IP-CLIP masks from layer 16 of 24), as released by the authors."""
        defaults = dict(
            text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768),
            vision_config=dict(
                hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                patch_size=14, projection_dim=768, mask_start_layer=16,
            ),
            projection_dim=768,
        )
        defaults.update(kwargs)
        return cls(**defaults)


def check_is_maft_config(config: dict, name: str | os.PathLike) -> None:
    """Refuses a model config (as in config.json) that is not MAFT's, e.g. a CLIP checkpoint given as the model."""
    model_type = config.get("model_type")
    if model_type != MaftConfig.model_type:
        architectures = ", ".join(config.get("architectures") or []) or "unknown architecture"
        raise ValueError(
            f"{name} holds a {model_type!r} model ({architectures}), not a MAFT model ({MaftConfig.model_type!r}): "
            "start one from CLIP with MaftModel.from_clip_pretrained, or convert an original checkpoint with `maft convert`"
        )


def pipeline_is_registered() -> bool:
    """Whether transformers' pipeline registry runs `PIPELINE_TASK` in this process (importing maft's classes registers
    it), so that a saved model's copy of the pipeline (remote code) is not needed."""
    from transformers.pipelines import PIPELINE_REGISTRY

    return PIPELINE_TASK in PIPELINE_REGISTRY.supported_tasks


AutoConfig.register(MaftClipVisionConfig.model_type, MaftClipVisionConfig)
AutoConfig.register(MaftDeepLabResNetConfig.model_type, MaftDeepLabResNetConfig)
AutoConfig.register(MaftConfig.model_type, MaftConfig)
# save_pretrained writes this file and an `auto_map` beside the config, so transformers alone loads it (remote code).
MaftClipVisionConfig.register_for_auto_class()
MaftConfig.register_for_auto_class()


__all__ = ["MaftClipVisionConfig", "MaftConfig", "MaftDeepLabResNetConfig"]
