"""Wall time of `maft reproduce-mini` from an empty folder, step by step, against its target of 30 minutes on 2 CPU
cores, with the results it reaches (a rerun with the same seed must give the bundled model's numbers).

    python benchmarks/reproduce_mini.py [--seed 0] [--output-dir DIR]

Prints a markdown table and writes benchmarks/results/reproduce_mini.json.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_MINUTES = 30


def main() -> None:
    from maft.miniature.reproduce import BASELINE, MAFT, MiniatureRecipe, reproduce_miniature

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, help="keep the run here (default: a temporary folder)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "reproduce_mini.json")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        run_dir = arguments.output_dir or Path(temporary)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise SystemExit(f"{run_dir} is not empty: the benchmark times a run from an empty folder")
        start = time.perf_counter()
        results = reproduce_miniature(run_dir, MiniatureRecipe(seed=arguments.seed))
        total = time.perf_counter() - start
        seconds = json.loads((run_dir / "results.json").read_text())["seconds"]

    print(f"\nmaft reproduce-mini --seed {arguments.seed}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| step | time |")
    print("|---|---|")
    for step, value in seconds.items():
        print(f"| {step} | {value / 60:.1f} min |")
    print(f"| **total** (target {TARGET_MINUTES} min) | **{total / 60:.1f} min** |")
    print(f"\nunseen mIoU: frozen CLIP {results[BASELINE]['mIoU-unseen']:.1f}, MAFT {results[MAFT]['mIoU-unseen']:.1f}")
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps({
        "seed": arguments.seed, "threads": torch.get_num_threads(), "torch": torch.__version__, "total_seconds": total,
        "target_seconds": TARGET_MINUTES * 60, "step_seconds": seconds,
        "results": {name: {key: result[key] for key in ("mIoU-seen", "mIoU-unseen", "hIoU", "mIoU")} for name, result in results.items()},
    }, indent=2))
    print(f"written to {arguments.output}")


if __name__ == "__main__":
    main()
