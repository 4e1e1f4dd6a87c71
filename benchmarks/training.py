"""Training steps of the default configuration (CLIP ViT-B/16 + ResNet-101, random weights), stage 1 (the proposal
generator) and stage 2 (MAFT): time and peak memory of one optimizer step (forward, backward, AdamW) at batch 1 with a
640x640 crop.

    python benchmarks/training.py [--device cpu|cuda] [--classes 171] [--repeats 3]

Prints a markdown table (a row per stage) and writes benchmarks/results/training.json.
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import peak_memory_mib


REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = {"proposals": "1 (proposals)", "maft": "2 (MAFT)"}


def measure_stage(stage: str, batch, text_embeds_of, device: str, repeats: int) -> dict:
    """Trainable parameters, step seconds (`repeats` steps after a warm-up) and peak memory of a step of `stage`, with
    its recipe's optimizer and loss (the vocabulary encoded once, as training does)."""
    from maft import MaftConfig, MaftModel
    from maft.training import get_recipe

    torch.manual_seed(0)
    model = MaftModel(MaftConfig()).to(device)
    recipe = get_recipe(stage)
    recipe.apply_to(model)
    stage_loss = recipe.training_loss(model)
    text_embeds = text_embeds_of(model)
    recipe.set_training_modes(model)
    optimizer = recipe.optimizer(model)

    def step():
        loss = sum(stage_loss(model, batch, text_embeds).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up
    seconds = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = peak_memory_mib(step, device, inference=False)
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return {"trainable_parameters": trainable, "step_seconds": seconds, "peak_memory_mib": peak}


def main() -> None:
    from maft import MaftImageProcessor, MaftProcessor
    from maft.data.clip_tokenizer import load_clip_tokenizer
    from maft.utils.output_files import write_json
    from maft.training import MaftTrainingCollator

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--classes", type=int, default=171)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "training.json")
    arguments = parser.parse_args()

    processor = MaftProcessor(MaftImageProcessor(), load_clip_tokenizer())
    rng = np.random.default_rng(0)
    label = rng.integers(0, arguments.classes, (640, 640)).astype(np.int64) // 40 * 40 % arguments.classes
    example = {"image": Image.fromarray(rng.integers(0, 256, (640, 640, 3), dtype=np.uint8)), "label": label}
    batch = MaftTrainingCollator(processor)([example]).to(arguments.device)
    class_tokens = processor.tokenize_class_names([f"category number {index}" for index in range(arguments.classes)])

    def text_embeds_of(model):
        with torch.no_grad():
            return model.get_text_embeddings(**{name: tokens.to(arguments.device) for name, tokens in class_tokens.items()})

    results = {stage: measure_stage(stage, batch, text_embeds_of, arguments.device, arguments.repeats) for stage in STAGES}

    print(f"\nMAFT training, ViT-B/16 + ResNet-101 (random weights), batch 1, 640x640, {arguments.classes} classes, "
          f"{arguments.device}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| stage | trainable parameters | step time | peak memory of a step |")
    print("|---|---|---|---|")
    for stage, result in results.items():
        print(f"| {STAGES[stage]} | {result['trainable_parameters'] / 1e6:.1f} M | {statistics.median(result['step_seconds']):.2f} s "
              f"| {result['peak_memory_mib']:.0f} MiB |")
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(arguments.output, {
        "device": arguments.device, "threads": torch.get_num_threads(), "torch": torch.__version__, "classes": arguments.classes,
        "load_average": os.getloadavg(), "stages": results,
    })
    print(f"\nwritten to {arguments.output}")


if __name__ == "__main__":
    main()
