"""IP-CLIP speed and memory: our split attention vs a dense (Q+L)^2 mask vs running CLIP once per mask.

ViT-B/16-sized random weights, one 480x480 image, Q mask proposals. Times are medians over interleaved rounds; peak
memory is what one call allocates beyond the model and inputs (profiler allocation events on CPU, torch's peak
allocation on CUDA).

    python benchmarks/ipclip.py [--device cpu|cuda] [--proposals 10 50 100 200] [--repeats 7]

Prints a markdown table and writes benchmarks/results/ipclip.json.
"""

import argparse
import os
import sys
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from common import interleaved_median_seconds, peak_memory_mib  # noqa: E402

METHODS = {
    "ipclip": "IP-CLIP (ours: split attention)",
    "dense": "dense (Q+L)^2 attention mask",
    "per_mask": "CLIP per masked crop at 224",
}


# CLIP ViT-B/16's vision tower (MAFT's default IP-CLIP), for random weights of its size
VIT_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
               patch_size=16, projection_dim=512)


def build_model(device: str):
    from maft import MaftClipVisionConfig, MaftClipVisionModel

    torch.manual_seed(0)
    return MaftClipVisionModel(MaftClipVisionConfig(**VIT_B16)).eval().to(device)


def random_blob_masks(num_proposals: int, size: int = 120) -> torch.Tensor:
    """Probability masks of random discs, like sigmoid mask predictions (1, Q, size, size)."""
    generator = torch.Generator().manual_seed(num_proposals)
    centers = torch.rand(num_proposals, 2, generator=generator) * size
    radii = 8 + torch.rand(num_proposals, generator=generator) * size / 3
    coordinates = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), dim=-1).float()
    distances = (coordinates[None] - centers[:, None, None]).norm(dim=-1)
    return torch.sigmoid((radii[:, None, None] - distances) / 2)[None]


def proposal_embedders(model, pixel_values: torch.Tensor, masks: torch.Tensor) -> dict:
    from ipclip_reference import dense_mask_proposal_embeds, per_mask_image_embeds

    return {
        "ipclip": lambda: model(pixel_values, mask_proposals=masks, interpolate_pos_encoding=True).proposal_embeds,
        "dense": lambda: dense_mask_proposal_embeds(model, pixel_values, masks, interpolate=True),
        "per_mask": lambda: per_mask_image_embeds(model, pixel_values, masks),
    }


def measure_seconds(model, num_proposals: int, repeats: int, device: str) -> dict[str, float]:
    """Median time per call of each method, timed in interleaved rounds so that machine drift hits all alike."""
    runs = proposal_embedders(model, torch.randn(1, 3, 480, 480, device=device), random_blob_masks(num_proposals).to(device))
    with torch.inference_mode():
        for run in runs.values():
            run()  # warm-up
    # The per-mask baseline runs Q full CLIP passes: fewer timed calls are enough to rank it.
    repeats_of = {method: 1 if method == "per_mask" and num_proposals >= 100 else repeats for method in runs}
    return interleaved_median_seconds(runs, repeats_of, device)


def main() -> None:
    from maft.utils.output_files import write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--proposals", type=int, nargs="+", default=[10, 50, 100, 200])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "ipclip.json")
    arguments = parser.parse_args()

    model = build_model(arguments.device)
    rows = []
    for num_proposals in arguments.proposals:
        seconds = measure_seconds(model, num_proposals, arguments.repeats, arguments.device)
        inputs = torch.randn(1, 3, 480, 480, device=arguments.device), random_blob_masks(num_proposals).to(arguments.device)
        for method, run in proposal_embedders(model, *inputs).items():
            peak = peak_memory_mib(run, arguments.device)
            rows.append({"method": method, "num_proposals": num_proposals, "seconds": seconds[method], "peak_memory_mib": peak})
            print(f"  Q={num_proposals:<4} {METHODS[method]:<34} {seconds[method]:8.3f} s {peak:8.0f} MiB", file=sys.stderr, flush=True)

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
    summary = {"device": arguments.device, "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "torch": torch.__version__, "repeats": arguments.repeats, "rows": rows}
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(arguments.output, summary)
    print(f"\nwritten to {arguments.output}")


if __name__ == "__main__":
    main()
