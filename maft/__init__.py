"""MAFT: Mask-aware Fine-Tuning of CLIP for open-vocabulary semantic segmentation, with the transformers API.

`import maft` registers MAFT with transformers (its Auto classes and the zero-shot-image-segmentation pipeline), so
that `AutoModel.from_pretrained` and `pipeline(...)` load MAFT models without `trust_remote_code`. The `maft` command
line defers that (and importing torch and transformers) to the first use of a class, so that `maft --help` starts at
once."""

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING


__version__ = "0.1.0.dev0"

# public name -> the module that defines it
_EXPORTS = {
    "MaftClipVisionConfig": "configuration_maft",
    "MaftConfig": "configuration_maft",
    "MaftDeepLabResNetConfig": "configuration_maft",
    "MaftClipVisionModel": "modeling_maft",
    "MaftClipVisionModelOutput": "modeling_maft",
    "MaftMaskClassificationOutput": "modeling_maft",
    "MaftModel": "modeling_maft",
    "MaftModelOutput": "modeling_maft",
    "MaftImageProcessor": "processing_maft",
    "MaftProcessor": "processing_maft",
    "convert_original_checkpoint": "conversion.convert_original_maft_checkpoint",
    "ZeroShotImageSegmentationPipeline": "pipeline_maft",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .configuration_maft import MaftClipVisionConfig, MaftConfig, MaftDeepLabResNetConfig
    from .conversion.convert_original_maft_checkpoint import convert_original_checkpoint
    from .modeling_maft import (
        MaftClipVisionModel,
        MaftClipVisionModelOutput,
        MaftMaskClassificationOutput,
        MaftModel,
        MaftModelOutput,
    )
    from .pipeline_maft import ZeroShotImageSegmentationPipeline
    from .processing_maft import MaftImageProcessor, MaftProcessor


def _register_pipeline() -> None:
    """`pipeline("zero-shot-image-segmentation", ...)` runs MAFT models (the Auto classes register themselves where the
    classes are defined)."""
    from transformers import AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    from .pipeline_maft import TASK, ZeroShotImageSegmentationPipeline

    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=ZeroShotImageSegmentationPipeline, pt_model=AutoModel, type="multimodal"
    )


def _register_with_transformers() -> None:
    """Imports the exported classes (their modules register the Auto classes) and registers the pipeline."""
    _register_pipeline()
    for exported, module in _EXPORTS.items():  # cache them all: later lookups no longer come to `__getattr__`
        globals()[exported] = getattr(importlib.import_module(f".{module}", __name__), exported)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _register_with_transformers()
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def _runs_the_command_line() -> bool:
    """Whether this Python was started as maft's command line: the `maft` console script, or `python -m maft` (whose
    `sys.argv[0]` is "-m" while the package is imported)."""
    program = Path(sys.argv[0]).stem if sys.argv else ""
    return program == "maft" or (program == "-m" and __name__ in sys.orig_argv)


if not _runs_the_command_line():
    _register_with_transformers()
