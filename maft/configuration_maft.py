"""MAFT model configurations."""

import os
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig


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


__all__ = ["MaftClipVisionConfig"]
