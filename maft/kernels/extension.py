"""Just-in-time build and loading of the compiled multi-scale deformable attention kernels (ninja, cached)."""

import contextlib
import hashlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import filelock
import torch


logger = logging.getLogger("maft.kernels")

SOURCE_DIR = Path(__file__).with_name("csrc")
CPU_SOURCES = ("bindings.cpp", "ms_deform_attn_cpu.cpp")
CUDA_SOURCES = CPU_SOURCES + ("ms_deform_attn_cuda.cu",)
HEADERS = ("ms_deform_attn.h", "ms_deform_attn_cuda.h", "ms_deform_attn_sample.h")
BUILD_LOCK_NAME = "maft_build.lock"

_loaded: dict[str, ModuleType] = {}
_failed: dict[str, "KernelBuildError"] = {}
_load_lock = threading.Lock()


class KernelBuildError(RuntimeError):
    """A compiled multi-scale deformable attention kernel could not be built or loaded; the message says why."""


def _read_sources() -> list[tuple[str, bytes]]:
    """Name and content of every kernel source and header; `KernelBuildError` naming what is missing or unreadable."""
    contents, problems = [], []
    for name in sorted(CUDA_SOURCES + HEADERS):
        try:
            contents.append((name, (SOURCE_DIR / name).read_bytes()))
        except OSError as error:
            problems.append(f"{name} ({error.strerror or error})")
    if problems:
        raise KernelBuildError(
            f"the kernel sources in {SOURCE_DIR} are missing or unreadable: {', '.join(problems)}; reinstall maft, or "
            "use backend='pytorch'"
        )
    return contents


def extension_name(device_type: str) -> str:
    """Name of the build for `device_type`: changes with the sources, torch's and CUDA's versions and the Python
    environment (`sys.prefix`), so that an edited source or another torch rebuilds instead of loading a stale library,
    and two virtual environments sharing `TORCH_EXTENSIONS_DIR` keep one build each instead of rebuilding in turn."""
    digest = hashlib.sha256(f"{device_type}|{torch.__version__}|{torch.version.cuda}|{sys.prefix}|{sys.version}".encode())
    for name, content in _read_sources():
        digest.update(name.encode() + content)
    return f"maft_msda_{device_type}_{digest.hexdigest()[:12]}"


def load_extension(device_type: str) -> ModuleType:
    """
    The compiled kernel for "cpu" or "cuda", built on first use with `torch.utils.cpp_extension.load` (ninja) and
    cached under `TORCH_EXTENSIONS_DIR`, so that later processes only load it; once the CUDA kernel is loaded it serves
    "cpu" too. Processes starting at once build it once: the others wait for the build's file lock. Raises
    `KernelBuildError` with the reason (missing sources, no compiler, the compiler's message) when it cannot be built.
    """
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"`device_type` must be 'cpu' or 'cuda', got {device_type!r}.")
    with _load_lock:
        if device_type in _loaded:
            return _loaded[device_type]
        if device_type == "cpu" and "cuda" in _loaded:  # the CUDA build holds the CPU kernel too: no second build
            return _loaded["cuda"]
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
    try:
        build_directory = Path(cpp_extension._get_build_directory(name, verbose=False))
        with _exclusive_build_directory(build_directory):
            if not (build_directory / f"{name}.so").exists():
                logger.warning(
                    "maft: building the %s multi-scale deformable attention kernel (once, cached in %s)",
                    device_type, build_directory,
                )
            return cpp_extension.load(
                name=name,
                sources=sources,
                extra_cflags=["-O3", "-fopenmp", *defines],
                extra_ldflags=["-fopenmp"],
                extra_cuda_cflags=["-O3", *defines],
                build_directory=str(build_directory),
                with_cuda=device_type == "cuda",
                verbose=os.environ.get("MAFT_KERNEL_BUILD_VERBOSE") == "1",
            )
    except Exception as error:  # torch's builder fails in many ways (e.g. IndexError without a GPU or an arch list)
        raise KernelBuildError(f"building the {device_type} kernel {name} failed: {type(error).__name__}: {error}") from error


@contextlib.contextmanager
def _exclusive_build_directory(build_directory: Path) -> Iterator[None]:
    """Holds an OS file lock on `build_directory` (released by the OS if the holder dies), so that one process builds
    while the others wait and then load. Under it, a `lock` file left by torch's own build baton is stale (a build
    that was killed) and is removed: torch would otherwise wait for it forever."""
    lock = filelock.FileLock(build_directory / BUILD_LOCK_NAME)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        logger.warning("maft: waiting for another process to finish building the kernel in %s", build_directory)
        lock.acquire()
    try:
        (build_directory / "lock").unlink(missing_ok=True)
        yield
    finally:
        lock.release()
