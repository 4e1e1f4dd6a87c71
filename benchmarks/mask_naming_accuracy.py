"""How well the miniature's encoders name masks, independently of any proposal generator: the miniature test scenes'
ground-truth segments are the given masks, and each method names every segment among all 24 classes; the accuracy is
the fraction of segments named right, for segments of seen classes, of unseen classes, their harmonic mean, and all.

Methods, each with the bundled model's text encoder (frozen in both training stages, so it is the miniature CLIP's):
- IP-CLIP, one pass: `MaftModel.classify_masks` of the bundled model `maft/pretrained/maft-mini` (MAFT's fine-tuned
  IP-CLIP), and, with `--frozen-clip`, of the same model with the miniature's frozen CLIP as IP-CLIP (the frozen-CLIP
  baseline of the README's miniature section: the model after stage 1);
- CLIP on masked crops (benchmarks/masked_crops.py): each segment cut out and classified by the vision tower alone,
  for each tower.

    python benchmarks/mask_naming_accuracy.py [--scenes 300] [--seed 0] [--frozen-clip RUN/clip]

`--frozen-clip` is the `clip` folder of a `maft reproduce-mini --seed 0` run (the bundled model's CLIP; the package
does not ship it). The test scenes are drawn as `maft reproduce-mini` draws them (same split, seed and size). Prints a
markdown table and writes benchmarks/results/mask_naming_accuracy.json.
"""

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from masked_crops import clip_normalized, masked_crop_class_logits  # noqa: E402
from common import cpu_model_name  # noqa: E402


def ground_truth_segments(label: np.ndarray, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """The (K, H, W) boolean segments of a label map, one per class present (ignored pixels left out), and their classes."""
    class_ids = [int(value) for value in np.unique(label) if value < num_classes]
    return np.stack([label == class_id for class_id in class_ids]), class_ids


def namers(model, processor, text_embeds: torch.Tensor) -> dict:
    """Each method of `model` as a function (RGB image, masks) -> the class id it names each mask."""

    def ipclip(image: np.ndarray, masks: np.ndarray) -> list[int]:
        outputs = model.classify_masks(**processor(images=image, masks=masks), text_embeds=text_embeds)
        return [name["label_id"] for name in processor.post_process_mask_classification(outputs)[0]]

    def masked_crops(image: np.ndarray, masks: np.ndarray) -> list[int]:
        clip_image = clip_normalized(processor.image_processor, image)
        logits = masked_crop_class_logits(model, clip_image, torch.from_numpy(masks).float(), text_embeds)
        return logits[:, :-1].argmax(dim=-1).tolist()

    return {"IP-CLIP, one pass": ipclip, "CLIP on masked crops": masked_crops}


def with_frozen_clip(model, clip_dir: str):
    """A copy of `model` whose IP-CLIP is the CLIP vision tower in `clip_dir`, with the model's mask settings."""
    from maft import MaftClipVisionModel

    vision_config = model.config.vision_config
    frozen = copy.deepcopy(model)
    frozen.ip_clip = MaftClipVisionModel.from_pretrained(
        clip_dir, mask_start_layer=vision_config.mask_start_layer, mask_threshold=vision_config.mask_threshold,
        position_interpolation_align_corners=vision_config.position_interpolation_align_corners,
    ).eval()
    return frozen


def accuracies(correct: list[bool], unseen: list[bool]) -> dict[str, float]:
    """Percentages of segments named right: of seen classes, of unseen classes, their harmonic mean, and all."""
    from maft.evaluation.metrics import harmonic_mean

    correct, unseen = np.array(correct), np.array(unseen)
    seen_accuracy, unseen_accuracy = 100 * correct[~unseen].mean(), 100 * correct[unseen].mean()
    return {"seen": seen_accuracy, "unseen": unseen_accuracy, "harmonic": harmonic_mean(seen_accuracy, unseen_accuracy), "all": 100 * correct.mean(),
            "segments_seen": int((~unseen).sum()), "segments_unseen": int(unseen.sum())}


def main() -> None:
    from tqdm.auto import tqdm

    from helpers import bundled_model
    from maft.inference import encode_vocabulary
    from maft.miniature.reproduce import MiniatureRecipe
    from maft.miniature.world import CLASS_NAMES, UNSEEN_CLASS_NAMES, SceneSpec, scenes
    from maft.utils.output_files import write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=MiniatureRecipe.test_scenes)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frozen-clip", help="the `clip` folder of a `maft reproduce-mini` run with the same seed")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "mask_naming_accuracy.json")
    arguments = parser.parse_args()

    model, processor = bundled_model()
    text_embeds = encode_vocabulary(model, processor, CLASS_NAMES)
    methods = {f"{method}, MAFT (maft-mini)": run for method, run in namers(model, processor, text_embeds).items()}
    if arguments.frozen_clip:
        frozen = with_frozen_clip(model, arguments.frozen_clip)
        methods.update({f"{method}, frozen CLIP": run for method, run in namers(frozen, processor, text_embeds).items()})
    unseen_ids = {CLASS_NAMES.index(name) for name in UNSEEN_CLASS_NAMES}

    correct = {method: [] for method in methods}
    unseen = []
    spec = SceneSpec(size=MiniatureRecipe.image_size)
    with torch.inference_mode():
        for image, label, _ in tqdm(scenes("test", arguments.scenes, arguments.seed, spec), total=arguments.scenes, unit="scene"):
            masks, class_ids = ground_truth_segments(label, len(CLASS_NAMES))
            unseen += [class_id in unseen_ids for class_id in class_ids]
            for method, name in methods.items():
                correct[method] += [named == class_id for named, class_id in zip(name(image, masks), class_ids)]

    results = {method: accuracies(method_correct, unseen) for method, method_correct in correct.items()}
    print(f"\nNaming the ground-truth segments of {arguments.scenes} miniature test scenes (seed {arguments.seed}) among "
          f"{len(CLASS_NAMES)} classes: % of segments named right\n")
    print("| method | seen | unseen | harmonic | all |")
    print("|---|---|---|---|---|")
    for method, result in results.items():
        print(f"| {method} | {result['seen']:.1f} | {result['unseen']:.1f} | {result['harmonic']:.1f} | {result['all']:.1f} |")
    first = next(iter(results.values()))
    print(f"\n{first['segments_seen']} segments of seen classes, {first['segments_unseen']} of unseen classes")
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(arguments.output, {"scenes": arguments.scenes, "seed": arguments.seed, "frozen_clip": arguments.frozen_clip,
                                  "machine": cpu_model_name(), "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                                  "date": time.strftime("%Y-%m-%d", time.gmtime()), "results": results})
    print(f"written to {arguments.output}")


if __name__ == "__main__":
    main()
