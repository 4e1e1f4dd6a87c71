"""
The paper's claim in miniature, end to end with the package's own code: draw a world, learn a tokenizer, pre-train a
small CLIP on image-caption pairs of every class, train the proposal generator (stage 1) and fine-tune IP-CLIP with
MAFT (stage 2) on the seen classes only, then evaluate on all classes the frozen-CLIP baseline and MAFT (mIoU, and PQ
from the scenes' panoptic annotations).
Each step writes its result under the output folder and is skipped when that result is already there, so an
interrupted run continues where it stopped (a training stage from its newest checkpoint).
"""

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
from PIL import Image
from transformers import CLIPTokenizer

from ..configuration_maft import MaftDeepLabResNetConfig
from ..data.segmentation_data import panoptic_thing_class_ids
from ..evaluation import evaluate_on_dataset
from ..evaluation.dataset_evaluation import evaluate_panoptic_on_dataset
from ..modeling_maft import MaftModel
from ..utils.output_files import write_json
from ..processing_maft import MaftImageProcessor, MaftProcessor
from ..data.segmentation_data import load_segmentation_dataset, segmentation_metadata
from ..training import MaftTrainingArguments, get_recipe, train_from_pretrained
from .clip_pretraining import pretrain_clip, small_clip_config
from .tokenizer import train_clip_tokenizer
from .world import CAPTION_TEMPLATES, CLASS_NAMES, IGNORE_INDEX, UNSEEN_CLASS_NAMES, SceneSpec, build_dataset, scenes


BASELINE, MAFT = "frozen CLIP (after stage 1)", "MAFT (after stage 2)"


@dataclass
class MiniatureRecipe:
    """Sizes and schedules of the miniature reproduction (the defaults take about 15 minutes on 2 CPU cores)."""

    seed: int = 0
    image_size: int = 96
    train_scenes: int = 2000
    test_scenes: int = 300
    pretraining_pairs: int = 8000
    clip_width: int = 64
    clip_patch_size: int = 8
    clip_steps: int = 2000
    clip_batch_size: int = 64
    proposal_steps: int = 2000
    proposal_learning_rate: float = 4e-4
    maft_steps: int = 500
    maft_learning_rate: float = 1e-4
    batch_size: int = 8
    bundled_examples: int = 8
    # stage 1 on Mask2Former's panoptic targets (one mask per thing instance, one per stuff class) instead of one mask
    # per class present (the shipped maft-mini's recipe)
    panoptic_targets: bool = False


def image_processor_for(recipe: MiniatureRecipe) -> MaftImageProcessor:
    return MaftImageProcessor(shortest_edge=recipe.image_size, longest_edge=4 * recipe.image_size, clip_image_size=recipe.image_size)


def miniature_model_kwargs(recipe: MiniatureRecipe) -> dict:
    """MAFT's architecture with a proposal generator a few hundred times smaller than the released one."""
    return dict(
        backbone_config=MaftDeepLabResNetConfig(
            depths=[1, 1, 1, 1], stem_out_channels=32, res2_out_channels=64, width_per_group=16, res5_multi_grid=[1]
        ).to_dict(),
        feature_size=64, mask_feature_size=64, encoder_layers=2, encoder_attention_heads=4, encoder_feedforward_dim=128,
        context_attention_dim=128, context_attention_heads=4, hidden_dim=64, num_queries=16, decoder_layers=3,
        decoder_attention_heads=4, decoder_feedforward_dim=256, class_embed_hidden_dim=128,
    )


def write_once(target: Path, write: Callable[[Path], None]) -> None:
    """`write(folder)` into `target.partial`, renamed to `target` when complete; nothing to do if `target` exists."""
    if target.exists():
        return
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write(partial)
    partial.rename(target)


def build_world(recipe: MiniatureRecipe, data_dir: Path) -> None:
    """Seen-class training scenes, all-class test scenes, and pre-training pairs (each scene with its hard negative)."""
    scene = SceneSpec(size=recipe.image_size)
    for name, dataset in (
        ("train", lambda: build_dataset("train", recipe.train_scenes, recipe.seed, scene, seen_only=True)),
        ("test", lambda: build_dataset("test", recipe.test_scenes, recipe.seed, scene)),
        ("pretraining", lambda: build_dataset("pretraining", recipe.pretraining_pairs, recipe.seed,
                                              SceneSpec(size=recipe.image_size, stuff_regions=(1, 2), things=(0, 2)), twins=True)),
    ):
        write_once(data_dir / name, lambda folder, dataset=dataset: dataset().save_to_disk(str(folder)))


def pretrain(recipe: MiniatureRecipe, data_dir: Path, folder: Path) -> None:
    """The tokenizer and the CLIP model, pre-trained on the pairs."""
    pairs = datasets.load_from_disk(str(data_dir / "pretraining"))
    tokenizer = train_clip_tokenizer(pairs["caption"])
    config = small_clip_config(len(tokenizer), image_size=recipe.image_size, patch_size=recipe.clip_patch_size, width=recipe.clip_width)
    model = pretrain_clip(pairs, tokenizer, image_processor_for(recipe), config, steps=recipe.clip_steps,
                          batch_size=recipe.clip_batch_size, group_size=2, seed=recipe.seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def initial_model(recipe: MiniatureRecipe, clip_dir: Path, folder: Path) -> None:
    """A MaftModel with the pre-trained CLIP and a fresh proposal generator, and its processor."""
    torch.manual_seed(recipe.seed)
    model = MaftModel.from_clip_pretrained(str(clip_dir), **miniature_model_kwargs(recipe))
    processor = MaftProcessor(image_processor_for(recipe), CLIPTokenizer.from_pretrained(clip_dir), prompt_templates=list(CAPTION_TEMPLATES))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def train_stage(stage: str, recipe: MiniatureRecipe, data_dir: Path, init_dir: Path, output_dir: Path) -> None:
    """Trains `stage` with its recipe at the miniature's sizes (resuming from a checkpoint of an interrupted run); the
    result is `output_dir/model`."""
    if (output_dir / "model").exists():
        return
    steps, learning_rate = {
        "proposals": (recipe.proposal_steps, recipe.proposal_learning_rate),
        "maft": (recipe.maft_steps, recipe.maft_learning_rate),
    }[stage]
    stage_recipe = get_recipe(stage).replace(max_steps=steps, learning_rate=learning_rate, batch_size=recipe.batch_size, seed=recipe.seed)
    arguments = MaftTrainingArguments(output_dir=str(output_dir / "run"), recipe=stage_recipe, resume=True,
                                      save_steps=max(steps // 5, 1))
    train_dataset = load_segmentation_dataset(str(data_dir / "train"))
    class_names, ignore_index = segmentation_metadata(train_dataset)
    print(f"training {stage_recipe.description}: {steps} steps")
    # The world's class names are colours: the photometric part of the augmentation would change what they mean.
    train_from_pretrained(str(init_dir), train_dataset, class_names, arguments, ignore_index, augment=False,
                          panoptic_targets=recipe.panoptic_targets and stage == "proposals")
    (output_dir / "run" / f"checkpoint-{steps}" / "model").rename(output_dir / "model")


def evaluate_model(model_dir: Path, data_dir: Path, result_path: Path, task: str = "semantic") -> dict:
    """The model's metrics on the test scenes with the unseen split (read back if already written): mIoU for the
    semantic task, PQ / SQ / RQ (from the scenes' panoptic annotations) for the panoptic one."""
    if not result_path.exists():
        test_dataset = load_segmentation_dataset(str(data_dir / "test"))
        class_names, ignore_index = segmentation_metadata(test_dataset)
        model, processor = MaftModel.from_pretrained(model_dir), MaftProcessor.from_pretrained(model_dir)
        if task == "semantic":
            results = evaluate_on_dataset(model, processor, test_dataset, class_names, ignore_index, UNSEEN_CLASS_NAMES)
            print(f"{model_dir}: mIoU {results['mIoU']:.1f}, seen {results['mIoU-seen']:.1f}, unseen {results['mIoU-unseen']:.1f}")
        else:
            results = evaluate_panoptic_on_dataset(model, processor, test_dataset, class_names, panoptic_thing_class_ids(test_dataset),
                                                   task, UNSEEN_CLASS_NAMES)
            print(f"{model_dir}: PQ {results['PQ']:.1f}, seen {results['PQ-seen']:.1f}, unseen {results['PQ-unseen']:.1f}")
        write_json(result_path, results)
    return json.loads(result_path.read_text())


def write_bundle(recipe: MiniatureRecipe, model_dir: Path, folder: Path) -> None:
    """What the package ships: `maft-mini/`, the stage-2 model, and `examples/`: scenes of all classes (`scene-i.png`, label map `scene-i-labels.png`) and `classes.json`."""
    MaftModel.from_pretrained(model_dir).save_pretrained(folder / "maft-mini")
    MaftProcessor.from_pretrained(model_dir).save_pretrained(folder / "maft-mini")
    examples = folder / "examples"
    examples.mkdir()
    for index, (image, label, _) in enumerate(scenes("examples", recipe.bundled_examples, recipe.seed, SceneSpec(size=recipe.image_size))):
        Image.fromarray(image).save(examples / f"scene-{index}.png")
        Image.fromarray(label).save(examples / f"scene-{index}-labels.png")
    (examples / "classes.json").write_text(
        json.dumps({"class_names": CLASS_NAMES, "unseen_class_names": UNSEEN_CLASS_NAMES, "ignore_index": IGNORE_INDEX}, indent=2)
    )


def results_table(results: dict[str, dict]) -> str:
    lines = ["| model | mIoU (seen) | mIoU (unseen) | hIoU | mIoU (all) | pACC |", "|---|---|---|---|---|---|"]
    for name, result in results.items():
        lines.append(f"| {name} | {result['mIoU-seen']:.1f} | {result['mIoU-unseen']:.1f} | {result['hIoU']:.1f} | "
                     f"{result['mIoU']:.1f} | {result['pACC']:.1f} |")
    lines += ["", "| model | PQ (seen) | PQ (unseen) | hPQ | PQ (all) | SQ (seen) | SQ (unseen) | RQ (seen) | RQ (unseen) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{result[key]:.1f}" for key in (
            "PQ-seen", "PQ-unseen", "hPQ", "PQ", "SQ-seen", "SQ-unseen", "RQ-seen", "RQ-unseen")) + " |")
    return "\n".join(lines)


def reproduce_miniature(output_dir: str | Path, recipe: MiniatureRecipe | None = None) -> dict[str, dict]:
    """Runs the whole miniature pipeline under `output_dir` and prints the results table; returns the evaluation of
    the frozen-CLIP baseline (the model after stage 1) and of MAFT (after stage 2), also written with the recipe and
    the seconds each step took in this call to `results.json`. The package's model and examples go to `output_dir/bundle`."""
    recipe = recipe or MiniatureRecipe()
    root = Path(output_dir)
    data_dir = root / "data"
    seconds: dict[str, float] = {}

    @contextmanager
    def timed(step: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        seconds[step] = round(time.perf_counter() - start, 1)

    with timed("world"):
        build_world(recipe, data_dir)
    with timed("clip pre-training"):
        write_once(root / "clip", lambda folder: pretrain(recipe, data_dir, folder))
    write_once(root / "init", lambda folder: initial_model(recipe, root / "clip", folder))
    with timed("stage 1"):
        train_stage("proposals", recipe, data_dir, root / "init", root / "proposals")
    with timed("stage 2"):
        train_stage("maft", recipe, data_dir, root / "proposals" / "model", root / "maft")
    results = {}
    for name, stage, output in ((BASELINE, "proposals", "evaluation_frozen_clip"), (MAFT, "maft", "evaluation_maft")):
        with timed(f"evaluation: {name}"):
            results[name] = evaluate_model(root / stage / "model", data_dir, root / f"{output}.json")
        with timed(f"panoptic evaluation: {name}"):
            results[name].update(evaluate_model(root / stage / "model", data_dir, root / f"{output}_panoptic.json", "panoptic"))
    write_once(root / "bundle", lambda folder: write_bundle(recipe, root / "maft" / "model", folder))
    write_json(root / "results.json", {"recipe": asdict(recipe), "results": results, "seconds": seconds})
    print(results_table(results))
    return results
