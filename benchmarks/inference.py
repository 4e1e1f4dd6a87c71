"""End-to-end inference of the default MAFT configuration (CLIP ViT-B/16 + ResNet-101), random weights: time per stage
and peak memory for one 640x640 image and a 150-class vocabulary, first with the vocabulary to encode, then cached.

    python benchmarks/inference.py [--device cpu|cuda] [--classes 150] [--repeats 3]

Prints a markdown table and writes benchmarks/results/inference.json.
"""

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import peak_memory_mib


REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = {
    "backbone": "backbone",
    "pixel_decoder": "pixel decoder",
    "context_interaction": "context interaction",
    "decoder": "transformer decoder",
    "text_encoder": "text encoder",
    "ip_clip": "IP-CLIP",
}


class StageTimer:
    """Wall-clock time of each top-level stage, from forward hooks (summed over a stage's calls in one forward)."""

    def __init__(self, model, device: str):
        self.device = device
        self.seconds = defaultdict(float)
        self._started = {}
        for name in STAGES:
            module = getattr(model, name)
            module.register_forward_pre_hook(lambda module, args, name=name: self._start(name))
            module.register_forward_hook(lambda module, args, output, name=name: self._stop(name))

    def _start(self, name: str) -> None:
        self._synchronize()
        self._started[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        self._synchronize()
        self.seconds[name] += time.perf_counter() - self._started.pop(name)

    def _synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def main() -> None:
    from maft import MaftConfig, MaftImageProcessor, MaftModel, MaftProcessor
    from maft.clip_tokenizer import load_clip_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3, help="calls with the vocabulary cached (median reported)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "inference.json")
    arguments = parser.parse_args()

    torch.manual_seed(0)
    model = MaftModel(MaftConfig()).eval().to(arguments.device)
    processor = MaftProcessor(MaftImageProcessor(), load_clip_tokenizer())
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (640, 640, 3), dtype=np.uint8))
    class_names = [f"category number {index}" for index in range(arguments.classes)]
    inputs = processor(images=image).to(arguments.device)
    class_tokens = {name: tokens.to(arguments.device) for name, tokens in processor.tokenize_class_names(class_names).items()}
    timer = StageTimer(model, arguments.device)
    vocabulary = {}

    def segment():
        if "text_embeds" not in vocabulary:  # the first call encodes the vocabulary; later calls reuse it
            vocabulary["text_embeds"] = model.get_text_embeddings(**class_tokens)
        outputs = model(**inputs, text_embeds=vocabulary["text_embeds"])
        start = time.perf_counter()
        processor.post_process_semantic_segmentation(outputs, target_sizes=[(640, 640)])
        timer.seconds["post_processing"] += time.perf_counter() - start

    runs = []
    with torch.inference_mode():
        for _ in range(1 + arguments.repeats):
            timer.seconds.clear()
            start = time.perf_counter()
            segment()
            runs.append({"total": time.perf_counter() - start, **timer.seconds})
    peak = peak_memory_mib(segment, arguments.device)

    first, cached = runs[0], runs[1:]
    stage_names = {**STAGES, "post_processing": "post-processing"}

    def median(stage: str) -> float:
        return statistics.median(run.get(stage, 0.0) for run in cached)

    print(f"\nMAFT ViT-B/16 + ResNet-101 (random weights), one 640x640 image, {arguments.classes} classes, "
          f"{arguments.device}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| stage | first call (s) | vocabulary cached (s) |")
    print("|---|---|---|")
    for stage, label in stage_names.items():
        print(f"| {label} | {first.get(stage, 0.0):.3f} | {median(stage):.3f} |")
    print(f"| **total** | **{first['total']:.3f}** | **{median('total'):.3f}** |")
    print(f"\npeak memory of one cached call: {peak:.0f} MiB")
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "device": arguments.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "classes": arguments.classes, "first_call": first, "cached_calls": cached, "peak_memory_mib": peak,
    }
    arguments.output.write_text(json.dumps(summary, indent=2))
    print(f"written to {arguments.output}")
    if any(run.get("text_encoder", 0.0) for run in cached):
        sys.exit("the text encoder ran although the vocabulary was cached")


if __name__ == "__main__":
    main()
