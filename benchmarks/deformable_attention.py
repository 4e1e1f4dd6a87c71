"""Multi-scale deformable attention on the pixel-decoder workload of a 640x640 input: levels 80x80, 40x40, 20x20,
8 heads x 32 channels, 4 points, every position a query. Forward and forward+backward time and peak memory of the
compiled kernel (CPU here; CUDA where present), our PyTorch reference and transformers' function, and the achieved
memory bandwidth against the machine's copy bandwidth.

    python benchmarks/deformable_attention.py [--device cpu|cuda] [--batch-sizes 1 2] [--repeats 5]

Prints a markdown table and writes benchmarks/results/deformable_attention.json.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention as transformers_msda

from common import peak_memory_mib


REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((80, 80), (40, 40), (20, 20))
HEADS, CHANNELS, POINTS = 8, 32, 4


def workload(batch_size: int, device: str):
    generator = torch.Generator().manual_seed(0)
    spatial_shapes = torch.tensor(SHAPES)
    sizes = spatial_shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    positions = int(sizes.sum())
    value = torch.randn(batch_size, positions, HEADS, CHANNELS, generator=generator)
    locations = torch.rand(batch_size, positions, HEADS, len(SHAPES), POINTS, 2, generator=generator)
    weights = torch.rand(batch_size, positions, HEADS, len(SHAPES), POINTS, generator=generator).softmax(-1)
    tensors = [tensor.to(device).requires_grad_() for tensor in (value, locations, weights)]
    return tensors, spatial_shapes.to(device), starts.to(device)


def implementations(device: str):
    from maft.deformable_attention import multi_scale_deformable_attention, multi_scale_deformable_attention_pytorch

    shapes_list = list(SHAPES)
    return {
        f"maft {device} kernel": lambda v, s, i, l, w: multi_scale_deformable_attention(v, s, i, l, w, backend=device),
        "maft PyTorch reference": lambda v, s, i, l, w: multi_scale_deformable_attention_pytorch(v, s, l, w),
        "transformers' function": lambda v, s, i, l, w: transformers_msda(v, shapes_list, l, w),
    }


def timed(run, repeats: int, device: str) -> float:
    run()
    seconds = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def copy_bandwidth_gb_per_s(device: str) -> float:
    """Read + write bandwidth of cloning a 256 MiB tensor."""
    tensor = torch.empty(64 * 2**20, device=device)
    seconds = timed(lambda: tensor.clone(), 5, device)
    return 2 * tensor.numel() * tensor.element_size() / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "deformable_attention.json")
    arguments = parser.parse_args()

    bandwidth = copy_bandwidth_gb_per_s(arguments.device)
    rows = []
    for batch_size in arguments.batch_sizes:
        tensors, spatial_shapes, starts = workload(batch_size, arguments.device)
        # Bytes the operation must move at least: read value, locations, weights; write the output.
        minimum_bytes = sum(tensor.numel() for tensor in tensors) * 4 + tensors[1].shape[1] * batch_size * HEADS * CHANNELS * 4
        for name, attention in implementations(arguments.device).items():
            def forward():
                with torch.no_grad():
                    return attention(tensors[0], spatial_shapes, starts, tensors[1], tensors[2])

            def forward_backward():
                output = attention(tensors[0], spatial_shapes, starts, tensors[1], tensors[2])
                output.backward(torch.ones_like(output))

            forward_seconds = timed(forward, arguments.repeats, arguments.device)
            rows.append({
                "implementation": name,
                "batch_size": batch_size,
                "forward_s": forward_seconds,
                "forward_backward_s": timed(forward_backward, arguments.repeats, arguments.device),
                "forward_peak_mib": peak_memory_mib(forward, arguments.device),
                "forward_backward_peak_mib": peak_memory_mib(forward_backward, arguments.device, inference=False),
                "forward_bandwidth_gb_per_s": minimum_bytes / forward_seconds / 1e9,
            })

    print(f"\nMulti-scale deformable attention, levels {SHAPES}, {HEADS} heads x {CHANNELS} channels, {POINTS} points, "
          f"every position a query; {arguments.device}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"copy bandwidth {bandwidth:.1f} GB/s\n")
    print("| batch | implementation | forward s | fwd+bwd s | fwd peak MiB | fwd+bwd peak MiB | fwd GB/s (min. traffic) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['batch_size']} | {row['implementation']} | {row['forward_s']:.3f} | {row['forward_backward_s']:.3f} | "
              f"{row['forward_peak_mib']:.0f} | {row['forward_backward_peak_mib']:.0f} | {row['forward_bandwidth_gb_per_s']:.2f} |")
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps({"device": arguments.device, "copy_bandwidth_gb_per_s": bandwidth, "rows": rows}, indent=2))
    print(f"\nwritten to {arguments.output}")


if __name__ == "__main__":
    main()
