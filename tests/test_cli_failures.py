"""The command line on bad input, through the real console script: every failure ends in one line naming the problem
and exit code 1, never a traceback (unless --debug); `maft segment` reports a failing image and goes on, writing each
image's outputs all-or-nothing under names no other input shares."""

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maft.utils.visualization import class_palette


REPOSITORY = Path(__file__).resolve().parents[1]
MAFT = Path(sys.executable).with_name("maft")  # the console script installed beside this Python


def run_maft(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = os.environ | {"PYTHONPATH": str(REPOSITORY), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([str(MAFT), *arguments], capture_output=True, text=True, cwd=cwd, env=environment, timeout=600)


def assert_fails_in_one_line(result: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"maft {command}: ")
    for fragment in fragments:
        assert fragment in lines[0]


def decompression_bomb_png(path: Path, side: int = 30000) -> None:
    """A tiny PNG whose header claims side x side pixels (far beyond PIL's decompression-bomb limit)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", side, side)  # IHDR width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR's CRC covers its type and data
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder holding a tiny MAFT model, a CLIP model, damaged model folders, images, checkpoints and configs."""
    from golden import golden_state_dict
    from helpers import random_image, tiny_model, tiny_processor
    from transformers import CLIPConfig, CLIPModel

    root = tmp_path_factory.mktemp("cli_inputs")
    tiny_model().save_pretrained(root / "model")
    tiny_processor().save_pretrained(root / "model")
    CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )).save_pretrained(root / "clip")
    shutil.copytree(root / "model", root / "truncated_weights")
    weights = (root / "model" / "model.safetensors").read_bytes()
    (root / "truncated_weights" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    shutil.copytree(root / "model", root / "corrupt_config")
    (root / "corrupt_config" / "config.json").write_text('{"model_type": "maft", ')

    random_image(70, 50).save(root / "image.png")
    (root / "a_file").write_text("not a folder")
    (root / "empty.pth").write_bytes(b"")
    torch.save({"model": dict(golden_state_dict()), "iteration": 10}, root / "model_final.pth")
    checkpoint = (root / "model_final.pth").read_bytes()
    (root / "truncated.pth").write_bytes(checkpoint[: len(checkpoint) // 2])
    (root / "cut_early.pth").write_bytes(checkpoint[:5000])  # torch.load: "[Errno 22] Invalid argument"
    (root / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"model": {**golden_state_dict(), "sem_seg_head.predictor.query_feat.weight": "query features"}}, root / "string_entry.pth")
    (root / "malformed.yaml").write_text("MODEL:\n  MASK_FORMER: [1, 2\n  START_LAYERS: : 3\n")
    return root


def unwritable_folder() -> str | None:
    """A folder that cannot be written even by root (sysfs), if this machine has one."""
    folder = Path("/sys/kernel")
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError:
        return str(folder) if folder.is_dir() else None


SEGMENT = ("segment", "image.png", "--labels", "cat, dog")
CHECKPOINT_UNREADABLE = "cannot read {}: it is empty, truncated or not a PyTorch checkpoint"

FAILURES = {
    "output is a file": ((*SEGMENT, "--model", "model", "--output", "a_file"), "a_file is a file"),
    "repeated class name": (("segment", "image.png", "--labels", "cat, sofa, cat", "--model", "model"), "repeated: ['cat']"),
    "missing model folder": ((*SEGMENT, "--model", "./no_such_model"), "the model folder no_such_model does not exist"),
    "corrupt config.json": ((*SEGMENT, "--model", "corrupt_config"), "corrupt_config/config.json is corrupt"),
    "truncated weights": ((*SEGMENT, "--model", "truncated_weights"), "truncated_weights/model.safetensors is incomplete or corrupt"),
    "CLIP folder as model": ((*SEGMENT, "--model", "clip"), "holds a 'clip' model (CLIPModel), not a MAFT model"),
    "Hub id while offline": ((*SEGMENT, "--model", "someone/maft-model"), "'someone/maft-model'", "the Hub is offline"),
    "cuda without CUDA": ((*SEGMENT, "--model", "model", "--device", "cuda"), "the device 'cuda' is not available"),
    "missing dataset": (("evaluate", "--model", "model", "--dataset", "./no_such_data"), "the dataset folder ./no_such_data does not exist"),
    "benchmark without data root": (("evaluate", "--model", "model", "--benchmark", "ade20k_150"), "needs its data root"),
    "evaluate output is a folder": (("evaluate", "--model", "model", "--dataset", "x", "--output", "model"), "model: it is a folder"),
    "empty checkpoint": (("convert", "--checkpoint", "empty.pth", "--output-dir", "out"), CHECKPOINT_UNREADABLE.format("empty.pth")),
    "truncated checkpoint": (("convert", "--checkpoint", "truncated.pth", "--output-dir", "out"), CHECKPOINT_UNREADABLE.format("truncated.pth")),
    "checkpoint cut in its first record": (
        ("convert", "--checkpoint", "cut_early.pth", "--output-dir", "out"), CHECKPOINT_UNREADABLE.format("cut_early.pth"),
    ),
    "text file as checkpoint": (("convert", "--checkpoint", "notes.txt", "--output-dir", "out"), CHECKPOINT_UNREADABLE.format("notes.txt")),
    "string in the checkpoint": (
        ("convert", "--checkpoint", "string_entry.pth", "--output-dir", "out"),
        "string_entry.pth: the entry 'sem_seg_head.predictor.query_feat.weight' holds a str ('query features') where a tensor should be",
    ),
    "malformed original config": (
        ("convert", "--checkpoint", "model_final.pth", "--original-config", "malformed.yaml", "--output-dir", "out"),
        "malformed.yaml is not valid YAML", "line 3",
    ),
    "convert output-dir is a file": (("convert", "--checkpoint", "empty.pth", "--output-dir", "a_file"), "a_file is a file"),
    "train from a CLIP folder": (
        ("train", "--train-dataset", "x", "--init-from", "clip", "--output-dir", "run"), "holds a 'clip' model",
    ),
    "train output-dir is a file": (
        ("train", "--train-dataset", "x", "--init-from", "model", "--output-dir", "a_file/run"), "a_file is a file",
    ),
}


@pytest.mark.parametrize("case", FAILURES)
def test_a_failure_is_one_line_and_exit_code_1(inputs, case):
    if case == "cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    arguments, *fragments = FAILURES[case]
    assert_fails_in_one_line(run_maft(*arguments, cwd=inputs), arguments[0], *fragments)
    assert not (inputs / "out").exists()


def test_an_output_folder_that_cannot_be_written_is_one_line(inputs):
    folder = unwritable_folder()
    if folder is None:
        pytest.skip("no folder here refuses writes to root")
    result = run_maft(*SEGMENT, "--model", "model", "--output", folder, cwd=inputs)
    assert_fails_in_one_line(result, "segment", f"cannot write into the output folder {folder}")


def test_debug_shows_the_traceback(inputs):
    for arguments in (("--debug", "convert"), ("convert", "--debug")):
        result = run_maft(*arguments, "--checkpoint", "empty.pth", "--output-dir", "out", cwd=inputs)
        assert result.returncode == 1
        assert "Traceback" in result.stderr and "EOFError" in result.stderr


def test_segment_reports_each_failing_image_and_goes_on(inputs, tmp_path):
    from helpers import random_image

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        random_image(40, 30, seed=len(folder)).save(tmp_path / folder / "photo.png")
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    decompression_bomb_png(tmp_path / "bomb.png")
    random_image(1, 4000).save(tmp_path / "tall.png")
    random_image(4000, 1).save(tmp_path / "wide.png")
    random_image(30, 20).save(tmp_path / "blocked.png")
    # 16-bit grey at half of its range: read as 128, where PIL's convert("RGB") would give 255
    Image.fromarray(np.full((20, 30), 32768, dtype=np.uint16)).save(tmp_path / "deep.png")
    output = tmp_path / "out"
    (output / "blocked_labels.png").mkdir(parents=True)
    images = ["a/photo.png", "corrupt.png", "bomb.png", "tall.png", "wide.png", "blocked.png", "b/photo.png", "deep.png"]

    result = run_maft("segment", *images, "--labels", "cat, dog", "--model", str(inputs / "model"), "--output", "out", cwd=tmp_path)

    assert result.returncode == 1 and "Traceback" not in result.stderr
    failed = {line.split(":")[1].removeprefix(" skipped "): line for line in result.stderr.splitlines()}
    assert set(failed) == {"corrupt.png", "bomb.png", "blocked.png"}, result.stderr
    assert all(line.startswith("maft segment: skipped ") for line in failed.values())
    assert "exceeds limit" in failed["bomb.png"]
    assert "out/blocked_labels.png: a folder of that name is in the way" in failed["blocked.png"]
    assert "segmented 5 of 8 images" in result.stdout
    # the two photo.png get their position on the command line; the blocked image left no partial set
    written = sorted(path.name for path in output.iterdir())
    assert written == sorted(
        [f"{name}{suffix}" for name in ("photo-1", "photo-7", "deep", "tall", "wide") for suffix in ("_overlay.png", "_labels.png", ".json")]
        + ["blocked_labels.png", "maft-manifest.json", "maft-failures.json", ".maft-progress"]
    )
    assert json.loads((output / "photo-7.json").read_text())["image"] == "b/photo.png"
    assert np.asarray(Image.open(output / "tall_labels.png")).shape == (4000, 1)  # resized to at least one pixel across
    assert np.asarray(Image.open(output / "wide_labels.png")).shape == (1, 4000)
    labels = np.asarray(Image.open(output / "deep_labels.png"))
    overlay = np.asarray(Image.open(output / "deep_overlay.png"))[:20, :30].astype(np.float32)
    np.testing.assert_allclose(overlay, (0.5 * 128 + 0.5 * class_palette(2)[labels]).round(), atol=1)


def test_python_dash_m_maft_and_help_without_heavy_imports():
    """The command line defers what `import maft` does elsewhere (registering with transformers): no torch, transformers
    or datasets for `--help`, through the console script or `python -m maft`."""
    environment = os.environ | {"PYTHONPATH": str(REPOSITORY), "PYTHONPROFILEIMPORTTIME": "1"}
    for command in ([str(MAFT)], [sys.executable, "-m", "maft"]):
        result = subprocess.run([*command, "segment", "--help"], capture_output=True, text=True, env=environment)
        assert result.returncode == 0 and "--device" in result.stdout and "NAME-N" in result.stdout
        imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if line.startswith("import time:")}
        assert "maft" in imported and not {"torch", "transformers", "datasets"} & imported, command
