"""MAFT: Mask-aware Fine-Tuning of CLIP for open-vocabulary semantic segmentation, with the transformers API."""

from .configuration_maft import MaftClipVisionConfig
from .modeling_maft import MaftClipVisionModel, MaftClipVisionModelOutput


__version__ = "0.1.0.dev0"

__all__ = ["MaftClipVisionConfig", "MaftClipVisionModel", "MaftClipVisionModelOutput"]
