"""Measurements shared by the benchmarks."""

import contextlib
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def cpu_model_name() -> str:
    """The processor's model name as `lscpu` gives it (from /proc/cpuinfo), else the platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_median_seconds(runs: dict[str, Callable[[], object]], repeats_of: dict[str, int], device: str) -> dict[str, float]:
    """Median seconds per call of each of `runs`, `repeats_of[name]` calls each, timed in interleaved rounds (round r
    calls every run with more than r repeats) so that machine drift hits all alike; in inference mode."""
    seconds = {name: [] for name in runs}
    with torch.inference_mode():
        for round_index in range(max(repeats_of.values())):
            for name, run in runs.items():
                if round_index < repeats_of[name]:
                    synchronize(device)
                    start = time.perf_counter()
                    run()
                    synchronize(device)
                    seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def peak_memory_mib(run, device: str, inference: bool = True) -> float:
    """Peak memory (MiB) that one call of `run` allocates on top of what it starts with: torch's peak allocation on
    CUDA; on CPU the maximum of the running sum of the allocations and frees that the profiler records. `run` is
    called in inference mode unless `inference=False` (for a backward pass)."""
    with torch.inference_mode() if inference else contextlib.nullcontext():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            allocated_before = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - allocated_before) / 2**20
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
            run()
    events = sorted(
        (event.start_ns(), event.nbytes()) for event in profile.profiler.kineto_results.events() if event.name() == "[memory]"
    )
    allocated = peak = 0
    for _, nbytes in events:
        allocated += nbytes
        peak = max(peak, allocated)
    return peak / 2**20
