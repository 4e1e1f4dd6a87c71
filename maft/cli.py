"""The `maft` command line."""

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm


DEFAULT_MODEL = "pretrained/maft-mini"


def default_model_path() -> Path:
    """The model bundled with the package, used when no `--model` is given."""
    path = Path(str(resources.files("maft").joinpath(DEFAULT_MODEL)))
    if not (path / "config.json").is_file():
        raise SystemExit(f"maft: this installation has no bundled default model at {path}; pass --model DIR_OR_HUB_ID")
    return path


def parse_labels(text: str) -> list[str]:
    """'cat, sofa , wall' -> ['cat', 'sofa', 'wall']."""
    labels = [label.strip() for label in text.split(",")]
    if not all(labels):
        raise argparse.ArgumentTypeError(f"--labels must be a comma-separated list of non-empty class names, got {text!r}")
    return labels


def segment(arguments: argparse.Namespace) -> int:
    """Segments each image into the given classes and writes an overlay, the label map and class fractions."""
    from PIL import Image

    from maft import MaftModel, MaftProcessor
    from maft.visualization import class_fractions, label_map_image, render_overlay

    model_path = arguments.model or default_model_path()
    processor = MaftProcessor.from_pretrained(model_path)
    model = MaftModel.from_pretrained(model_path).to(arguments.device).eval()
    arguments.output.mkdir(parents=True, exist_ok=True)
    failures = 0
    for image_path in tqdm(arguments.images, desc="segmenting", unit="image"):
        try:
            with Image.open(image_path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as error:
            failures += 1
            tqdm.write(f"maft: skipped {image_path}: {error}", file=sys.stderr)
            continue
        inputs = processor(images=image, text=arguments.labels, return_tensors="pt").to(arguments.device)
        with torch.inference_mode():
            outputs = model(**inputs)
        label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
        label_map = label_map.cpu().numpy()
        stem = arguments.output / Path(image_path).stem
        render_overlay(image, label_map, arguments.labels).save(f"{stem}_overlay.png")
        label_map_image(label_map).save(f"{stem}_labels.png")
        fractions = {"image": str(image_path), "labels": arguments.labels, "fractions": class_fractions(label_map, arguments.labels)}
        Path(f"{stem}.json").write_text(json.dumps(fractions, indent=2))
    done = len(arguments.images) - failures
    print(f"segmented {done} of {len(arguments.images)} images into {arguments.output}")
    return 1 if failures else 0


def ipclip_example(arguments: argparse.Namespace) -> int:
    """Classifies the four quadrants of an image as mask proposals with IP-CLIP, in one forward pass."""
    from maft import MaftClipVisionConfig, MaftClipVisionModel

    if arguments.model:
        model = MaftClipVisionModel.from_pretrained(arguments.model)
    else:
        torch.manual_seed(0)
        config = MaftClipVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            image_size=64, patch_size=16, projection_dim=32, initializer_range=0.2,
        )
        model = MaftClipVisionModel(config)
    model.eval()
    size, half = model.config.image_size, model.config.image_size // 2
    names = ["top-left", "top-right", "bottom-left", "bottom-right"]
    colours = [(2.0, -1.0, -1.0), (-1.0, 2.0, -1.0), (-1.0, -1.0, 2.0), (0.5, 0.5, 0.5)]  # red, green, blue, grey
    corners = [(slice(0, half), slice(0, half)), (slice(0, half), slice(half, None)),
               (slice(half, None), slice(0, half)), (slice(half, None), slice(half, None))]
    pixel_values = torch.zeros(1, 3, size, size)
    quadrants = torch.zeros(1, 4, size, size)
    for index, ((rows, columns), colour) in enumerate(zip(corners, colours)):
        pixel_values[0, :, rows, columns] = torch.tensor(colour)[:, None, None]
        quadrants[0, index, rows, columns] = 1.0
    with torch.inference_mode():
        embeds = model(pixel_values, mask_proposals=quadrants).proposal_embeds[0]
    embeds = embeds / embeds.norm(dim=-1, keepdim=True)
    similarity = embeds @ embeds.T
    print(f"IP-CLIP ({'random tiny model' if not arguments.model else arguments.model}): "
          f"{len(names)} quadrant proposals -> embeddings {tuple(embeds.shape)} in one forward pass")
    print("image: red, green, blue and grey quadrants; cosine similarity between the quadrants' embeddings:")
    print(" " * 13 + "".join(f"{name:>13}" for name in names))
    for name, row in zip(names, similarity.tolist()):
        print(f"{name:>13}" + "".join(f"{value:13.3f}" for value in row))
    return 0


def recorded_classes(dataset, default_class_names: list[str] | None, ignore_index: int | None) -> tuple[list[str], int]:
    """(class names, ignore index) recorded in the dataset's metadata; without metadata, `default_class_names` (an
    error if there are none) and 255. A given `ignore_index` replaces either."""
    from maft.segmentation_data import segmentation_metadata

    try:
        class_names, recorded_ignore_index = segmentation_metadata(dataset)
    except ValueError:
        if default_class_names is None:
            raise
        class_names, recorded_ignore_index = default_class_names, 255
    return class_names, recorded_ignore_index if ignore_index is None else ignore_index


def load_dataset_and_classes(name_or_path: str | None, arguments: argparse.Namespace, default_split: str) -> tuple:
    """The dataset (columns image/label), its class names (--class-names, else its metadata) and its ignore index
    (--ignore-index, else its metadata, else 255): from a saved or Hub dataset, or a benchmark in the original layout."""
    from maft.evaluation.benchmark_datasets import load_benchmark
    from maft.segmentation_data import load_segmentation_dataset

    if arguments.benchmark:
        if not arguments.data_root:
            raise SystemExit("maft: --benchmark needs --data-root, the folder holding coco/, ade/ and VOCdevkit/")
        dataset = load_benchmark(arguments.benchmark, arguments.data_root, arguments.split or default_split)
    else:
        dataset = load_segmentation_dataset(name_or_path, arguments.split, arguments.image_column, arguments.label_column)
    given_names = parse_labels(arguments.class_names) if arguments.class_names else None
    recorded_names, ignore_index = recorded_classes(dataset, given_names, arguments.ignore_index)
    return dataset, given_names or recorded_names, ignore_index


# command-line option -> recipe value (maft.training.recipes); an option left out keeps the stage's value
RECIPE_OPTIONS = {
    "max_steps": "max_steps", "learning_rate": "learning_rate", "weight_decay": "weight_decay",
    "backbone_lr_multiplier": "backbone_lr_multiplier", "gradient_clip_norm": "gradient_clip_norm",
    "poly_power": "poly_power", "per_device_batch_size": "batch_size", "seed": "seed",
}
RUN_OPTIONS = ("gradient_accumulation_steps", "mixed_precision", "save_steps", "logging_steps")


def train_command(arguments: argparse.Namespace) -> int:
    """Trains a MAFT model on a `datasets` dataset saved with `save_to_disk` (columns image and label)."""
    import dataclasses

    from accelerate import PartialState

    from maft.training import MaftTrainingArguments, get_recipe, train_from_pretrained

    dataset, class_names, ignore_index = load_dataset_and_classes(arguments.train_dataset, arguments, default_split="train")
    recipe = get_recipe(arguments.stage)
    recipe = recipe.replace(
        **{value: getattr(arguments, option) for option, value in RECIPE_OPTIONS.items() if getattr(arguments, option) is not None}
    )
    if arguments.crop_size is not None:
        recipe = recipe.replace(augmentation=dataclasses.replace(recipe.augmentation, crop_size=arguments.crop_size))
    training_arguments = MaftTrainingArguments(
        output_dir=arguments.output_dir, recipe=recipe, resume=arguments.resume, push_to_hub=arguments.push_to_hub,
        hub_model_id=arguments.hub_model_id, base_model=arguments.init_from,
        dataset_name=arguments.benchmark or arguments.train_dataset,
        **{option: getattr(arguments, option) for option in RUN_OPTIONS if getattr(arguments, option) is not None},
    )
    trained = train_from_pretrained(arguments.init_from, dataset, class_names, training_arguments, ignore_index,
                                    augment=not arguments.no_augmentation)
    if PartialState().is_main_process:  # under `accelerate launch`, one process writes
        print(f"trained {recipe.max_steps} steps; model saved to {arguments.output_dir}")
        if arguments.eval_dataset:
            from maft import MaftProcessor

            evaluate_after_training(trained, MaftProcessor.from_pretrained(arguments.output_dir), arguments, class_names)
    return 0


def evaluate_after_training(model, processor, arguments: argparse.Namespace, class_names: list[str]) -> None:
    """`--eval-dataset`: the trained model's metrics, printed and written to `eval_results.json` in the output folder."""
    from maft.segmentation_data import load_segmentation_dataset
    from maft.evaluation import evaluate_on_dataset, format_results_table

    dataset = load_segmentation_dataset(arguments.eval_dataset, arguments.eval_split, arguments.image_column, arguments.label_column)
    # its own recorded vocabulary, in its label order; without one, the training vocabulary
    eval_class_names, ignore_index = recorded_classes(dataset, class_names, arguments.ignore_index)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = evaluate_on_dataset(model, processor, dataset, eval_class_names, ignore_index, device=device)
    print(format_results_table(results))
    Path(arguments.output_dir, "eval_results.json").write_text(json.dumps(results, indent=2))


def evaluate_command(arguments: argparse.Namespace) -> int:
    """mIoU, fwIoU, mACC, pACC (and seen/unseen/hIoU) of a model on a dataset saved with `save_to_disk`."""
    from maft import MaftModel, MaftProcessor
    from maft.evaluation import evaluate_on_dataset, format_results_table

    dataset, class_names, ignore_index = load_dataset_and_classes(arguments.dataset, arguments, default_split="val")
    unseen = parse_labels(arguments.unseen_class_names) if arguments.unseen_class_names else []
    model, processor = MaftModel.from_pretrained(arguments.model), MaftProcessor.from_pretrained(arguments.model)
    results = evaluate_on_dataset(model, processor, dataset, class_names, ignore_index, unseen, arguments.device)
    print(format_results_table(results))
    if arguments.output:
        Path(arguments.output).write_text(json.dumps(results, indent=2))
    return 0


def convert_command(arguments: argparse.Namespace) -> int:
    """Converts an original MAFT checkpoint to a transformers-style folder (and optionally pushes it to the Hub)."""
    from maft.convert_original_checkpoint import convert_original_checkpoint, write_converted_model

    try:
        model = convert_original_checkpoint(arguments.checkpoint, arguments.original_config)
    except (ValueError, OSError) as error:
        print(f"maft convert: {arguments.checkpoint}: {error}", file=sys.stderr)
        return 1
    write_converted_model(model, arguments.output_dir, source=arguments.checkpoint, model_card=arguments.model_card)
    print(f"converted {arguments.checkpoint} -> {arguments.output_dir}")
    if arguments.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        repo_url = api.create_repo(arguments.push_to_hub, private=arguments.private or None, exist_ok=True)
        commit = api.upload_folder(
            folder_path=arguments.output_dir,
            repo_id=repo_url.repo_id,
            commit_message=f"Convert {Path(arguments.checkpoint).name} with maft convert",
        )
        print(f"pushed to {repo_url} ({commit.commit_url})")
    return 0


def reproduce_mini_command(arguments: argparse.Namespace) -> int:
    """The miniature reproduction of MAFT's claim (see maft.miniature), from an empty folder to the results table."""
    from maft.miniature.reproduce import MiniatureRecipe, reproduce_miniature

    reproduce_miniature(arguments.output_dir, MiniatureRecipe(seed=arguments.seed))
    return 0


def add_dataset_arguments(parser: argparse.ArgumentParser, flag: str) -> None:
    from maft.evaluation.benchmark_datasets import BENCHMARKS

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(flag, help="a dataset saved with save_to_disk (directory) or a Hub dataset name")
    source.add_argument("--benchmark", choices=BENCHMARKS, help="a benchmark, read from --data-root in the original MAFT layout")
    parser.add_argument("--data-root", help="with --benchmark: the folder holding coco/, ade/ and VOCdevkit/")
    parser.add_argument("--split", help="the split, for datasets that have several (benchmarks: train or val)")
    parser.add_argument("--class-names", help="class names in label order, comma-separated (default: the dataset's metadata)")
    parser.add_argument("--ignore-index", type=int, help="label of unlabelled pixels (default: the dataset's metadata, else 255)")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maft", description="MAFT open-vocabulary semantic segmentation.")
    commands = parser.add_subparsers(dest="command", required=True)
    example = commands.add_parser("ipclip-example", help="run IP-CLIP on four quadrant masks of an image")
    example.add_argument("--model", help="a CLIP checkpoint (directory or Hub id); default: a random tiny model")
    example.set_defaults(handler=ipclip_example)

    segmenter = commands.add_parser("segment", help="segment images into any list of class names")
    segmenter.add_argument("images", nargs="+", help="image files")
    segmenter.add_argument("--labels", required=True, type=parse_labels, help='class names, e.g. "cat, sofa, wall"')
    segmenter.add_argument("--model", help="model directory or Hub id (default: the bundled model)")
    segmenter.add_argument("--output", type=Path, default=Path("segmentations"), help="output directory")
    segmenter.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    segmenter.set_defaults(handler=segment)

    trainer = commands.add_parser("train", help="train a model (stage 'maft': mask-aware fine-tuning of IP-CLIP)")
    trainer.add_argument("--stage", default="maft", choices=["maft", "proposals"])
    add_dataset_arguments(trainer, "--train-dataset")
    trainer.add_argument("--eval-dataset", help="after training, evaluate on this dataset (saved or Hub): eval_results.json")
    trainer.add_argument("--eval-split", help="the split of --eval-dataset, if it has several")
    trainer.add_argument("--crop-size", type=int, help="training crops (DESIGN.md §4 augmentation); default: the recipe's")
    trainer.add_argument("--no-augmentation", action="store_true", help="train on the images as they are")
    trainer.add_argument("--init-from", required=True, help="the model to start from (directory or Hub id)")
    trainer.add_argument("--output-dir", required=True)
    trainer.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    trainer.add_argument("--push-to-hub", action="store_true")
    trainer.add_argument("--hub-model-id")
    recipe_help = "default: the stage's recipe (maft.training.recipes: PROPOSAL_GENERATOR_RECIPE, MASK_AWARE_FINE_TUNING_RECIPE)"
    for name, kind, help_text in (
        ("max-steps", int, recipe_help),
        ("learning-rate", float, recipe_help),
        ("weight-decay", float, recipe_help + "; none on normalization layers and embeddings"),
        ("backbone-lr-multiplier", float, recipe_help),
        ("gradient-clip-norm", float, "over all parameters; " + recipe_help),
        ("poly-power", float, recipe_help),
        ("per-device-batch-size", int, recipe_help),
        ("seed", int, recipe_help),
        ("gradient-accumulation-steps", int, "default: 1"),
        ("save-steps", int, "checkpoint every N steps; default: 100"),
        ("logging-steps", int, "default: 10"),
    ):
        trainer.add_argument(f"--{name}", type=kind, help=help_text)
    trainer.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    trainer.set_defaults(handler=train_command)

    evaluator = commands.add_parser("evaluate", help="mIoU and related metrics of a model on a labelled dataset")
    evaluator.add_argument("--model", required=True, help="model directory or Hub id")
    add_dataset_arguments(evaluator, "--dataset")
    evaluator.add_argument("--unseen-class-names", help="classes unseen in training: adds mIoU-seen, mIoU-unseen, hIoU")
    evaluator.add_argument("--output", help="write the results as JSON")
    evaluator.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    evaluator.set_defaults(handler=evaluate_command)

    converter = commands.add_parser("convert", help="convert an original MAFT checkpoint (detectron2 .pt/.pth)")
    converter.add_argument("--checkpoint", required=True)
    converter.add_argument("--output-dir", required=True)
    converter.add_argument("--original-config", help="the original YAML config, for values tensor shapes cannot tell")
    converter.add_argument("--model-card", help="a model card (README.md) for the folder, e.g. one of model_cards/; default: a generated one")
    converter.add_argument("--push-to-hub", metavar="ORG/NAME", help="also upload the folder to this Hub repository")
    converter.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    converter.set_defaults(handler=convert_command)

    reproducer = commands.add_parser(
        "reproduce-mini", help="draw a miniature world, pre-train a tiny CLIP, train both stages, compare with frozen CLIP"
    )
    reproducer.add_argument("--output-dir", type=Path, default=Path("maft-mini-reproduction"),
                            help="where every step writes its result; a rerun continues an interrupted run")
    reproducer.add_argument("--seed", type=int, default=0)
    reproducer.set_defaults(handler=reproduce_mini_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    return arguments.handler(arguments)


if __name__ == "__main__":
    sys.exit(main())
