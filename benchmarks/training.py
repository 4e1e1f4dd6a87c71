"""Stage-2 (MAFT) training step of the default configuration (CLIP ViT-B/16 + ResNet-101, random weights): time and
peak memory of one optimizer step (forward, backward, AdamW) at batch 1 with a 640x640 crop.

    python benchmarks/training.py [--device cpu|cuda] [--classes 171] [--repeats 3]

Prints a markdown table and writes benchmarks/results/training.json. (Stage 1, the proposal generator, is not
trainable yet.)
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import peak_memory_mib


REPO_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from maft import MaftConfig, MaftImageProcessor, MaftModel, MaftProcessor
    from maft.clip_tokenizer import load_clip_tokenizer
    from maft.training import MaftTrainingArguments, MaftTrainingCollator
    from maft.training.loop import optimizer_parameter_groups

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--classes", type=int, default=171)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "training.json")
    arguments = parser.parse_args()

    torch.manual_seed(0)
    model = MaftModel(MaftConfig()).to(arguments.device)
    model.apply_mask_aware_finetuning_recipe()
    model.train()
    optimizer = torch.optim.AdamW(optimizer_parameter_groups(model, MaftTrainingArguments(output_dir="unused")))
    processor = MaftProcessor(MaftImageProcessor(), load_clip_tokenizer())
    rng = np.random.default_rng(0)
    label = rng.integers(0, arguments.classes, (640, 640)).astype(np.int64) // 40 * 40 % arguments.classes
    example = {"image": Image.fromarray(rng.integers(0, 256, (640, 640, 3), dtype=np.uint8)), "label": label}
    collator = MaftTrainingCollator(processor, [f"category number {index}" for index in range(arguments.classes)])
    batch = collator([example]).to(arguments.device)

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up, and encodes (then caches) the vocabulary
    seconds = []
    for _ in range(arguments.repeats):
        if arguments.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if arguments.device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = peak_memory_mib(step, arguments.device, inference=False)
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)

    print(f"\nMAFT stage 2, ViT-B/16 + ResNet-101 (random weights), batch 1, 640x640, {arguments.classes} classes, "
          f"{arguments.device}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| trainable parameters | step time | peak memory of a step |")
    print("|---|---|---|")
    print(f"| {trainable / 1e6:.1f} M | {statistics.median(seconds):.2f} s | {peak:.0f} MiB |")
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps({
        "device": arguments.device, "threads": torch.get_num_threads(), "torch": torch.__version__, "classes": arguments.classes,
        "trainable_parameters": trainable, "step_seconds": seconds, "peak_memory_mib": peak,
    }, indent=2))
    print(f"\nwritten to {arguments.output}")


if __name__ == "__main__":
    main()
