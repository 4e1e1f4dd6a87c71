"""Throughput of `maft segment` on a folder of images with the bundled model (maft-mini): the one-image-at-a-time loop
that `maft segment` ran before collections (read, segment, write, in one process; PNGs compressed at level 6 as then,
and at today's level 1), beside `maft segment` with batch
1 or 4, 0 or 2 DataLoader workers, one or two processes (`accelerate launch`, on the CPU), float32 or `--dtype auto`;
and the cached call (processor, model with the vocabulary encoded once, post-processing) in float32 and bfloat16,
with the CPU's model name and the flags that decide what `--dtype auto` chooses.

The folder holds `--images` JPEG photos (the bundled scenes, enlarged to 480x360 to 640x480, as photos are larger
than the model's input), so reading, resizing and writing weigh as they do on real collections. Throughput is that of
the segmenting loop (images/s, from `maft segment`'s summary), without loading the model.

    python benchmarks/segment_collection.py [--images 64] [--threads 2] [--calls 10]

Prints a markdown table and writes benchmarks/results/segment_collection.json.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import cpu_model_name, interleaved_median_seconds


REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "segment_collection.json"
# (label, batch size, DataLoader workers, processes, dtype)
VARIANTS = [
    ("maft segment, batch 1, 0 workers", 1, 0, 1, "float32"),
    ("maft segment, batch 4, 0 workers", 4, 0, 1, "float32"),
    ("maft segment, batch 1, 2 workers", 1, 2, 1, "float32"),
    ("maft segment, batch 4, 2 workers", 4, 2, 1, "float32"),
    ("maft segment, 2 processes, batch 4, 0 workers", 4, 0, 2, "float32"),
    ("maft segment, 2 processes, batch 4, 1 worker each", 4, 1, 2, "float32"),
    ("maft segment, batch 4, 2 workers, --dtype auto", 4, 2, 1, "auto"),
]


def make_photos(folder: Path, count: int) -> list[Path]:
    """`count` JPEG photos made from the bundled scenes, enlarged to sizes from 480x360 to 640x480."""
    from maft.cli.model_loading import default_model_path

    scenes = sorted((default_model_path().parent / "examples").glob("scene-*[0-9].png"))
    paths = []
    for index in range(count):
        width = 480 + (index * 37) % 161
        height = width * 3 // 4
        image = Image.open(scenes[index % len(scenes)]).convert("RGB").resize((width, height), Image.BILINEAR)
        path = folder / f"photo-{index:03d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def class_names() -> list[str]:
    from maft.cli.model_loading import default_model_path

    return json.loads((default_model_path().parent / "examples" / "classes.json").read_text())["class_names"]


def one_at_a_time(paths: list[Path], output: Path, threads: int, png_compress_level: int) -> float:
    """Images/s of the loop `maft segment` ran before collections: each image read, segmented and written in turn, its
    PNGs compressed at `png_compress_level` (before collections: PIL's default, 6)."""
    from maft.cli.model_loading import load_model_and_processor
    from maft.inference import encode_vocabulary, segment_image
    from maft.processing_maft import to_rgb_array
    from maft.utils import output_files
    from maft.utils.output_files import distinct_output_names, write_segmentation_files

    torch.set_num_threads(threads)
    names = class_names()
    model, processor = load_model_and_processor(None, "cpu", "float32")
    text_embeds = encode_vocabulary(model, processor, names)
    output.mkdir(parents=True)
    compress_level, output_files.PNG_COMPRESS_LEVEL = output_files.PNG_COMPRESS_LEVEL, png_compress_level
    try:
        started = time.perf_counter()
        for path, name in zip(paths, distinct_output_names(paths)):
            image = to_rgb_array(path)
            label_map = segment_image(model, processor, image, text_embeds)
            write_segmentation_files(output, name, image, label_map, names, source=str(path))
        return len(paths) / (time.perf_counter() - started)
    finally:
        output_files.PNG_COMPRESS_LEVEL = compress_level


def run_segment(folder: Path, output: Path, batch_size: int, workers: int, processes: int, dtype: str, threads: int) -> tuple[float, str]:
    """(images/s, maft segment's closing lines) of one run of `maft segment` on `folder`."""
    arguments = ["-m", "maft", "segment", str(folder), "--labels", ", ".join(class_names()), "--output", str(output),
                 "--batch-size", str(batch_size), "--num-workers", str(workers), "--dtype", dtype]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        command = [sys.executable, *arguments]
        environment["OMP_NUM_THREADS"] = str(threads)
    else:
        accelerate = Path(sys.executable).with_name("accelerate")
        command = [str(accelerate), "launch", "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "--num_processes", str(processes), "--main_process_port", "0", *arguments]
        environment.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=str(max(1, threads // processes)))
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    match = re.search(r"segmented (\d+) of (\d+) images .* ([0-9.]+) images/s", result.stdout)
    choice = re.search(r"dtype auto: (\w+)", result.stdout)
    return float(match[3]), choice[1] if choice else dtype


def cached_call_seconds(threads: int, calls: int) -> dict[str, float]:
    """Median seconds of the cached call on a bundled scene, float32 and bfloat16, calls interleaved."""
    from maft.cli.model_loading import default_model_path, load_model_and_processor
    from maft.inference import encode_vocabulary, segment_image

    torch.set_num_threads(threads)
    image = np.asarray(Image.open(default_model_path().parent / "examples" / "scene-0.png").convert("RGB"))
    runs = {}
    for dtype in ("float32", "bfloat16"):
        model, processor = load_model_and_processor(None, "cpu", dtype)
        runs[dtype] = partial(segment_image, model, processor, image, encode_vocabulary(model, processor, class_names()))
        runs[dtype]()  # warm-up
    return interleaved_median_seconds(runs, dict.fromkeys(runs, calls), "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of a one-process run (split between processes)")
    parser.add_argument("--calls", type=int, default=10, help="cached calls per precision")
    arguments = parser.parse_args()

    from maft.cli.model_loading import count_parameters
    from maft.utils.precision import NATIVE_BFLOAT16_CPU_FLAGS, choose_dtype, cpu_flags
    from maft.utils.output_files import write_json

    flags = cpu_flags()
    shown_flags = [flag for flag in ("avx2", "avx512f", "avx512_vnni", *NATIVE_BFLOAT16_CPU_FLAGS, "amx_tile") if flag in flags]
    machine = {"cpu": cpu_model_name(), "flags": shown_flags, "cores": os.cpu_count(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d", time.gmtime()), "load_average": os.getloadavg()[0],
               "auto_dtype_large_model": choose_dtype("cpu").name,
               "auto_dtype_bundled_model": choose_dtype("cpu", count_parameters()).name}
    rows = []
    with tempfile.TemporaryDirectory() as workspace:
        workspace = Path(workspace)
        (workspace / "photos").mkdir()
        paths = make_photos(workspace / "photos", arguments.images)
        baseline = one_at_a_time(paths, workspace / "loop", arguments.threads, png_compress_level=6)
        rows.append({"variant": "before: one image at a time, one process, PNG level 6", "images_per_second": baseline,
                     "dtype": "float32"})
        rate = one_at_a_time(paths, workspace / "loop-level-1", arguments.threads, png_compress_level=1)
        rows.append({"variant": "one image at a time, one process, PNG level 1", "images_per_second": rate, "dtype": "float32"})
        for index, (label, batch_size, workers, processes, dtype) in enumerate(VARIANTS):
            rate, chosen = run_segment(workspace / "photos", workspace / f"run-{index}", batch_size, workers, processes, dtype, arguments.threads)
            rows.append({"variant": label, "images_per_second": rate, "dtype": chosen})
    for row in rows:
        row["speedup"] = row["images_per_second"] / baseline
    cached = cached_call_seconds(arguments.threads, arguments.calls)

    print(f"CPU: {machine['cpu']}, {machine['cores']} cores; flags: {', '.join(shown_flags)}; torch {machine['torch']}; "
          f"{machine['date']}; load average {machine['load_average']:.1f}; --dtype auto chooses "
          f"{machine['auto_dtype_bundled_model']} for the bundled model, {machine['auto_dtype_large_model']} for large ones")
    print(f"\n{arguments.images} photos (480x360 to 640x480 JPEG), bundled model, {arguments.threads} threads in all\n")
    print("| variant | dtype | images/s | vs before |\n|---|---|---:|---:|")
    for row in rows:
        print(f"| {row['variant']} | {row['dtype']} | {row['images_per_second']:.2f} | {row['speedup']:.2f}x |")
    print("\n| cached call (bundled scene, 96x96) | seconds | vs float32 |\n|---|---:|---:|")
    for dtype, seconds in cached.items():
        print(f"| {dtype} | {seconds:.4f} | {cached['float32'] / seconds:.2f}x |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS, {"machine": machine, "images": arguments.images, "threads": arguments.threads, "throughput": rows,
                         "cached_call_seconds": cached})
    print(f"\nwrote {RESULTS.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
