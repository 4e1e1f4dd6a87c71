"""Access to the original implementation's reference outputs (../shared/reference/golden, read at test time)."""

import functools
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


GOLDEN_DIR = Path(os.environ.get("MAFT_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference" / "golden"))


def require_golden() -> Path:
    """The golden directory; skips the test where it is absent, except in CI, where its absence is a failure."""
    if not (GOLDEN_DIR / "reference_tensors.safetensors").is_file():
        message = f"golden reference data not found in {GOLDEN_DIR} (set MAFT_GOLDEN_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return GOLDEN_DIR


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
