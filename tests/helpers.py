"""Test helpers shared by several test files: a tiny random model and processor, synthetic training data, the
benchmark datasets' original folder layouts, and what a saved model's remote code must be (and a Python without maft
to run it in)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from maft import MaftConfig, MaftImageProcessor, MaftModel, MaftProcessor
from maft.data.clip_tokenizer import load_clip_tokenizer


TEMPLATES = ["a photo of a {}.", "there is a {} in the scene"]


def tiny_config(**overrides) -> MaftConfig:
    values = dict(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=49408, projection_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16, mask_start_layer=2),
        backbone_config=dict(model_type="maft_deeplab_resnet", depths=[1, 1, 1, 1], stem_out_channels=16,
                             res2_out_channels=32, width_per_group=8, res5_multi_grid=[2]),
        feature_size=32, mask_feature_size=32, encoder_layers=1, encoder_attention_heads=4, encoder_feedforward_dim=32,
        context_attention_dim=32, context_attention_heads=4, hidden_dim=32, num_queries=5, decoder_layers=2,
        decoder_attention_heads=4, decoder_feedforward_dim=32, class_embed_hidden_dim=32, projection_dim=16,
        deformable_attention_backend="pytorch",
    )
    values.update(overrides)
    return MaftConfig(**values)


def tiny_model(**overrides) -> MaftModel:
    torch.manual_seed(0)
    return MaftModel(tiny_config(**overrides)).eval()


def tiny_processor() -> MaftProcessor:
    image_processor = MaftImageProcessor(shortest_edge=64, longest_edge=128, clip_image_size=64)
    return MaftProcessor(image_processor, load_clip_tokenizer(), prompt_templates=TEMPLATES)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


CLASS_NAMES = ["cat", "dog", "sky"]


def synthetic_dataset(size: int = 4) -> list[dict]:
    examples = []
    for index in range(size):
        label = np.full((64, 64), 2, dtype=np.int64)
        label[16:48, : 32 if index % 2 else 64] = index % 2
        label[:4] = 255
        examples.append({"image": random_image(64, 64, seed=index), "label": label})
    return examples


def overfit_stage_one(model: MaftModel, processor: MaftProcessor, examples: list[dict], collator, steps: int, output_dir):
    """Trains stage 1 for `steps` steps on `examples` (one batch); returns (the trained model, the batch, the stage's
    loss, the text embeddings, the summed loss on the batch before, after)."""
    from maft.training import PROPOSAL_GENERATOR_RECIPE, MaftTrainingArguments, train

    batch = collator(examples)
    recipe = PROPOSAL_GENERATOR_RECIPE.replace(batch_size=len(examples), max_steps=steps, learning_rate=1e-3, gradient_clip_norm=1.0)
    stage_loss = recipe.training_loss(model)
    with torch.no_grad():
        text_embeds = model.get_text_embeddings(**processor.tokenize_class_names(CLASS_NAMES))
        recipe.set_training_modes(model)
        initial = sum(stage_loss(model, batch, text_embeds).values()).item()
    arguments = MaftTrainingArguments(output_dir=str(output_dir), recipe=recipe, save_steps=steps)
    trained = train(model, processor, examples, collator, CLASS_NAMES, arguments)
    with torch.no_grad():
        final = sum(stage_loss(trained, batch, text_embeds).values()).item()
    return trained, batch, stage_loss, text_embeds, initial, final


def save_labelled_dataset(examples: list[dict], path) -> None:
    """`examples` (image and label map) as a dataset saved with save_to_disk in `path`, image and label columns."""
    from datasets import Dataset, Features, Image as ImageFeature

    Dataset.from_dict(
        {"image": [example["image"] for example in examples],
         "label": [Image.fromarray(example["label"].astype(np.uint8)) for example in examples]},
        features=Features({"image": ImageFeature(), "label": ImageFeature()}),
    ).save_to_disk(path)


def save_training_inputs(path) -> None:
    """The synthetic dataset (save_to_disk, image and label columns) in `path/data`, a tiny model in `path/init`."""
    save_labelled_dataset(synthetic_dataset(), path / "data")
    tiny_model().save_pretrained(path / "init")
    tiny_processor().save_pretrained(path / "init")


def launch_two_processes(command: list[str], timeout: float = 600, config_file=None) -> subprocess.CompletedProcess:
    """`command` (a script and its arguments, or ["-m", module, ...]) run by `accelerate launch` as two real CPU
    processes (`--cpu --num_processes 2` would start one), with one torch thread each; with `config_file`, that
    Accelerate config's multi-GPU setup, run on the CPU."""
    accelerate = Path(sys.executable).with_name("accelerate")
    setup = ["--config_file", str(config_file)] if config_file else [
        "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return subprocess.run(
        [str(accelerate), "launch", *setup, "--num_processes", "2", "--main_process_port", "0", *command],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )


# The val split of each benchmark as the original's prepare scripts leave it: image folder, label folder, label suffix.
ORIGINAL_VAL_LAYOUT = {
    "coco_stuff_171": ("coco/val2017", "coco/stuffthingmaps_detectron2/val2017", ".png"),
    "ade20k_150": ("ade/ADEChallengeData2016/images/validation",
                   "ade/ADEChallengeData2016/annotations_detectron2/validation", ".png"),
    "ade20k_847": ("ade/ADE20K_2021_17_01/images_detectron2/validation",
                   "ade/ADE20K_2021_17_01/annotations_detectron2/validation", ".tif"),
    "pascal_context_59": ("VOCdevkit/VOC2010/JPEGImages", "VOCdevkit/VOC2010/annotations_detectron2_ovs/pc59_val", ".png"),
    "pascal_context_459": ("VOCdevkit/VOC2010/JPEGImages", "VOCdevkit/VOC2010/annotations_detectron2_ovs/pc459_val",
                           ".tif"),
    "pascal_voc_20": ("VOCdevkit/VOC2012/JPEGImages", "VOCdevkit/VOC2012/annotations_ovs/val", ".png"),
}


def write_split(root, image_dir, label_dir, label_suffix, num_classes, ignore_index, stems=("a_001", "b_002"),
                unlabelled=("c_003",)):
    """Images (JPEG) and label maps (8-bit PNG or 16-bit TIFF) for `stems`, plus images without a label map."""
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    (root / label_dir).mkdir(parents=True, exist_ok=True)
    for stem in (*stems, *unlabelled):
        Image.fromarray(np.full((6, 8, 3), 90, dtype=np.uint8)).save(root / image_dir / f"{stem}.jpg")
    dtype = np.uint16 if label_suffix == ".tif" else np.uint8
    for stem in stems:
        label = np.zeros((6, 8), dtype=dtype)
        label[:, :4] = num_classes - 1  # the last class
        label[0, :] = ignore_index
        Image.fromarray(label).save(root / label_dir / f"{stem}{label_suffix}")


def bundled_scenes(sizes: list[tuple[int, int]]) -> tuple[list[dict], dict]:
    """The bundled model's example scenes (image and label map) in turn, each resized to the next (height, width) of
    `sizes` (labels by nearest neighbour), and their classes.json (class_names, unseen_class_names, ignore_index)."""
    from maft.cli.model_loading import default_model_path

    folder = default_model_path().parent / "examples"
    scenes = sorted(folder.glob("scene-*[0-9].png"))
    examples = []
    for index, (height, width) in enumerate(sizes):
        scene = scenes[index % len(scenes)]
        image = Image.open(scene).convert("RGB").resize((width, height), Image.BILINEAR)
        label = Image.open(scene.with_name(f"{scene.stem}-labels.png")).resize((width, height), Image.NEAREST)
        examples.append({"image": image, "label": np.array(label)})
    return examples, json.loads((folder / "classes.json").read_text())


def bundled_model() -> tuple[MaftModel, MaftProcessor]:
    """The bundled model and processor, on the PyTorch deformable attention (no kernel build, which concurrent test
    processes would wait for)."""
    from maft.cli.model_loading import default_model_path

    path = default_model_path()
    return MaftModel.from_pretrained(path, deformable_attention_backend="pytorch").eval(), MaftProcessor.from_pretrained(path)


# The code files a saved MAFT model carries (remote code), and the `auto_map`s naming their classes.
REMOTE_CODE_FILES = {
    "configuration_maft.py", "modeling_maft.py", "deformable_attention.py", "processing_maft.py", "pipeline_maft.py",
    "inference.py",
}
MODEL_AUTO_MAP = {"AutoConfig": "configuration_maft.MaftConfig", "AutoModel": "modeling_maft.MaftModel"}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_maft.MaftProcessor"}
CUSTOM_PIPELINES = {
    task: {"impl": "pipeline_maft.ZeroShotImageSegmentationPipeline", "pt": ["AutoModel"], "type": "multimodal"}
    for task in ("zero-shot-image-segmentation", "image-segmentation")
}


def assert_carries_remote_code(files: dict[str, bytes]) -> None:
    """`files` (name -> content, of a model folder or Hub repository) hold the package's code files and the config's
    and processor config's `auto_map` and `custom_pipelines`, so that transformers alone loads them."""
    import maft

    package = os.path.dirname(maft.__file__)
    for name in REMOTE_CODE_FILES:
        with open(os.path.join(package, name), "rb") as module:
            assert files[name] == module.read(), f"{name} differs from the package's"
    config = json.loads(files["config.json"])
    assert config["auto_map"] == MODEL_AUTO_MAP and config["custom_pipelines"] == CUSTOM_PIPELINES
    processor_config = json.loads(files["processor_config.json"])
    assert processor_config["auto_map"] == PROCESSOR_AUTO_MAP
    assert processor_config["image_processor"]["auto_map"]["AutoImageProcessor"] == "processing_maft.MaftImageProcessor"


def folder_files(folder) -> dict[str, bytes]:
    """Name -> content of the files of `folder` (not its sub-folders)."""
    return {entry.name: entry.read_bytes() for entry in folder.iterdir() if entry.is_file()}


# Run first in `run_without_maft`: any import of maft fails, as where it is not installed.
_REFUSE_MAFT = """
import importlib.abc
import sys


class RefuseMaft(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "maft" or name.startswith("maft."):
            raise ModuleNotFoundError(f"No module named {name!r} (this test runs without maft)", name=name)
        return None


sys.meta_path.insert(0, RefuseMaft())
"""


def run_without_maft(code: str, tmp_path, environment: dict[str, str] | None = None, cwd=None, timeout: float = 600) -> str:
    """Runs `code` in a fresh Python (this interpreter, isolated: no PYTHONPATH, no current folder on sys.path) where
    `import maft` fails, in `cwd` (default `tmp_path`) with transformers' remote-code cache in `tmp_path`; returns its
    standard output, or fails the test with its standard error."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "OMP_NUM_THREADS": "1", **(environment or {})}
    env.pop("PYTHONPATH", None)
    process = subprocess.run(
        [sys.executable, "-I", "-c", _REFUSE_MAFT + code], cwd=cwd or tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert process.returncode == 0, f"the process without maft failed:\n{process.stderr[-6000:]}"
    return process.stdout
