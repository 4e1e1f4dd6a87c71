"""IP-CLIP speed and memory: our split attention vs a dense (Q+L)^2 mask vs running CLIP once per mask.

ViT-B/16-sized random weights, one 480x480 image, Q mask proposals. Each (method, Q) runs in its own process so
that its peak memory can be read from the operating system (CPU) or from torch (CUDA).

    python benchmarks/ipclip.py [--device cpu|cuda] [--proposals 10 50 100 200] [--repeats 3]

Prints a markdown table and writes benchmarks/results/ipclip.json.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

METHODS = {
    "ipclip": "IP-CLIP (ours: split attention)",
    "dense": "dense (Q+L)^2 attention mask",
    "per_mask": "CLIP per masked crop at 224",
}


def build_model(device: str):
    from maft import MaftClipVisionConfig, MaftClipVisionModel

    config = MaftClipVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
        projection_dim=512,
    )
    torch.manual_seed(0)
    return MaftClipVisionModel(config).eval().to(device)


def random_blob_masks(num_proposals: int, size: int = 120) -> torch.Tensor:
    """Probability masks of random discs, like sigmoid mask predictions (1, Q, size, size)."""
    generator = torch.Generator().manual_seed(num_proposals)
    centers = torch.rand(num_proposals, 2, generator=generator) * size
    radii = 8 + torch.rand(num_proposals, generator=generator) * size / 3
    coordinates = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), dim=-1).float()
    distances = (coordinates[None] - centers[:, None, None]).norm(dim=-1)
    return torch.sigmoid((radii[:, None, None] - distances) / 2)[None]


def run_worker(method: str, num_proposals: int, repeats: int, device: str) -> dict:
    from ipclip_reference import dense_mask_proposal_embeds, per_mask_image_embeds

    model = build_model(device)
    pixel_values = torch.randn(1, 3, 480, 480, device=device)
    masks = random_blob_masks(num_proposals).to(device)
    run = {
        "ipclip": lambda: model(pixel_values, mask_proposals=masks, interpolate_pos_encoding=True).proposal_embeds,
        "dense": lambda: dense_mask_proposal_embeds(model, pixel_values, masks, interpolate=True),
        "per_mask": lambda: per_mask_image_embeds(model, pixel_values, masks),
    }[method]

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        # The first call, in a fresh process, measures peak memory: the growth of the peak resident set (CPU) or of
        # torch's peak allocation (CUDA) over what the model and inputs already hold. It doubles as the warm-up.
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            allocated_before = torch.cuda.memory_allocated()
        rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        synchronize()
        if device == "cuda":
            peak_mib = (torch.cuda.max_memory_allocated() - allocated_before) / 2**20
        else:
            peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) / 1024
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            synchronize()
            seconds.append(time.perf_counter() - start)
    return {
        "method": method,
        "num_proposals": num_proposals,
        "seconds": statistics.median(seconds),
        "repeats": repeats,
        "peak_memory_mib": peak_mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--proposals", type=int, nargs="+", default=[10, 50, 100, 200])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median reported)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "ipclip.json")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "Q"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        method, num_proposals = arguments.worker
        print(json.dumps(run_worker(method, int(num_proposals), arguments.repeats, arguments.device)))
        return

    rows = []
    for num_proposals in arguments.proposals:
        for method in METHODS:
            # The per-mask baseline runs Q full CLIP passes: one timed call is enough to rank it.
            repeats = 1 if method == "per_mask" and num_proposals >= 100 else arguments.repeats
            command = [sys.executable, __file__, "--device", arguments.device, "--repeats", str(repeats), "--worker", method, str(num_proposals)]
            row = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  Q={num_proposals:<4} {METHODS[method]:<34} {row['seconds']:8.3f} s", file=sys.stderr, flush=True)

    by_key = {(row["method"], row["num_proposals"]): row for row in rows}
    print(f"\nIP-CLIP, ViT-B/16 random weights, 480x480, {arguments.device}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| Q | IP-CLIP s | dense s | per-mask s | IP-CLIP MiB | dense MiB | per-mask MiB | vs dense | vs per-mask |")
    print("|---|---|---|---|---|---|---|---|---|")
    for num_proposals in arguments.proposals:
        ours, dense, per_mask = (by_key[(method, num_proposals)] for method in METHODS)
        memory_cells = " | ".join(f"{row['peak_memory_mib']:.0f}" for row in (ours, dense, per_mask))
        print(
            f"| {num_proposals} | {ours['seconds']:.3f} | {dense['seconds']:.3f} | {per_mask['seconds']:.2f} | {memory_cells} "
            f"| {dense['seconds'] / ours['seconds']:.2f}x | {per_mask['seconds'] / ours['seconds']:.1f}x |"
        )
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps({"device": arguments.device, "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"\nwritten to {arguments.output}")


if __name__ == "__main__":
    main()
