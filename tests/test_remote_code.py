"""Saved models carry their code (Hub custom code): what save_pretrained writes, the bundled model's code files, loading
with transformers alone from a folder and from a Hub (a Python where `import maft` fails), and deformable attention
without maft's compiled kernels."""

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.dynamic_module_utils import get_imports

from helpers import (
    CUSTOM_PIPELINES,
    REMOTE_CODE_FILES,
    assert_carries_remote_code,
    folder_files,
    run_without_maft,
    tiny_model,
    tiny_processor,
)
from maft import MaftModel, MaftProcessor, deformable_attention
from maft.inference import encode_vocabulary, segment_image
from maft.cli.model_loading import default_model_path


SCENE = default_model_path().parent / "examples" / "scene-3.png"
CLASS_NAMES = json.loads((SCENE.parent / "classes.json").read_text())["class_names"]
STUFF = [name for name in CLASS_NAMES if name.split()[-1] in {"floor", "wall", "water", "grass"}]
# What the code files may import besides the standard library: transformers' own requirements, torch and Pillow (no
# maft, no scipy).
ALLOWED_IMPORTS = {"PIL", "huggingface_hub", "numpy", "safetensors", "torch", "transformers"}


def test_save_pretrained_writes_the_code_the_auto_maps_and_the_pipeline(tmp_path):
    model, processor = tiny_model(), tiny_processor()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert {path.name for path in tmp_path.glob("*.py")} == REMOTE_CODE_FILES
    assert_carries_remote_code(folder_files(tmp_path))
    imports = set().union(*(get_imports(tmp_path / name) for name in REMOTE_CODE_FILES)) - sys.stdlib_module_names
    assert imports <= ALLOWED_IMPORTS, f"the remote code imports {sorted(imports - ALLOWED_IMPORTS)}"
    # In this process maft's registered pipeline runs the model: its config does not point pipeline() at remote code
    # for that task; the Hub task's entry stays (maft does not replace transformers' image-segmentation pipeline).
    assert not hasattr(model.config, "custom_pipelines")
    assert MaftModel.from_pretrained(tmp_path).config.custom_pipelines == {"image-segmentation": CUSTOM_PIPELINES["image-segmentation"]}


def test_the_bundled_models_code_files_are_the_package_modules():
    """Symbolic links (in git, too), so that they never go stale; a wheel holds copies of the files."""
    folder = default_model_path()
    package = Path(sys.modules["maft"].__file__).parent
    assert {path.name for path in folder.glob("*.py")} == REMOTE_CODE_FILES
    for name in REMOTE_CODE_FILES:
        assert (folder / name).is_symlink() and (folder / name).resolve() == (package / name).resolve(), name
    assert_carries_remote_code(folder_files(folder))


LOAD_WITHOUT_MAFT = """
import json
import sys
import warnings

import numpy as np
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoProcessor, pipeline

location, scene, output, class_names, stuff = {location!r}, {scene!r}, {output!r}, {class_names!r}, {stuff!r}
config = AutoConfig.from_pretrained(location, trust_remote_code=True)
model = AutoModel.from_pretrained(location, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(location, trust_remote_code=True)
image = Image.open(scene).convert("RGB")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    inputs = processor(images=image, text=class_names, return_tensors="pt")
    label_map = processor.post_process_semantic_segmentation(model(**inputs), target_sizes=[image.size[::-1]])[0]
    segmenter = pipeline("zero-shot-image-segmentation", model=location, trust_remote_code=True, device="cpu")
    segments = segmenter(image, candidate_labels=class_names)
    hub_task_segments = pipeline("image-segmentation", model=location, trust_remote_code=True, device="cpu")(image, candidate_labels=class_names)
    assert [segment["label"] for segment in hub_task_segments] == [segment["label"] for segment in segments]
    assert all(np.array_equal(np.array(a["mask"]), np.array(b["mask"])) for a, b in zip(hub_task_segments, segments))
    subtasks = {{
        subtask: segmenter(image, candidate_labels=class_names, subtask=subtask, stuff_labels=stuff, threshold=0.3)
        for subtask in ("instance", "panoptic")
    }}
for subtask, found in subtasks.items():
    np.save(f"{{output}}-{{subtask}}.npy", np.stack([np.array(segment["mask"]) for segment in found]))
np.save(output + "-label-map.npy", label_map.numpy())
np.save(output + "-pipeline.npy", np.stack([np.array(segment["mask"]) for segment in segments]))
print(json.dumps({{
    "classes": [type(config).__name__, type(model).__name__, type(processor).__name__, type(segmenter).__name__],
    "modules": sorted({{type(config).__module__.split(".")[0], type(model).__module__.split(".")[0]}}),
    "labels": [segment["label"] for segment in segments],
    "subtasks": {{subtask: [[segment["label"], segment["score"]] for segment in found] for subtask, found in subtasks.items()}},
    "fallback_warnings": [str(warning.message) for warning in caught if "falls back" in str(warning.message)],
    "maft_imported": any(name == "maft" or name.startswith("maft.") for name in sys.modules),
}}))
"""


@pytest.fixture(scope="module")
def expected_label_map():
    """The installed package's label map of the scene."""
    model, processor = MaftModel.from_pretrained(default_model_path()).eval(), MaftProcessor.from_pretrained(default_model_path())
    return segment_image(model, processor, SCENE, encode_vocabulary(model, processor, CLASS_NAMES))


@pytest.fixture(scope="module")
def expected_subtasks():
    """The installed package's instance and panoptic segments of the scene: labels and scores, and the masks."""
    from transformers import pipeline

    segmenter = pipeline("zero-shot-image-segmentation", model=str(default_model_path()), device="cpu")
    expected = {}
    for subtask in ("instance", "panoptic"):
        found = segmenter(str(SCENE), candidate_labels=CLASS_NAMES, subtask=subtask, stuff_labels=STUFF, threshold=0.3)
        expected[subtask] = ([[segment["label"], segment["score"]] for segment in found],
                             np.stack([np.array(segment["mask"]) for segment in found]))
    return expected


def check_loaded_without_maft(stdout: str, output: Path, expected_label_map: np.ndarray, expected_subtasks: dict) -> None:
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["classes"] == ["MaftConfig", "MaftModel", "MaftProcessor", "ZeroShotImageSegmentationPipeline"]
    assert result["modules"] == ["transformers_modules"] and not result["maft_imported"]
    # One warning per copy of deformable_attention.py in use (transformers gives the pipeline's file its own copies).
    (fallback,) = set(result["fallback_warnings"])
    assert "maft's compiled kernels are not installed" in fallback
    np.testing.assert_array_equal(np.load(f"{output}-label-map.npy"), expected_label_map)
    present = [name for index, name in enumerate(CLASS_NAMES) if (expected_label_map == index).any()]
    assert result["labels"] == present and len(present) > 1
    masks = np.load(f"{output}-pipeline.npy")
    for mask, name in zip(masks, present):
        np.testing.assert_array_equal(mask == 255, expected_label_map == CLASS_NAMES.index(name))
    for subtask, (segments, masks) in expected_subtasks.items():
        found = result["subtasks"][subtask]
        assert [label for label, _ in found] == [label for label, _ in segments] and len(segments) >= 2, subtask
        assert [score for _, score in found] == pytest.approx([score for _, score in segments], rel=1e-5), subtask
        np.testing.assert_array_equal(np.load(f"{output}-{subtask}.npy"), masks)
    assert {label for label, _ in result["subtasks"]["panoptic"]} & set(STUFF), "panoptic: things and stuff"


def test_the_bundled_model_runs_with_transformers_alone_from_its_folder(tmp_path, expected_label_map, expected_subtasks):
    code = LOAD_WITHOUT_MAFT.format(
        location=str(default_model_path()), scene=str(SCENE), output=str(tmp_path / "folder"), class_names=CLASS_NAMES,
        stuff=STUFF,
    )
    check_loaded_without_maft(run_without_maft(code, tmp_path), tmp_path / "folder", expected_label_map, expected_subtasks)


def test_a_model_pushed_to_the_hub_runs_with_transformers_alone(tmp_path, hub_server, expected_label_map, expected_subtasks):
    model, processor = MaftModel.from_pretrained(default_model_path()), MaftProcessor.from_pretrained(default_model_path())
    model.push_to_hub("maft-org/maft-mini")
    processor.push_to_hub("maft-org/maft-mini")
    assert_carries_remote_code(hub_server.files("maft-org/maft-mini"))
    code = LOAD_WITHOUT_MAFT.format(
        location="maft-org/maft-mini", scene=str(SCENE), output=str(tmp_path / "hub"), class_names=CLASS_NAMES, stuff=STUFF
    )
    environment = {"HF_ENDPOINT": hub_server.endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home")}
    check_loaded_without_maft(run_without_maft(code, tmp_path, environment), tmp_path / "hub", expected_label_map, expected_subtasks)


@pytest.fixture
def deformable_attention_without_kernels(monkeypatch):
    """A second copy of maft/deformable_attention.py (as transformers loads remote code) where maft.kernels is missing."""
    monkeypatch.setitem(sys.modules, "maft.kernels", None)
    spec = importlib.util.spec_from_file_location("remote_code_deformable_attention", deformable_attention.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_the_compiled_kernels_auto_warns_once_and_a_compiled_backend_raises(deformable_attention_without_kernels):
    module = deformable_attention_without_kernels
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    value = torch.randn(1, 26, 2, 4, generator=generator)
    locations = torch.rand(1, 3, 2, 2, 2, 2, generator=generator)
    weights = torch.rand(1, 3, 2, 2, 2, generator=generator).softmax(-1)
    reference = deformable_attention.multi_scale_deformable_attention_pytorch(value, shapes, locations, weights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [module.multi_scale_deformable_attention(value, shapes, None, locations, weights) for _ in range(2)]
    fallbacks = [str(warning.message) for warning in caught if "falls back" in str(warning.message)]
    assert len(fallbacks) == 1 and "maft's compiled kernels are not installed" in fallbacks[0]
    for output in outputs:
        torch.testing.assert_close(output, reference)
    with pytest.raises(module.KernelBuildError, match="the cpu kernel cannot be used: maft's compiled kernels are not installed"):
        module.multi_scale_deformable_attention(value, shapes, None, locations, weights, backend="cpu")
