"""The GPU check (benchmarks/gpu_check.py): its refusal without a GPU, every step run with the CPU kernel on a tiny
configuration (the script's own plumbing), and the tiny model's forward on a GPU (`cuda` marker)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = REPO_ROOT / "benchmarks" / "gpu_check.py"
TINY_CONFIG = {
    "text_config": {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "projection_dim": 16},
    "vision_config": {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": 32, "patch_size": 8, "projection_dim": 16, "mask_start_layer": 1},
    "backbone_config": {"model_type": "maft_deeplab_resnet", "depths": [1, 1, 1, 1], "stem_out_channels": 8,
                        "res2_out_channels": 16, "width_per_group": 4, "res5_multi_grid": [2]},
    # 32 channels where group normalisation takes 32 groups.
    "feature_size": 32, "mask_feature_size": 32, "encoder_layers": 1, "encoder_attention_heads": 2,
    "encoder_feedforward_dim": 16, "context_attention_dim": 16, "context_attention_heads": 2, "hidden_dim": 32,
    "num_queries": 4, "decoder_layers": 1, "decoder_attention_heads": 2, "decoder_feedforward_dim": 16,
    "class_embed_hidden_dim": 16, "projection_dim": 16,
}
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_gpu_check(*arguments: str, out: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OUT": str(out), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, str(GPU_CHECK), *arguments], env=environment, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_gpu_check_refuses_without_a_gpu_in_one_line(tmp_path):
    result = run_gpu_check(out=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("gpu_check: no CUDA GPU is available") and "--device cpu" in result.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_gpu_check_runs_every_step_with_the_cpu_kernel(tmp_path):
    result = run_gpu_check(
        "--device", "cpu", "--image-size", "64", "--batch-size", "2", "--classes", "3", "--proposals", "4",
        "--repeats", "1", "--dtypes", "float32", "bfloat16", "--model-dtypes", "float32", "bfloat16",
        "--model-precision", "autocast", "--compile-dtypes", "float32", "--compile-backend", "eager",
        "--clip-image-size", "32", "--collection-images", "3", "--collection-batch-size", "2",
        "--collection-workers", "1", "--model-config", json.dumps(TINY_CONFIG), "--tests", str(Path(__file__).relative_to(REPO_ROOT)),
        out=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["build", "tests", "parity", "gradcheck", "kernel_timings", "training", "model_eager", "ipclip",
                           "model_compiled", "mask_naming", "collection"]
    assert all(step.get("passed", True) for step in steps.values())
    assert [row["method"].split(",")[0] for row in steps["mask_naming"]["rows"]] == ["IP-CLIP", "CLIP per masked crop"]
    assert steps["build"]["build_seconds"] > 0
    assert "skipped" in steps["tests"]["summary"]
    parity_cases = {(row["case"], row["dtype"], row["against"]) for row in steps["parity"]["rows"]}
    assert len(parity_cases) == 5 * 2 * 2 and ("batch 2", "bfloat16", "reference") in parity_cases
    # bfloat16 against a float32 reference differs by rounding, and must not be suspiciously exact either.
    bfloat16_errors = [max(row["relative_errors"].values()) for row in steps["parity"]["rows"]
                       if row["dtype"] == "bfloat16" and row["against"] == "reference"]
    assert all(0 < error <= 3e-2 for error in bfloat16_errors)
    assert {row["implementation"] for row in steps["kernel_timings"]["rows"]} == {
        "maft cpu kernel", "maft PyTorch reference", "transformers' function"}
    assert all(row["forward_ms"] > 0 and row["forward_backward_ms"] > 0 for row in steps["kernel_timings"]["rows"])
    assert [len(stage["losses"]) for stage in steps["training"]["stages"].values()] == [2, 1]
    assert [row["dtype"] for row in steps["model_eager"]["rows"]] == ["float32", "bfloat16"]
    assert [row["dtype"] for row in steps["model_compiled"]["rows"]] == ["float32"]
    assert {row["method"] for row in steps["ipclip"]["rows"]} == {"plain CLIP", "IP-CLIP, Q=4"}
    assert all(row["images_per_s"] > 0 for step in ("model_eager", "ipclip", "model_compiled") for row in steps[step]["rows"])
    assert [(row["method"], row["dtype"]) for row in steps["collection"]["rows"]] == [
        ("collection loop, batch 1", "float32"), ("collection loop, batch 2", "bfloat16"),
        ("collection loop, batch 2, compiled", "bfloat16")]
    assert all(row["images_per_s"] > 0 for row in steps["collection"]["rows"])
    assert "| parity | pixel decoder 64x64, float32 vs reference | ok" in result.stdout


@pytest.mark.cuda
@requires_cuda
def test_tiny_model_forward_on_the_gpu_matches_the_cpu():
    """The model with the CUDA kernel gives the logits and masks it gives on the CPU with the PyTorch reference."""
    from maft import MaftConfig, MaftModel

    torch.manual_seed(0)
    cpu_model = MaftModel(MaftConfig(**TINY_CONFIG, deformable_attention_backend="pytorch")).eval()
    gpu_model = MaftModel(MaftConfig(**TINY_CONFIG, deformable_attention_backend="cuda")).eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.cuda()
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "pixel_values": torch.randn(2, 3, 64, 64, generator=generator),
        "clip_pixel_values": torch.randn(2, 3, 32, 32, generator=generator),
        "text_embeds": torch.nn.functional.normalize(torch.randn(3, 16, generator=generator), dim=-1),
    }
    with torch.no_grad():
        expected = cpu_model(**inputs)
        actual = gpu_model(**{key: value.cuda() for key, value in inputs.items()})
    for name in ("class_queries_logits", "masks_queries_logits"):
        torch.testing.assert_close(getattr(actual, name).cpu(), getattr(expected, name), rtol=1e-3, atol=1e-3)
