"""Naming K given masks, end to end: IP-CLIP (the processor brings the masks to the CLIP view, one
`MaftModel.classify_masks` pass for all of them, `post_process_mask_classification`) against CLIP on one masked crop
per mask (benchmarks/masked_crops.py: crop, CLIP forward, the same cosine logits, argmax).

IP-CLIP with ViT-B/16-sized random weights (benchmarks/ipclip.py's), the default image processor (640-pixel short
side, 480x480 CLIP view), one 480x480 image, K binary masks of random discs at the image's size (as Segment Anything
gives them), 150 classes whose text embeddings are computed once beforehand. Times are medians over interleaved
rounds; CLIP per crop is timed once from K = 100 on.

    python benchmarks/mask_naming.py [--device cpu|cuda] [--masks 1 10 100 500] [--repeats 3] [--methods ipclip per_crop]

Prints a markdown table and writes benchmarks/results/mask_naming.json.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from common import cpu_model_name, interleaved_median_seconds  # noqa: E402
from ipclip import VIT_B16  # noqa: E402
from masked_crops import clip_normalized, masked_crop_class_logits  # noqa: E402

METHODS = {"ipclip": "IP-CLIP, one pass", "per_crop": "CLIP per masked crop"}
IMAGE_SIZE = 480
NUM_CLASSES = 150


def build_model(device: str):
    """A MaftModel whose IP-CLIP has ViT-B/16's size (random weights); the rest is tiny, as naming masks skips it."""
    from helpers import tiny_config
    from maft import MaftModel

    config = tiny_config(
        vision_config=VIT_B16,
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, projection_dim=512),
        projection_dim=512,
    )
    torch.manual_seed(0)
    return MaftModel(config).eval().to(device)


def random_disc_masks(num_masks: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """(K, size, size) boolean discs of random centres and radii."""
    generator = np.random.default_rng(num_masks)
    rows, columns = np.mgrid[:size, :size]
    centers = generator.uniform(0, size, (num_masks, 2))
    radii = generator.uniform(size / 40, size / 4, num_masks)
    return np.stack([np.hypot(rows - row, columns - column) < radius for (row, column), radius in zip(centers, radii)])


def namers(model, processor, image: np.ndarray, masks: np.ndarray, text_embeds: torch.Tensor, device: str) -> dict:
    """Each method as a call naming all `masks` of `image`, from the user's inputs to one label id per mask."""

    def ipclip() -> list[int]:
        inputs = processor(images=image, masks=masks).to(device)
        outputs = model.classify_masks(**inputs, text_embeds=text_embeds)
        return [name["label_id"] for name in processor.post_process_mask_classification(outputs)[0]]

    def per_crop() -> list[int]:
        clip_image = clip_normalized(processor.image_processor, image).to(device)
        logits = masked_crop_class_logits(model, clip_image, torch.from_numpy(masks).to(device, torch.float32), text_embeds)
        return logits[:, :-1].argmax(dim=-1).tolist()

    return {"ipclip": ipclip, "per_crop": per_crop}


def measure_seconds(runs: dict, num_masks: int, repeats: int, device: str) -> dict[str, float]:
    """Median seconds per call of each method, in interleaved rounds so that machine drift hits both alike; CLIP per
    crop is timed once from K = 100 on (K CLIP passes: one call is enough to rank it)."""
    repeats_of = {method: 1 if method == "per_crop" and num_masks >= 100 else repeats for method in runs}
    return interleaved_median_seconds(runs, repeats_of, device)


def main() -> None:
    from maft import MaftProcessor, MaftImageProcessor
    from maft.data.clip_tokenizer import load_clip_tokenizer
    from maft.utils.output_files import write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--masks", type=int, nargs="+", default=[1, 10, 100, 500])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="the methods to time (CLIP per crop takes K CLIP passes: minutes at K = 500 on a CPU)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "mask_naming.json")
    arguments = parser.parse_args()

    model = build_model(arguments.device)
    processor = MaftProcessor(MaftImageProcessor(), load_clip_tokenizer())
    image = np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    text_embeds = F.normalize(torch.randn(NUM_CLASSES, 512, generator=torch.Generator().manual_seed(0)), dim=-1).to(arguments.device)
    with torch.inference_mode():  # warm-up
        for method, run in namers(model, processor, image, random_disc_masks(1), text_embeds, arguments.device).items():
            if method in arguments.methods:
                run()
    rows = []
    for num_masks in arguments.masks:
        runs = namers(model, processor, image, random_disc_masks(num_masks), text_embeds, arguments.device)
        runs = {method: run for method, run in runs.items() if method in arguments.methods}
        for method, seconds in measure_seconds(runs, num_masks, arguments.repeats, arguments.device).items():
            rows.append({"method": method, "num_masks": num_masks, "seconds": seconds})
            print(f"  K={num_masks:<4} {METHODS[method]:<22} {seconds:8.3f} s", file=sys.stderr, flush=True)

    seconds_of = {(row["method"], row["num_masks"]): row["seconds"] for row in rows}
    machine = cpu_model_name() if arguments.device == "cpu" else torch.cuda.get_device_name()
    print(f"\nNaming K masks end to end, ViT-B/16 random weights, {IMAGE_SIZE}x{IMAGE_SIZE} image, {NUM_CLASSES} classes, "
          f"{arguments.device} ({machine}), {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| K | IP-CLIP, one pass (s) | CLIP per masked crop (s) | speed-up |")
    print("|---|---|---|---|")
    for num_masks in arguments.masks:
        ours, per_crop = seconds_of.get(("ipclip", num_masks)), seconds_of.get(("per_crop", num_masks))
        cells = [f"{value:.3f}" if value else "–" for value in (ours, per_crop)]
        print(f"| {num_masks} | {' | '.join(cells)} | {f'{per_crop / ours:.1f}x' if ours and per_crop else '–'} |")
    summary = {"device": arguments.device, "machine": machine, "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
               "torch": torch.__version__, "repeats": arguments.repeats, "image_size": IMAGE_SIZE, "classes": NUM_CLASSES,
               "date": time.strftime("%Y-%m-%d", time.gmtime()), "rows": rows}
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(arguments.output, summary)
    print(f"\nwritten to {arguments.output}")


if __name__ == "__main__":
    main()
