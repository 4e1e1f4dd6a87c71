"""Access to the original implementation's reference outputs (a copy of ../shared/reference/golden in tests/fixtures)."""

import functools
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maft import MaftClipVisionConfig, MaftClipVisionModel, MaftImageProcessor, MaftModel, convert_original_checkpoint
from maft.conversion.convert_openai_clip import convert_openai_clip_vision


GOLDEN_DIR = Path(os.environ.get("MAFT_GOLDEN_DIR", Path(__file__).resolve().parent / "fixtures" / "golden"))


def require_golden() -> Path:
    """The golden directory, which the repository carries: its absence is a failure, never a skip."""
    if not (GOLDEN_DIR / "reference_tensors.safetensors").is_file():
        pytest.fail(f"golden reference data not found in {GOLDEN_DIR} (tests/fixtures/golden, or MAFT_GOLDEN_DIR)")
    return GOLDEN_DIR


def released_key_list(name: str) -> dict[str, list[int]]:
    """Every parameter name and shape of a released checkpoint: `name` is "maft_vitb16" or "freeseg"."""
    return json.loads((require_golden().parent / f"{name}_checkpoint_keys.json").read_text())["keys"]


@functools.cache
def golden_state_dict() -> dict[str, torch.Tensor]:
    """The original model's state dict; weights were rounded to float16 before the run, so float32 reproduces it."""
    state_dict = load_file(require_golden() / "reference_state_dict.safetensors")
    return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in state_dict.items()}


@functools.cache
def golden_tensors() -> dict[str, torch.Tensor]:
    return load_file(require_golden() / "reference_tensors.safetensors")


@functools.cache
def golden_config() -> dict:
    return json.loads((require_golden() / "reference_config.json").read_text())


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def golden_ipclip(tower_prefix: str = "IPCLIP.") -> MaftClipVisionModel:
    """One of the golden model's CLIP image towers: width 128, 2 heads, 6 layers, patch 16, 64x64 input, embed 32."""
    config = MaftClipVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
        projection_dim=32,
        mask_start_layer=golden_config()["ipclip_start_layer"],
    )
    model = MaftClipVisionModel(config).eval()
    model.load_state_dict(convert_openai_clip_vision(golden_state_dict(), tower_prefix), strict=True)
    return model


def golden_image_processor() -> MaftImageProcessor:
    """The golden run rounded every tensor to float16 first, the normalisation constants (on its 0-255 scale) included."""
    defaults = MaftImageProcessor()
    rounded = {
        name: (torch.tensor(getattr(defaults, name), dtype=torch.float64) * 255).half().double().div(255).tolist()
        for name in ("image_mean", "image_std", "clip_image_mean", "clip_image_std")
    }
    return MaftImageProcessor(do_resize=False, **rounded)


@functools.cache
def golden_model() -> MaftModel:
    """Converted with the configuration derived from the tensors and the golden run's YAML. The original ignores the
    YAML's IP-CLIP start layer (the golden run set it on the module), so that one value is given."""
    return convert_original_checkpoint(
        golden_state_dict(),
        golden_config()["config"],
        vision_config={"mask_start_layer": golden_config()["ipclip_start_layer"]},
        deformable_attention_backend="pytorch",
    )
