"""Just-in-time build and loading of the compiled multi-scale deformable attention kernels (ninja, cached)."""

import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

import torch


logger = logging.getLogger("maft.kernels")

SOURCE_DIR = Path(__file__).with_name("csrc")
CPU_SOURCES = ("bindings.cpp", "ms_deform_attn_cpu.cpp")
CUDA_SOURCES = CPU_SOURCES + ("ms_deform_attn_cuda.cu",)

_loaded: dict[str, ModuleType] = {}
_failed: dict[str, "KernelBuildError"] = {}


class KernelBuildError(RuntimeError):
    """A compiled multi-scale deformable attention kernel could not be built or loaded; the message says why."""


def extension_name(device_type: str) -> str:
    """Name of the build for `device_type`: changes with the sources, torch's version and the CUDA version, so that
    an edited source or another torch rebuilds instead of loading a stale library."""
    digest = hashlib.sha256(f"{device_type}|{torch.__version__}|{torch.version.cuda}".encode())
    for path in sorted(SOURCE_DIR.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return f"maft_msda_{device_type}_{digest.hexdigest()[:12]}"


def load_extension(device_type: str) -> ModuleType:
    """
    The compiled kernel for "cpu" or "cuda", built on first use with `torch.utils.cpp_extension.load` (ninja) and
    cached under `TORCH_EXTENSIONS_DIR`, so that later processes only load it. Raises `KernelBuildError` with the
    compiler's message when it cannot be built.
    """
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"`device_type` must be 'cpu' or 'cuda', got {device_type!r}.")
    if device_type in _loaded:
        return _loaded[device_type]
    if device_type in _failed:
        raise _failed[device_type]
    try:
        _loaded[device_type] = _build(device_type)
    except KernelBuildError as error:
        _failed[device_type] = error
        raise
    return _loaded[device_type]


def _build(device_type: str) -> ModuleType:
    from torch.utils import cpp_extension

    if device_type == "cuda" and torch.version.cuda is None:
        raise KernelBuildError(
            f"torch {torch.__version__} is a CPU-only build, so the CUDA kernel cannot be built; install a CUDA build "
            "of torch, or use backend='cpu' or 'pytorch'."
        )
    if device_type == "cuda" and cpp_extension.CUDA_HOME is None:
        raise KernelBuildError("no CUDA toolkit found to build the CUDA kernel: install one and set CUDA_HOME.")
    name = extension_name(device_type)
    sources = [str(SOURCE_DIR / source) for source in (CUDA_SOURCES if device_type == "cuda" else CPU_SOURCES)]
    defines = ["-DWITH_CUDA"] if device_type == "cuda" else []
    build_directory = Path(cpp_extension._get_build_directory(name, verbose=False))
    if not (build_directory / f"{name}.so").exists():
        logger.warning(
            "maft: building the %s multi-scale deformable attention kernel (once, cached in %s)", device_type, build_directory
        )
    try:
        return cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=["-O3", "-fopenmp", *defines],
            extra_ldflags=["-fopenmp"],
            extra_cuda_cflags=["-O3", *defines],
            with_cuda=device_type == "cuda",
            verbose=os.environ.get("MAFT_KERNEL_BUILD_VERBOSE") == "1",
        )
    except (RuntimeError, OSError, ImportError, FileNotFoundError) as error:
        raise KernelBuildError(f"building the {device_type} kernel {name} failed: {error}") from error
