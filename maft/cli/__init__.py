"""The `maft` command line: parses arguments, calls the library and prints. Any failure ends in one line naming the
problem (`maft <command>: ...`) and exit code 1; `--debug` shows the traceback instead. `maft train --push-to-hub`
whose final model is saved but did not reach the Hub ends with exit code 3 (`EXIT_NOT_PUBLISHED`). Nothing heavy
(torch, transformers, the model) is imported until a command runs, so `maft --help` answers at once."""

import argparse
import math
import sys
from pathlib import Path

from .model_loading import MODEL_DTYPES


# `maft train --push-to-hub`: training succeeded and everything is saved, but the final model is not on the Hub
EXIT_NOT_PUBLISHED = 3
TRAIN_EXIT_STATUS = (
    "Exit status: 0 trained and saved (with --push-to-hub, the final model is on the Hub); 1 failed (one line says "
    "why); 2 malformed command line; 3 trained and saved, but with --push-to-hub the final model did not reach the Hub "
    "(the last line gives the `hf upload` command that publishes it); 130 / 143 stopped by SIGINT / SIGTERM after "
    "writing a checkpoint (--resume goes on)."
)


def parse_labels(text: str) -> list[str]:
    """'cat, sofa , wall' -> ['cat', 'sofa', 'wall']; empty names are refused."""
    from maft.demo.app import parse_class_names

    try:
        return parse_class_names(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def positive_int(text: str) -> int:
    """'4' -> 4; zero, negative and non-integer values are refused."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def unit_interval(text: str) -> float:
    """'0.7' -> 0.7; values outside [0, 1] and non-numbers are refused."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """'0' -> 0; negative and non-integer values are refused."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {text!r}")
    return value


def one_line(error: BaseException) -> str:
    """The error's message on one line (its lines joined by '; '); the error's kind if it has no message."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def failure_message(error: BaseException) -> str:
    """What the user is told about a failure: the message, and for errors that are not about the user's input, files or
    installation (not ValueError, OSError or ImportError, e.g. a RuntimeError inside torch) also their kind and a
    pointer to --debug."""
    if isinstance(error, (ValueError, OSError, ImportError)):
        return one_line(error)
    return f"{type(error).__name__}: {one_line(error)} (--debug shows the traceback)"


def segment(arguments: argparse.Namespace) -> int:
    """Segments a collection of images (files, folders, patterns, path lists or a dataset) into the given classes;
    see `maft.cli.segment_collection`."""
    from maft.cli.segment_collection import segment_command

    return segment_command(arguments)


def check_stuff(task: str, stuff: list[str], labels: list[str]) -> set[int]:
    """The indices of the --stuff classes in --labels; refused when they are not among --labels or the task is semantic."""
    if stuff and task == "semantic":
        raise ValueError("--stuff is for --task panoptic or instance (semantic segmentation has no stuff or things)")
    missing = [name for name in stuff if name not in labels]
    if missing:
        raise ValueError(f"--stuff must name classes of --labels; not among them: {', '.join(missing)}")
    return {labels.index(name) for name in stuff}


def ipclip_example(arguments: argparse.Namespace) -> int:
    """Classifies the four quadrants of an image as mask proposals with IP-CLIP, in one forward pass."""
    import torch

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


def dataset_and_classes(arguments: argparse.Namespace, name_or_path: str | None, default_split: str) -> tuple:
    """The dataset, class names and ignore index that the dataset arguments (see `add_dataset_arguments`) name."""
    from maft.cli.dataset_resolution import load_dataset_and_classes

    return load_dataset_and_classes(
        name_or_path, benchmark=arguments.benchmark, data_root=arguments.data_root, split=arguments.split,
        default_split=default_split, image_column=arguments.image_column, label_column=arguments.label_column,
        class_names=arguments.class_names, ignore_index=arguments.ignore_index,
    )


# command-line option -> recipe value (maft.training.recipes); an option left out keeps the stage's value
RECIPE_OPTIONS = {
    "max_steps": "max_steps", "learning_rate": "learning_rate", "weight_decay": "weight_decay",
    "backbone_lr_multiplier": "backbone_lr_multiplier", "gradient_clip_norm": "gradient_clip_norm",
    "poly_power": "poly_power", "per_device_batch_size": "batch_size", "seed": "seed",
}
RUN_OPTIONS = ("gradient_accumulation_steps", "mixed_precision", "save_steps", "eval_steps", "logging_steps", "hub_timeout")


def train_command(arguments: argparse.Namespace) -> int:
    """Trains a MAFT model on a `datasets` dataset saved with `save_to_disk` (columns image and label)."""
    from maft.utils.output_files import check_output_folder

    check_output_folder(arguments.output_dir)  # before the slow imports below
    if arguments.eval_steps is not None and not arguments.eval_dataset:
        raise ValueError("--eval-steps needs --eval-dataset (the dataset to evaluate on)")
    import dataclasses

    from accelerate import PartialState

    from maft.cli.model_loading import check_model
    from maft.training import FinalModelNotPublishedError, MaftTrainingArguments, get_recipe, train_from_pretrained

    check_model(arguments.init_from)
    dataset, class_names, ignore_index = dataset_and_classes(arguments, arguments.train_dataset, default_split="train")
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
        save_total_limit=arguments.save_total_limit or None, trackers=arguments.report_to,
        **{option: getattr(arguments, option) for option in RUN_OPTIONS if getattr(arguments, option) is not None},
    )
    evaluator = evaluation_set(arguments, class_names) if arguments.eval_dataset else None
    unpublished = None
    try:
        train_from_pretrained(arguments.init_from, dataset, class_names, training_arguments, ignore_index,
                              augment=not arguments.no_augmentation, evaluator=evaluator,
                              panoptic_targets=arguments.targets == "panoptic")
    except FinalModelNotPublishedError as error:  # raised once everything is saved: report the results first
        unpublished = error
    if PartialState().is_main_process:  # under `accelerate launch`, one process writes
        print(f"trained {recipe.max_steps} steps; model saved to {arguments.output_dir}")
        if evaluator is not None:
            import json

            from maft.evaluation import format_results_table

            print(format_results_table(json.loads(Path(arguments.output_dir, "eval_results.json").read_text())))
    if unpublished is not None:
        print(f"maft train: {one_line(unpublished)}", file=sys.stderr)
        return EXIT_NOT_PUBLISHED
    return 0


def evaluation_set(arguments: argparse.Namespace, class_names: list[str]):
    """`--eval-dataset` with its own recorded vocabulary in its label order (without one, the training vocabulary);
    its classes that the training vocabulary lacks are the unseen ones (mIoU-seen, mIoU-unseen, hIoU)."""
    from maft.cli.dataset_resolution import load_labelled_dataset, recorded_classes
    from maft.evaluation import EvaluationSet

    dataset = load_labelled_dataset(arguments.eval_dataset, arguments.eval_split, arguments.image_column, arguments.label_column)
    eval_class_names, ignore_index = recorded_classes(dataset, class_names, arguments.ignore_index)
    training_vocabulary = set(class_names)
    unseen = [name for name in eval_class_names if name not in training_vocabulary]
    return EvaluationSet(dataset, eval_class_names, ignore_index, unseen, arguments.eval_batch_size)


def evaluate_command(arguments: argparse.Namespace) -> int:
    """mIoU, fwIoU, mACC, pACC (and seen/unseen/hIoU) of a model on a dataset saved with `save_to_disk`; with `--task
    panoptic`, PQ / SQ / RQ, with `--task instance`, mask AP, on a dataset with COCO-panoptic annotations."""
    from maft.utils.output_files import check_output_file

    if arguments.threshold is not None and arguments.task == "semantic":
        raise ValueError("--threshold applies to --task panoptic or instance (semantic segmentation keeps every pixel's best class)")
    if arguments.output:
        check_output_file(arguments.output)  # before the slow imports below
    from maft.evaluation import evaluate_on_dataset, format_results_table
    from maft.evaluation.dataset_evaluation import distributed_state
    from maft.cli.model_loading import load_model_and_processor

    from maft.cli.model_loading import resolve_device, resolve_model_dtype

    state = distributed_state()  # under `accelerate launch`, every process evaluates its shard; the main one reports
    device = resolve_device(arguments.device or (state.device if state.num_processes > 1 else None))
    dtype, dtype_choice = resolve_model_dtype(arguments.model, arguments.dtype, device)
    if dtype_choice and state.is_main_process:
        print(dtype_choice)
    model, processor = load_model_and_processor(arguments.model, device, dtype)
    dataset, class_names, ignore_index = dataset_and_classes(arguments, arguments.dataset, default_split="val")
    if arguments.task == "semantic":
        results = evaluate_on_dataset(model, processor, dataset, class_names, ignore_index, arguments.unseen_class_names,
                                      model.device, batch_size=arguments.batch_size)
    else:
        from maft.data.segmentation_data import panoptic_thing_class_ids
        from maft.evaluation.dataset_evaluation import evaluate_panoptic_on_dataset

        results = evaluate_panoptic_on_dataset(model, processor, dataset, class_names, panoptic_thing_class_ids(dataset),
                                               arguments.task, arguments.unseen_class_names, model.device,
                                               arguments.batch_size, arguments.threshold)
    if not state.is_main_process:
        return 0
    print(format_results_table(results))
    if arguments.output:
        from maft.utils.output_files import write_json

        write_json(Path(arguments.output), results)
    return 0


def convert_command(arguments: argparse.Namespace) -> int:
    """Converts an original MAFT checkpoint to a transformers-style folder (and optionally pushes it to the Hub)."""
    from maft.utils.output_files import check_output_folder

    check_output_folder(arguments.output_dir)  # before the slow imports below
    import yaml

    from maft.conversion.convert_original_maft_checkpoint import convert_original_checkpoint, load_original_checkpoint, write_converted_model
    from maft.utils.hub import push_folder_to_hub

    state_dict = load_original_checkpoint(arguments.checkpoint)
    try:
        model = convert_original_checkpoint(state_dict, arguments.original_config)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        raise ValueError(
            f"the original config {arguments.original_config} is not valid YAML: {error.problem} at line {mark.line + 1}, "
            f"column {mark.column + 1}"
        ) from error
    write_converted_model(model, arguments.output_dir, source=arguments.checkpoint, model_card=arguments.model_card)
    print(f"converted {arguments.checkpoint} -> {arguments.output_dir}")
    if arguments.push_to_hub:
        repo_url, commit_url = push_folder_to_hub(
            arguments.output_dir, arguments.push_to_hub, private=arguments.private,
            commit_message=f"Convert {Path(arguments.checkpoint).name} with maft convert",
        )
        print(f"pushed to {repo_url} ({commit_url})")
    return 0


def reproduce_mini_command(arguments: argparse.Namespace) -> int:
    """The miniature reproduction of MAFT's claim (see maft.miniature), from an empty folder to the results table."""
    from maft.miniature.reproduce import MiniatureRecipe, reproduce_miniature

    reproduce_miniature(arguments.output_dir, MiniatureRecipe(seed=arguments.seed, panoptic_targets=arguments.targets == "panoptic"))
    return 0


def demo_command(arguments: argparse.Namespace) -> int:
    """Serves the Gradio demo, or with --write-space writes it as a Hugging Face Space folder."""
    from maft.demo import launch_demo, write_space

    if arguments.write_space:
        if not arguments.model:
            raise ValueError("--write-space needs --model: the Hub repository the Space runs, e.g. --model org/maft-model")
        print(f"wrote a Space for {arguments.model} into {write_space(arguments.write_space, arguments.model)}")
    else:
        launch_demo(arguments.model, arguments.device, arguments.host, arguments.port, arguments.dtype)
    return 0


def add_dataset_arguments(parser: argparse.ArgumentParser, flag: str) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(flag, help="a dataset saved with save_to_disk (directory) or a Hub dataset name")
    source.add_argument("--benchmark", metavar="NAME",
                        help="a benchmark MAFT reports (e.g. ade20k_150), read from --data-root in the original MAFT layout")
    parser.add_argument("--data-root", help="with --benchmark: the folder holding coco/, ade/ and VOCdevkit/")
    parser.add_argument("--split", help="the split, for datasets that have several (benchmarks: train or val)")
    parser.add_argument("--class-names", type=parse_labels,
                        help="class names in label order, comma-separated (default: the dataset's metadata)")
    parser.add_argument("--ignore-index", type=int, help="label of unlabelled pixels (default: the dataset's metadata, else 255)")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, with a malformed command line reported in one line (exit code 2) as every other failure is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (--help shows the usage)\n")


DEVICE_HELP = "any torch device: cpu, cuda, cuda:1, mps, xpu... (default: cuda if available, else cpu)"
DEBUG_HELP = "on failure, show the traceback instead of one line"
DTYPE_HELP = ("precision of the model; auto: bfloat16 where the device computes it natively (CPUs with AVX512-BF16 or "
              "AMX, recent GPUs), else float32; in float16 the pixel decoder stays float32 (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="maft", description="MAFT open-vocabulary semantic segmentation.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # --debug is accepted after the command too; SUPPRESS keeps the subcommand from resetting a --debug given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    example = commands.add_parser("ipclip-example", parents=[common], help="run IP-CLIP on four quadrant masks of an image")
    example.add_argument("--model", help="a CLIP checkpoint (directory or Hub id); default: a random tiny model")
    example.set_defaults(handler=ipclip_example)

    segmenter = commands.add_parser(
        "segment", parents=[common], help="segment images or a whole collection into any list of class names",
        description="Writes, per image, into --output: NAME_overlay.png, NAME.json and, with --task semantic, "
        "NAME_labels.png (class indices); panoptic, NAME_panoptic.png (COCO panoptic: segment id = R + 256 G + 256^2 B; "
        "NAME.json holds the COCO segments_info and categories); instance, NAME_instance-K.png (one mask per instance, "
        "K from 1, best first; NAME.json lists them). NAME is the image's file name without suffix; images sharing a "
        "NAME (a/photo.png, b/photo.png) get NAME-N, N the image's position in the collection); for a dataset, NAME is "
        "the --id-column or the row's position. A rerun into the same --output skips images whose files are complete; "
        "under `accelerate launch` each process segments its share.",
    )
    segmenter.add_argument("images", nargs="*",
                           help="image files, folders (searched recursively), glob patterns (quoted) or .txt files of paths")
    segmenter.add_argument("--dataset", help="instead of images: a dataset saved with save_to_disk (folder) or a Hub dataset name")
    segmenter.add_argument("--split", help="with --dataset: the split, for datasets that have several")
    segmenter.add_argument("--streaming", action="store_true", help="with --dataset: read it as it goes, never whole")
    segmenter.add_argument("--image-column", default="image", help="with --dataset: the column of images (default: image)")
    segmenter.add_argument("--id-column", help="with --dataset: the column naming each image's outputs (default: its position)")
    segmenter.add_argument("--labels", required=True, type=parse_labels, help='class names, e.g. "cat, sofa, wall"')
    segmenter.add_argument("--model", help="model directory or Hub id (default: the bundled model)")
    segmenter.add_argument("--output", type=Path, default=Path("segmentations"), help="output directory")
    segmenter.add_argument("--batch-size", type=positive_int, default=4,
                           help="images per forward pass (default: 4; every batch size gives the same label maps)")
    segmenter.add_argument("--num-workers", type=non_negative_int, default=2,
                           help="processes reading and preprocessing images, and as many writing outputs, while the model "
                                "runs (default: 2; 0: all in this process)")
    segmenter.add_argument("--overwrite", action="store_true", help="segment every image again, even where its outputs are complete")
    segmenter.add_argument("--output-format", choices=["files", "dataset"], default="files",
                           help="dataset: also a datasets dataset of the files' contents, a row per image (OUTPUT/dataset, "
                                "and Parquet shards in OUTPUT/dataset-parquet); default: files")
    segmenter.add_argument("--push-to-hub", metavar="ORG/NAME", help="with --output-format dataset: upload it to this Hub dataset")
    segmenter.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    segmenter.add_argument("--device", help=DEVICE_HELP)
    segmenter.add_argument("--dtype", default="auto", choices=("auto", *MODEL_DTYPES), help=DTYPE_HELP)
    segmenter.add_argument("--task", default="semantic", choices=["semantic", "instance", "panoptic"],
                           help="semantic: a class per pixel; instance: separate objects; panoptic: objects of the thing "
                                "classes and one region per stuff class (default: semantic)")
    segmenter.add_argument("--stuff", type=parse_labels, default=[],
                           help='with --task panoptic or instance: the classes of --labels that are stuff, e.g. "sky, road" '
                                "(panoptic: one segment each; instance: no instances); default: none, every class a thing")
    for name, default, help_text in (
        ("threshold", 0.5, "lowest score of a segment"),
        ("mask-threshold", 0.5, "mask probability from which a pixel is a proposal's"),
        ("overlap-mask-area-threshold", 0.8, "smallest fraction of its mask a segment must keep where it overlaps others"),
    ):
        segmenter.add_argument(f"--{name}", type=unit_interval, default=default,
                               help=f"with --task panoptic or instance: {help_text} (default: {default})")
    segmenter.add_argument("--proposals", default="maft", choices=["maft", "sam"],
                           help="where the masks come from: maft, the model's own proposal generator; sam, Segment "
                                "Anything's automatic masks (transformers' SamModel), each named by the model's IP-CLIP "
                                "(default: maft)")
    segmenter.add_argument("--sam-model", default="facebook/sam-vit-base",
                           help="with --proposals sam: the SAM checkpoint, directory or Hub id (default: facebook/sam-vit-base)")
    segmenter.add_argument("--sam-points-per-side", type=positive_int, default=32,
                           help="with --proposals sam: the grid of point prompts is N x N (default: 32)")
    segmenter.add_argument("--sam-pred-iou-threshold", type=float, default=0.88,
                           help="with --proposals sam: lowest IoU SAM predicts for a mask it keeps (default: 0.88)")
    segmenter.add_argument("--sam-stability-threshold", type=unit_interval, default=0.95,
                           help="with --proposals sam: lowest stability of a mask it keeps (default: 0.95)")
    segmenter.set_defaults(handler=segment)

    trainer = commands.add_parser("train", parents=[common], help="train a model (stage 'maft': mask-aware fine-tuning of IP-CLIP)",
                                  epilog=TRAIN_EXIT_STATUS)
    trainer.add_argument("--stage", default="maft", choices=["maft", "proposals"])
    add_dataset_arguments(trainer, "--train-dataset")
    trainer.add_argument("--eval-dataset",
                         help="evaluate on this dataset (saved or Hub) every --eval-steps and at the end (eval_results.json "
                              "in each checkpoint and the output folder); its classes the training vocabulary lacks are "
                              "the unseen ones (hIoU)")
    trainer.add_argument("--eval-split", help="the split of --eval-dataset, if it has several")
    trainer.add_argument("--eval-batch-size", type=positive_int, default=1, help="images per forward pass in evaluation; default: 1")
    trainer.add_argument("--crop-size", type=int, help="training crops (DESIGN.md §4 augmentation); default: the recipe's")
    trainer.add_argument("--no-augmentation", action="store_true", help="train on the images as they are")
    trainer.add_argument("--targets", default="semantic", choices=["semantic", "panoptic"],
                         help="semantic: one mask per class present (label maps); panoptic: one per thing instance and per "
                              "stuff class, from a dataset with COCO-panoptic annotations (docs/panoptic-training-and-"
                              "evaluation.md); default: semantic")
    trainer.add_argument("--init-from", required=True, help="the model to start from (directory or Hub id)")
    trainer.add_argument("--output-dir", required=True)
    trainer.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    trainer.add_argument("--push-to-hub", action="store_true",
                         help="upload each checkpoint's model (with a model card) to --hub-model-id in the background; "
                              "exit status 3 if the final one does not get there")
    trainer.add_argument("--hub-model-id", metavar="ORG/NAME", help="the Hub repository --push-to-hub writes to")
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
        ("eval-steps", int, "with --eval-dataset, evaluate every N steps, a multiple of --save-steps; default: --save-steps"),
        ("logging-steps", int, "losses, learning rate and throughput every N steps; default: 10"),
        ("hub-timeout", float, "seconds before a Hub request is given up; default: 60"),
    ):
        trainer.add_argument(f"--{name}", type=kind, help=help_text)
    trainer.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    trainer.add_argument("--save-total-limit", type=int, default=3,
                         help="keep the newest N checkpoints (0: keep all) and, with --eval-dataset, the best evaluated one "
                              "(by hIoU when the evaluation has unseen classes, else by mIoU); with --push-to-hub, an older "
                              "one also while it is being uploaded; default: 3")
    trainer.add_argument("--report-to", nargs="+", default=[], metavar="TRACKER",
                         help="Accelerate trackers for losses, learning rate and throughput: tensorboard, wandb, ...")
    trainer.set_defaults(handler=train_command)

    evaluator = commands.add_parser(
        "evaluate", parents=[common], help="mIoU (or PQ, or mask AP) and related metrics of a model on a labelled dataset",
        description="Under `accelerate launch` (e.g. --num_processes 8), each process evaluates a shard of the dataset "
        "on its device, the confusion matrices are summed, and the main process prints and writes the metrics.",
    )
    evaluator.add_argument("--model", required=True, help="model directory or Hub id")
    add_dataset_arguments(evaluator, "--dataset")
    evaluator.add_argument("--task", default="semantic", choices=["semantic", "panoptic", "instance"],
                           help="semantic: mIoU on label maps; panoptic: PQ, SQ, RQ; instance: mask AP over thing classes (both "
                                "on a dataset with COCO-panoptic annotations); default: semantic")
    evaluator.add_argument("--threshold", type=float,
                           help="--task panoptic/instance: score below which a predicted segment is dropped; default: 0.5 "
                                "(panoptic), 0 (instance: AP ranks every detection)")
    evaluator.add_argument("--unseen-class-names", type=parse_labels, default=[],
                           help="classes unseen in training: adds the seen and unseen averages and their harmonic mean")
    evaluator.add_argument("--output", help="write the results as JSON")
    evaluator.add_argument("--batch-size", type=positive_int, default=1,
                           help="images per forward pass (default: 1, as the original evaluates; any batch size gives "
                                "the same metrics)")
    evaluator.add_argument("--device", help=DEVICE_HELP)
    evaluator.add_argument("--dtype", default="auto", choices=("auto", *MODEL_DTYPES), help=DTYPE_HELP)
    evaluator.set_defaults(handler=evaluate_command)

    converter = commands.add_parser("convert", parents=[common], help="convert an original MAFT checkpoint (detectron2 .pt/.pth)")
    converter.add_argument("--checkpoint", required=True)
    converter.add_argument("--output-dir", required=True)
    converter.add_argument("--original-config", help="the original YAML config, for values tensor shapes cannot tell")
    converter.add_argument("--model-card", help="a model card (README.md) for the folder, e.g. one of model_cards/; default: a generated one")
    converter.add_argument("--push-to-hub", metavar="ORG/NAME", help="also upload the folder to this Hub repository")
    converter.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    converter.set_defaults(handler=convert_command)

    demo = commands.add_parser(
        "demo", parents=[common], help="a browser app: segment an uploaded or example image into typed class names",
        description='Needs Gradio (pip install "maft[demo]"). Serves the app on http://HOST:PORT, or with '
        "--write-space writes it as a Hugging Face Space for the Hub model --model.",
    )
    demo.add_argument("--model", help="model directory or Hub id (default: the bundled model)")
    demo.add_argument("--device", help=DEVICE_HELP)
    demo.add_argument("--dtype", default="auto", choices=("auto", *MODEL_DTYPES), help=DTYPE_HELP)
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface); default: 127.0.0.1")
    demo.add_argument("--port", type=int, default=7860, help="default: 7860")
    demo.add_argument("--write-space", type=Path, metavar="DIR",
                      help="instead of serving, write a Hugging Face Space (app.py, requirements.txt, README.md) into DIR")
    demo.set_defaults(handler=demo_command)

    reproducer = commands.add_parser(
        "reproduce-mini", parents=[common], help="draw a miniature world, pre-train a tiny CLIP, train both stages, compare with frozen CLIP"
    )
    reproducer.add_argument("--output-dir", type=Path, default=Path("maft-mini-reproduction"),
                            help="where every step writes its result; a rerun continues an interrupted run")
    reproducer.add_argument("--seed", type=int, default=0)
    reproducer.add_argument("--targets", default="semantic", choices=["semantic", "panoptic"],
                            help="stage 1's targets: one mask per class (the shipped maft-mini's recipe) or one per thing "
                                 "instance and per stuff class; default: semantic")
    reproducer.set_defaults(handler=reproduce_mini_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        return arguments.handler(arguments)
    except KeyboardInterrupt:
        if arguments.debug:
            raise
        print(f"maft {arguments.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if arguments.debug:
            raise
        print(f"maft {arguments.command}: {failure_message(error)}", file=sys.stderr)
        return 1

