"""The fastest precision a device computes natively, for the command line's and the demo's `--dtype auto`.

bfloat16 halves the memory traffic of every matrix product, and is about twice as fast as float32 where the hardware
multiplies bfloat16 itself: CPUs with AVX512-BF16 or AMX, and GPUs that report bfloat16 support (Ampere and later).
On other CPUs (AVX2 only) PyTorch converts to float32 inside every product and bfloat16 can be slower than float32,
so there `auto` keeps float32. Small models (below `SMALL_MODEL_PARAMETERS`) are dominated by the fixed cost of each
operation, which bfloat16's conversions raise: the bundled 1.4M-parameter model runs 0.75x as fast in bfloat16 on an
AMX CPU, the default 640-pixel configuration 1.7x as fast (benchmarks/segment_collection.py, benchmarks/inference.py);
on CPUs `auto` keeps them in float32. The Python API does not guess: models load in float32 unless given a `dtype`."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import torch

CPUINFO = Path("/proc/cpuinfo")
# /proc/cpuinfo flags of the instructions that compute bfloat16 dot products natively
NATIVE_BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# below this many parameters, bfloat16 is slower than float32 on a CPU even with native bfloat16 (measured between the
# bundled model, 1.4M, and the default configuration)
SMALL_MODEL_PARAMETERS = 20_000_000


@dataclass(frozen=True)
class DtypeChoice:
    """The precision `auto` chose (`name`: "bfloat16" or "float32") and why, in words."""

    name: str
    reason: str


def cpu_flags(cpuinfo: str | os.PathLike | None = None) -> set[str]:
    """The feature flags of the CPU as `cpuinfo` (default: /proc/cpuinfo) lists them (its first `flags` line); empty
    where there is no such file (not Linux)."""
    try:
        text = Path(cpuinfo or CPUINFO).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def choose_dtype(device: "str | torch.device", parameters: int | None = None,
                 cpuinfo: str | os.PathLike | None = None) -> DtypeChoice:
    """bfloat16 where `device` computes it natively (a CPU with one of `NATIVE_BFLOAT16_CPU_FLAGS`, a CUDA GPU for
    which `torch.cuda.is_bf16_supported()`), else float32 (also on devices whose bfloat16 speed is not known here); on
    a CPU, float32 too for a model of fewer than `SMALL_MODEL_PARAMETERS` `parameters` (None: not known, not small)."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        native = sorted(set(NATIVE_BFLOAT16_CPU_FLAGS) & cpu_flags(cpuinfo))
        if not native:
            return DtypeChoice("float32", f"the CPU has no native bfloat16 ({' or '.join(NATIVE_BFLOAT16_CPU_FLAGS)})")
        if parameters is not None and parameters < SMALL_MODEL_PARAMETERS:
            return DtypeChoice("float32", f"the model is small ({parameters / 1e6:.1f}M parameters), and small models run "
                                          f"slower in bfloat16 even where the CPU computes it natively ({', '.join(native)})")
        return DtypeChoice("bfloat16", f"the CPU computes bfloat16 natively ({', '.join(native)})")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return DtypeChoice("bfloat16", f"{name} computes bfloat16 natively")
        return DtypeChoice("float32", f"{name} has no native bfloat16")
    return DtypeChoice("float32", f"bfloat16 speed on {device.type} is not known to maft")


__all__ = ["SMALL_MODEL_PARAMETERS", "DtypeChoice", "choose_dtype", "cpu_flags"]
