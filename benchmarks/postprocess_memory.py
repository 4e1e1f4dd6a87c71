"""Peak memory of segmenting one image end to end with the bundled model (read the file, process, run the model,
post-process to the image's size): an 8000x8000 image with the bundled vocabulary, and a 640x480 image with 1000
classes. Each case runs in a fresh process; its peak resident memory while segmenting is reported, with the part above
what the process held before (imports, the model, one warm-up call).

    python benchmarks/postprocess_memory.py [--compare-with OLD_PACKAGE_DIR]

`--compare-with` runs the same cases with another copy of the package first on the path (e.g. an earlier commit:
`git archive <commit> maft | tar -x -C /tmp/old`), side by side. Prints a markdown table and writes
benchmarks/results/postprocess_memory.json.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "postprocess_memory.json"
CASES = {
    "8000x8000, bundled vocabulary": {"width": 8000, "height": 8000, "num_classes": None, "target_gib": 1.5},
    "640x480, 1000 classes": {"width": 640, "height": 480, "num_classes": 1000, "target_gib": 0.8},
}


def resident_mib(field: str) -> float:
    """This process's resident memory, now ("VmRSS") or at its peak ("VmHWM"), from Linux's /proc (ru_maxrss would
    include the parent's peak, which survives fork and exec)."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def measure(case: str, image_path: str) -> dict:
    """One case in this process: the peak after loading the model, then after segmenting the image."""
    import torch

    from maft import MaftModel, MaftProcessor
    from maft.cli.model_loading import default_model_path

    torch.set_grad_enabled(False)
    folder = default_model_path()
    model, processor = MaftModel.from_pretrained(folder).eval(), MaftProcessor.from_pretrained(folder)
    num_classes = CASES[case]["num_classes"]
    if num_classes is None:
        class_names = json.loads((folder.parent / "examples" / "classes.json").read_text())["class_names"]
    else:
        class_names = [f"thing number {index}" for index in range(num_classes)]
    model(**processor(images=Image.new("RGB", (32, 32)), text=class_names[:1]))  # builds or loads the kernels first
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the memory held now
    loaded_mib = resident_mib("VmRSS")
    started = time.perf_counter()
    inputs = processor(images=image_path, text=class_names)
    outputs = model(**inputs)
    label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[(CASES[case]["height"], CASES[case]["width"])])[0]
    seconds = time.perf_counter() - started
    return {
        "num_classes": len(class_names),
        "label_map_shape": list(label_map.shape),
        "peak_mib": round(resident_mib("VmHWM"), 1),
        "peak_above_loaded_model_mib": round(resident_mib("VmHWM") - loaded_mib, 1),
        "seconds": round(seconds, 2),
    }


def run_case(case: str, image_path: Path, package_dir: Path) -> dict:
    """`measure` in a fresh interpreter with `package_dir` first on the path."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_dir), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, __file__, "--worker", case, str(image_path)]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{case} with {package_dir} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def write_test_image(folder: Path, width: int, height: int) -> Path:
    """A smooth colour image (quick to write as PNG, unlike noise)."""
    rows = np.linspace(0, 255, height).astype(np.uint8)[:, None]
    columns = np.linspace(0, 255, width).astype(np.uint8)[None, :]
    image = np.stack(np.broadcast_arrays(rows, columns, rows // 2 + columns // 2), axis=-1)
    path = folder / f"image-{width}x{height}.png"
    Image.fromarray(image).save(path, compress_level=1)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare-with", type=Path, help="another copy of the package to measure first, e.g. an earlier commit")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "IMAGE"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        print(json.dumps(measure(*arguments.worker)))
        return

    versions = {"this package": REPO_ROOT}
    if arguments.compare_with:
        versions = {f"{arguments.compare_with}": arguments.compare_with, **versions}
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for case, spec in CASES.items():
            image_path = write_test_image(Path(folder), spec["width"], spec["height"])
            for version, package_dir in versions.items():
                results.append({"case": case, "version": version, "target_gib": spec["target_gib"], **run_case(case, image_path, package_dir)})

    print("| case | package | classes | peak (GiB) | above loaded model (GiB) | target (GiB) | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        print(
            f"| {row['case']} | {row['version']} | {row['num_classes']} | {row['peak_mib'] / 1024:.2f} | "
            f"{row['peak_above_loaded_model_mib'] / 1024:.2f} | {row['target_gib']} | {row['seconds']} |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    temporary = RESULTS.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({"results": results}, indent=2) + "\n")
    os.replace(temporary, RESULTS)


if __name__ == "__main__":
    main()
