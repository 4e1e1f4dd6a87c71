"""MAFT: Mask-aware Fine-Tuning of CLIP for open-vocabulary semantic segmentation, with the transformers API."""

from transformers import AutoImageProcessor, AutoModel, AutoProcessor

from .configuration_maft import MaftClipVisionConfig, MaftConfig, MaftDeepLabResNetConfig
from .convert_original_checkpoint import convert_original_checkpoint
from .modeling_maft import MaftClipVisionModel, MaftClipVisionModelOutput, MaftModel, MaftModelOutput
from .processing_maft import MaftImageProcessor, MaftProcessor


AutoModel.register(MaftConfig, MaftModel)
AutoModel.register(MaftClipVisionConfig, MaftClipVisionModel)
AutoImageProcessor.register(MaftConfig, MaftImageProcessor)
AutoProcessor.register(MaftConfig, MaftProcessor)

__version__ = "0.1.0.dev0"

__all__ = [
    "MaftClipVisionConfig",
    "MaftClipVisionModel",
    "MaftClipVisionModelOutput",
    "MaftConfig",
    "MaftDeepLabResNetConfig",
    "MaftImageProcessor",
    "MaftModel",
    "MaftModelOutput",
    "MaftProcessor",
    "convert_original_checkpoint",
]
