"""End-to-end inference of the default MAFT configuration (CLIP ViT-B/16 + ResNet-101), random weights, one 640x640
image and a 150-class vocabulary: time per stage of this code in float32, in bfloat16 (as loading with
`dtype=torch.bfloat16` gives it) and compiled (`torch.compile`, float32), beside the same workload run by older
checkouts of maft (`--reference NAME=PATH`), all in one run on one machine.

The headline is the cached call: the image processor, the model with the vocabulary's text embeddings computed once
before (old checkouts: their model's own text cache), and post-processing. Each variant runs in its own worker
process with its own `PYTHONPATH`; the calls of the variants are interleaved, round after round, so that load from
other processes falls on all of them alike, and the medians are reported.

    python benchmarks/inference.py [--device cpu|cuda] [--threads 2] [--classes 150] [--repeats 5]
        [--variants float32,bfloat16,compiled] [--reference baseline=/path/to/old/checkout ...]

Prints a markdown table and writes benchmarks/results/inference.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import peak_memory_mib


REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 640
MODEL_STAGES = {
    "backbone": "backbone (ResNet-101)",
    "pixel_decoder": "pixel decoder (6 deformable layers)",
    "context_interaction": "context interaction",
    "decoder": "transformer decoder (10 layers)",
    "text_encoder": "text encoder",
    "ip_clip": "IP-CLIP (100 proposals)",
}
STAGES = {"processor": "image processor", **MODEL_STAGES, "model": "model forward (the stages above and the rest)", "post_processing": "post-processing"}
VARIANTS = {"float32": "float32 eager", "bfloat16": "bfloat16 eager", "compiled": "float32 compiled"}
RESULT_PREFIX = "RESULT "


class StageTimer:
    """Wall-clock time of each stage: started and stopped by the caller, and for the model's top-level modules by
    forward hooks (summed over a stage's calls in one forward) unless `model` is None (a compiled model would trace
    the hooks)."""

    def __init__(self, model, device: str):
        self.device = device
        self.seconds = defaultdict(float)
        self._started = {}
        for name in MODEL_STAGES if model is not None else ():
            module = getattr(model, name)
            module.register_forward_pre_hook(lambda module, args, name=name: self.start(name))
            module.register_forward_hook(lambda module, args, output, name=name: self.stop(name))

    def start(self, name: str) -> None:
        self._synchronize()
        self._started[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        self._synchronize()
        self.seconds[name] += time.perf_counter() - self._started.pop(name)

    def _synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def build_segmenter(variant: str, device: str, num_classes: int):
    """One cached-call function for `variant` with whichever maft `PYTHONPATH` gives, and its stage timer. Checkouts
    from before the text embeddings became an input (their model caches them itself) are driven through that cache."""
    from maft import MaftConfig, MaftImageProcessor, MaftModel, MaftProcessor
    from maft.data.clip_tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    config_kwargs = {"use_distillation_teacher": False} if "use_distillation_teacher" in MaftConfig().to_dict() else {}
    model = MaftModel(MaftConfig(**config_kwargs)).eval().to(device)
    if variant == "bfloat16":
        model.to(torch.bfloat16)
    timer = StageTimer(None if variant == "compiled" else model, device)
    forward = torch.compile(model) if variant == "compiled" else model
    processor = MaftProcessor(MaftImageProcessor(), load_clip_tokenizer())
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    class_tokens = {
        name: tokens.to(device)
        for name, tokens in processor.tokenize_class_names([f"category number {index}" for index in range(num_classes)]).items()
    }
    text_inputs = {}

    def segment() -> None:
        timer.start("processor")
        inputs = processor(images=image).to(device)
        timer.stop("processor")
        if not text_inputs:  # the first call encodes the vocabulary; later calls reuse it
            text_inputs.update(class_tokens if hasattr(model, "class_embedding_cache") else {"text_embeds": model.get_text_embeddings(**class_tokens)})
        timer.start("model")
        outputs = forward(**inputs, **text_inputs)
        timer.stop("model")
        timer.start("post_processing")
        processor.post_process_semantic_segmentation(outputs, target_sizes=[(IMAGE_SIZE, IMAGE_SIZE)])
        timer.stop("post_processing")

    return segment, timer


def timed_call(segment, timer) -> dict[str, float]:
    """Seconds per stage and in total of one call."""
    timer.seconds.clear()
    start = time.perf_counter()
    segment()
    return {"total": time.perf_counter() - start, **timer.seconds}


def run_worker(variant: str, device: str, threads: int, num_classes: int) -> None:
    """Serves one variant: the first call (vocabulary encoded, `torch.compile`) at start, then a cached call for every
    "call" line on stdin and the peak memory of one for "memory"; each answer is one line of JSON on stdout."""
    torch.set_num_threads(threads)
    # the kernels are compiled before the first call, so that it times the vocabulary's encoding, not a one-time build
    from maft.kernels.extension import load_extension

    load_extension(device)
    segment, timer = build_segmenter(variant, device, num_classes)

    def answer(content) -> None:
        print(RESULT_PREFIX + json.dumps(content), flush=True)

    with torch.inference_mode():
        answer({"first_call": timed_call(segment, timer), "threads": torch.get_num_threads(), "torch": torch.__version__})
        for command in sys.stdin:
            if command.strip() == "call":
                answer(timed_call(segment, timer))
            elif command.strip() == "memory":
                answer(peak_memory_mib(segment, device))
            else:
                raise ValueError(f"unknown command {command.strip()!r}: expected 'call' or 'memory'")


class Worker:
    """A variant's worker process, started with maft from `source` on its `PYTHONPATH`."""

    def __init__(self, name: str, variant: str, source: Path, arguments):
        self.name, self.variant, self.source = name, variant, source
        command = [
            sys.executable, __file__, "--worker", variant, "--device", arguments.device,
            "--threads", str(arguments.threads), "--classes", str(arguments.classes),
        ]
        environment = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": str(arguments.threads)}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environment)

    def receive(self):
        for line in self.process.stdout:
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX):])
        raise RuntimeError(f"the {self.name} worker (maft from {self.source}) stopped with exit code {self.process.wait()}")

    def ask(self, command: str):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def git_commit(source: Path) -> str:
    completed = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return completed.stdout.strip() or "unknown"


def parse_reference(text: str) -> tuple[str, Path]:
    name, separator, path = text.partition("=")
    if not separator or not name or not Path(path, "maft").is_dir():
        raise argparse.ArgumentTypeError(f"a reference is NAME=PATH with a maft checkout at PATH, got {text!r}")
    return name, Path(path).resolve()


def parse_variants(text: str) -> list[str]:
    variants = [variant for variant in text.split(",") if variant]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise argparse.ArgumentTypeError(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every worker")
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of cached calls (medians reported)")
    parser.add_argument("--variants", type=parse_variants, default=list(VARIANTS), help="of this checkout, comma-separated")
    parser.add_argument("--reference", type=parse_reference, action="append", default=[],
                        help="NAME=PATH: also time the float32 eager call of the maft checkout at PATH")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "inference.json")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        run_worker(arguments.worker, arguments.device, arguments.threads, arguments.classes)
        return
    from maft.utils.output_files import check_output_file, write_json

    check_output_file(arguments.output)
    plan = [(name, "float32", source) for name, source in arguments.reference]
    plan += [(f"this checkout, {VARIANTS[variant]}", variant, REPO_ROOT) for variant in arguments.variants]
    results, failures = {}, {}
    workers = []
    for name, variant, source in plan:  # one after the other, so that the first calls do not share the CPU
        print(f"starting {name} (maft from {source}) ...", flush=True)
        worker = Worker(name, variant, source, arguments)
        try:
            started = worker.receive()
        except RuntimeError as error:  # reported, and the other variants still measured
            print(error, file=sys.stderr, flush=True)
            failures[name] = str(error)
            continue
        workers.append(worker)
        results[name] = {"variant": variant, "source": str(source), "commit": git_commit(source), **started, "cached_calls": []}
    for round_index in range(arguments.repeats):
        order = workers[round_index % len(workers):] + workers[: round_index % len(workers)]
        for worker in order:
            results[worker.name]["cached_calls"].append(worker.ask("call"))
        print(f"round {round_index + 1}/{arguments.repeats}: "
              + ", ".join(f"{w.name} {results[w.name]['cached_calls'][-1]['total']:.2f} s" for w in workers), flush=True)
    for worker in workers:
        results[worker.name]["peak_memory_mib"] = worker.ask("memory")
        worker.close()
    for result in results.values():
        stages = {stage for call in result["cached_calls"] for stage in call}
        result["median"] = {stage: statistics.median(call.get(stage, 0.0) for call in result["cached_calls"]) for stage in stages}

    print_table(results, arguments)
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(arguments.output, {
        "workload": f"MaftConfig() with random weights, one {IMAGE_SIZE}x{IMAGE_SIZE} image, {arguments.classes} classes",
        "device": arguments.device, "threads": arguments.threads, "repeats": arguments.repeats,
        "load_average": os.getloadavg(), "variants": results, "failed_variants": failures,
    })
    print(f"written to {arguments.output}")
    if failures:
        sys.exit(f"variants that failed: {', '.join(failures)}")
    if any(call.get("text_encoder", 0.0) for result in results.values() for call in result["cached_calls"]):
        sys.exit("the text encoder ran although the vocabulary was cached")


def print_table(results: dict, arguments) -> None:
    names = list(results)
    reference = results[names[0]]["median"]["total"]
    print(f"\nMAFT ViT-B/16 + ResNet-101 (random weights), one {IMAGE_SIZE}x{IMAGE_SIZE} image, {arguments.classes} "
          f"classes, {arguments.device}, {arguments.threads} threads, torch {torch.__version__}; median of "
          f"{arguments.repeats} interleaved cached calls\n")
    print("| stage | " + " | ".join(f"{name} ({results[name]['commit']})" for name in names) + " |")
    print("|---|" + "---|" * len(names))
    for stage, label in STAGES.items():
        if any(results[name]["median"].get(stage, 0.0) for name in names):
            print(f"| {label} | " + " | ".join(
                f"{results[name]['median'][stage]:.3f} s" if stage in results[name]["median"] else "–" for name in names
            ) + " |")
    print("| **cached call** | " + " | ".join(f"**{results[name]['median']['total']:.3f} s**" for name in names) + " |")
    print(f"| vs {names[0]} | " + " | ".join(f"{results[name]['median']['total'] / reference:.2f}x" for name in names) + " |")
    print("| first call (vocabulary encoded, compiled) | " + " | ".join(f"{results[name]['first_call']['total']:.1f} s" for name in names) + " |")
    print("| peak memory of a cached call | " + " | ".join(f"{results[name]['peak_memory_mib']:.0f} MiB" for name in names) + " |")


if __name__ == "__main__":
    main()
