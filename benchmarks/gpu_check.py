"""One prepared check of the CUDA path, for the rare minutes on a GPU (issue 16). In one command it:

1. builds the CUDA kernel (build seconds) and runs the `cuda`-marked tests (`pytest -m cuda`);
2. checks the CUDA kernel against the PyTorch reference and the CPU kernel, forward and all gradients, in each dtype
   (float32 accumulation), on the pixel decoder's workload and odd shapes (one level, one query, non-contiguous
   inputs, batch 8), and runs `gradcheck` in float64 on a small case;
3. times forward and forward+backward of the kernel, the PyTorch reference and transformers' function;
4. runs two stage-2 training steps and one stage-1 step in bfloat16 mixed precision;
5. times the full model (default MaftConfig, random weights, 150 classes, vocabulary cached) in each dtype, eager and
   compiled (images/s, peak memory), and IP-CLIP with Q mask proposals against a plain CLIP forward;
6. times naming Q given masks end to end (benchmarks/mask_naming.py): IP-CLIP in one pass against CLIP per masked crop;
7. times `maft segment`'s collection loop (DataLoader workers, outputs written) on a folder of random images: float32
   eager one image at a time against bfloat16 at batch 8, eager and compiled (images/s).

    python benchmarks/gpu_check.py                  # on a CUDA machine; planned for under 6 minutes on one H100
    python benchmarks/gpu_check.py --device cpu ... # the same steps with the CPU kernel: checks the script itself

Writes $OUT/gpu_check.json (else benchmarks/results/gpu_check.json) after every step, so an interrupted run keeps
what it measured, and prints a table. Exits 1 if a check fails or a step raises; without a GPU (and without
--device cpu) it exits 1 with one line saying so.
"""

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention as transformers_msda

from common import peak_memory_mib, synchronize
from deformable_attention import CHANNELS, HEADS, POINTS, timed
from ipclip import random_blob_masks


REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Largest error allowed, relative to the largest magnitude of the compared tensor: the rounding of a result to the
# dtype, with room for the accumulation order of atomics.
TOLERANCES = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
STEPS = ("build", "tests", "parity", "gradcheck", "kernel_timings", "training", "model_eager", "ipclip", "model_compiled",
         "mask_naming", "collection")
# (dtype, compiled, batch size) of the collection loop's timings; the batch size None is --collection-batch-size
COLLECTION_VARIANTS = (("float32", False, 1), ("bfloat16", False, None), ("bfloat16", True, None))


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu runs every step with the CPU kernel, to check the script on a machine without a GPU")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--model-dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="dtypes of the eager model and IP-CLIP timings")
    parser.add_argument("--compile-dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="dtypes of the compiled model timings (each compiles the model once)")
    parser.add_argument("--model-precision", choices=["cast", "autocast"], default="cast",
                        help="half precision of the model timings: weights and inputs cast to the dtype, or autocast")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled timings")
    parser.add_argument("--image-size", type=int, default=640, help="square input of the model and the pixel decoder")
    parser.add_argument("--batch-size", type=int, default=8, help="batch of the kernel's batched parity case")
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--proposals", type=int, default=100, help="mask proposals of the IP-CLIP timing")
    parser.add_argument("--clip-image-size", type=int, default=480, help="side of the square image IP-CLIP sees")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--collection-images", type=int, default=64, help="images of the collection loop's folder")
    parser.add_argument("--collection-batch-size", type=int, default=8, help="batch of the collection loop in bfloat16")
    parser.add_argument("--collection-workers", type=int, default=4, help="DataLoader workers of the collection loop")
    parser.add_argument("--model-config", type=json.loads, default={},
                        help="MaftConfig keyword arguments as JSON (default: the default configuration)")
    parser.add_argument("--tests", nargs="+", default=["tests"], help="where `pytest -m cuda` looks")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    if arguments.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            f"gpu_check: no CUDA GPU is available (torch {torch.__version__}, CUDA build: {torch.version.cuda}); run it "
            "on a GPU machine, or pass --device cpu to check the script itself with the CPU kernel."
        )
    output = Path(os.environ.get("OUT") or REPO_ROOT / "benchmarks" / "results") / "gpu_check.json"
    report = {"arguments": {key: str(value) for key, value in vars(arguments).items()}, "environment": environment(arguments.device),
              "steps": {}}
    step_functions = {
        "build": build_kernel,
        "tests": run_cuda_tests,
        "parity": check_parity,
        "gradcheck": check_gradients_numerically,
        "kernel_timings": time_kernels,
        "training": run_training_steps,
        "model_eager": lambda arguments: time_model(arguments, compiled=False),
        "ipclip": time_ipclip,
        "model_compiled": lambda arguments: time_model(arguments, compiled=True),
        "mask_naming": time_mask_naming,
        "collection": time_collection,
    }
    check_started = time.perf_counter()
    for step in arguments.steps:
        started = time.perf_counter()
        try:
            result = step_functions[step](arguments)
        except Exception as error:  # recorded and reported: one failing step must not cost the other measurements
            result = {"passed": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        result["step_seconds"] = time.perf_counter() - started
        report["steps"][step] = result
        report["total_seconds"] = time.perf_counter() - check_started
        print(f"gpu_check: {step} {'passed' if result.get('passed', True) else 'FAILED'} in {result['step_seconds']:.1f} s",
              flush=True)
        write_json_atomically(output, report)
    print_table(report)
    print(f"\n{report['total_seconds']:.0f} s in all; written to {output}")
    failed = [step for step, result in report["steps"].items() if not result.get("passed", True)]
    if failed:
        sys.exit(f"gpu_check: failed steps: {', '.join(failed)}")


def environment(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "commit": git_commit()}
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, gpu_memory_gib=properties.total_memory / 2**30,
                    capability=f"{properties.major}.{properties.minor}", gpus=torch.cuda.device_count(),
                    torch_cuda_arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"))
    return info


def git_commit() -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    return result.stdout.strip() or None


def write_json_atomically(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(content, indent=2))
    os.replace(temporary, path)


# 1. Build and tests

def build_kernel(arguments) -> dict:
    from torch.utils import cpp_extension

    from maft.kernels import extension

    name = extension.extension_name(arguments.device)
    cached = (Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so").exists()
    started = time.perf_counter()
    extension.load_extension(arguments.device)
    return {"name": name, "was_cached": cached, "build_seconds": time.perf_counter() - started}


def run_cuda_tests(arguments) -> dict:
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", *arguments.tests]
    environment_variables = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=REPO_ROOT, env=environment_variables, capture_output=True, text=True, timeout=600)
    lines = result.stdout.strip().splitlines()
    return {"passed": result.returncode == 0, "summary": lines[-1] if lines else "", "exit_code": result.returncode,
            "output_tail": "\n".join(lines[-30:]) + result.stderr[-2000:]}


# 2. Parity of the kernel with the reference and the CPU kernel

def pixel_decoder_shapes(image_size: int) -> list[tuple[int, int]]:
    """The pixel decoder's levels: strides 8, 16, 32 of the input."""
    return [(max(1, image_size // stride), max(1, image_size // stride)) for stride in (8, 16, 32)]


def random_inputs(shapes, batch: int, queries: int | None = None, seed: int = 0) -> dict:
    """float32 inputs on the CPU; `queries` defaults to every position (the encoder's self-attention)."""
    generator = torch.Generator().manual_seed(seed)
    positions = sum(height * width for height, width in shapes)
    queries = positions if queries is None else queries
    value = torch.randn(batch, positions, HEADS, CHANNELS, generator=generator)
    # Pixel coordinates (x * W - 0.5, y * H - 0.5) at least 0.2 pixel from an integer, where bilinear sampling has a
    # kink (and a location rounded to 16 bits often lands exactly): an integer cell in [-2, size] plus a fraction in
    # [0.2, 0.8]. Cells -2 and size are outside the level, -1 and size - 1 half outside, so zero padding is exercised.
    level_sizes = torch.tensor([(width, height) for height, width in shapes])[:, None]  # (levels, points, 2)
    location_shape = (batch, queries, HEADS, len(shapes), POINTS, 2)
    cells = (torch.rand(location_shape, generator=generator) * (level_sizes + 3)).floor() - 2
    fractions = 0.2 + 0.6 * torch.rand(location_shape, generator=generator)
    locations = (cells + fractions + 0.5) / level_sizes
    weights = torch.rand(batch, queries, HEADS, len(shapes), POINTS, generator=generator).softmax(-1)
    grad_output = torch.randn(batch, queries, HEADS * CHANNELS, generator=generator)
    return {"shapes": shapes, "value": value, "locations": locations, "weights": weights, "grad_output": grad_output}


def parity_cases(arguments) -> dict[str, dict]:
    decoder = pixel_decoder_shapes(arguments.image_size)
    return {
        f"pixel decoder {arguments.image_size}x{arguments.image_size}": random_inputs(decoder, batch=1),
        "one level": random_inputs([(13, 17)], batch=2, queries=50, seed=1),
        "one query": random_inputs(decoder, batch=2, queries=1, seed=2),
        "non-contiguous": random_inputs([(9, 7), (5, 4)], batch=2, queries=30, seed=3) | {"non_contiguous": True},
        f"batch {arguments.batch_size}": random_inputs(pixel_decoder_shapes(arguments.image_size // 2), batch=arguments.batch_size, seed=4),
    }


def non_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The same values, in a tensor whose last dimension has stride 2."""
    return torch.stack([tensor, torch.zeros_like(tensor)], dim=-1)[..., 0]


def run_attention(case: dict, device: str, dtype: torch.dtype, backend: str) -> list[torch.Tensor]:
    """Output and the gradients of value, locations and weights, as float32 on the CPU."""
    from maft.deformable_attention import multi_scale_deformable_attention

    tensors = [case[key].to(device=device, dtype=dtype) for key in ("value", "locations", "weights")]
    if case.get("non_contiguous"):
        tensors = [non_contiguous(tensor) for tensor in tensors]
        assert not any(tensor.is_contiguous() for tensor in tensors)
    tensors = [tensor.requires_grad_() for tensor in tensors]
    output = multi_scale_deformable_attention(tensors[0], case["shapes"], None, tensors[1], tensors[2], backend=backend)
    gradients = torch.autograd.grad(output, tensors, case["grad_output"].to(device=device, dtype=dtype))
    return [tensor.detach().float().cpu() for tensor in (output, *gradients)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def check_parity(arguments) -> dict:
    """The kernel in each dtype against the float32 reference on the same (rounded) inputs, and against the CPU kernel
    in the same dtype: output and the three gradients."""
    rows, passed = [], True
    names = ("output", "grad value", "grad locations", "grad weights")
    for case_name, case in parity_cases(arguments).items():
        for dtype_name in arguments.dtypes:
            dtype = DTYPES[dtype_name]
            rounded = case | {key: case[key].to(dtype).float() for key in ("value", "locations", "weights")}
            kernel = run_attention(case, arguments.device, dtype, backend=arguments.device)
            comparisons = {
                "reference": run_attention(rounded, arguments.device, torch.float32, backend="pytorch"),
                "cpu kernel": run_attention(case, "cpu", dtype, backend="cpu"),
            }
            for against, expected in comparisons.items():
                errors = {name: relative_error(actual, wanted) for name, actual, wanted in zip(names, kernel, expected)}
                ok = max(errors.values()) <= TOLERANCES[dtype]
                passed &= ok
                rows.append({"case": case_name, "dtype": dtype_name, "against": against, "passed": ok,
                             "tolerance": TOLERANCES[dtype], "relative_errors": errors})
    return {"passed": passed, "rows": rows}


def check_gradients_numerically(arguments) -> dict:
    from maft.deformable_attention import multi_scale_deformable_attention

    case = random_inputs([(5, 4), (3, 2)], batch=1, queries=3, seed=5)
    value = case["value"][:, :, :2, :3].double().to(arguments.device).requires_grad_()
    # Away from pixel-centre grid lines, where bilinear sampling is not differentiable.
    locations = (case["locations"][:, :, :2] * 0.9 + 0.013).double().to(arguments.device).requires_grad_()
    weights = case["weights"][:, :, :2].double().to(arguments.device).requires_grad_()
    passed = torch.autograd.gradcheck(
        lambda v, l, w: multi_scale_deformable_attention(v, case["shapes"], None, l, w, backend=arguments.device),
        (value, locations, weights), raise_exception=False,
    )
    return {"passed": bool(passed)}


# 3. Kernel timings

def kernel_implementations(device: str, shapes: list[tuple[int, int]]) -> dict[str, Callable]:
    """The three implementations, each given the shapes as int pairs (maft's kernel then needs no host sync)."""
    from maft.deformable_attention import multi_scale_deformable_attention, multi_scale_deformable_attention_pytorch

    return {
        f"maft {device} kernel": lambda v, l, w: multi_scale_deformable_attention(v, shapes, None, l, w, backend=device),
        "maft PyTorch reference": lambda v, l, w: multi_scale_deformable_attention_pytorch(v, shapes, l, w),
        "transformers' function": lambda v, l, w: transformers_msda(v, shapes, l, w),
    }


def time_kernels(arguments) -> dict:
    shapes = pixel_decoder_shapes(arguments.image_size)
    case = random_inputs(shapes, batch=1)
    rows = []
    for dtype_name in arguments.dtypes:
        tensors = [case[key].to(arguments.device, DTYPES[dtype_name]).requires_grad_() for key in ("value", "locations", "weights")]
        for name, attention in kernel_implementations(arguments.device, shapes).items():
            def forward():
                with torch.no_grad():
                    attention(*tensors)

            def forward_backward():
                attention(*tensors).sum().backward()

            rows.append({"implementation": name, "dtype": dtype_name,
                         "forward_ms": 1e3 * timed(forward, arguments.repeats, arguments.device),
                         "forward_backward_ms": 1e3 * timed(forward_backward, arguments.repeats, arguments.device)})
    return {"shapes": shapes, "heads": HEADS, "channels": CHANNELS, "points": POINTS, "rows": rows}


# 4 and 5. The model. Kept to today's public API and small, to follow the model's refactoring easily.

def model_config(arguments, **overrides):
    from maft import MaftConfig

    return MaftConfig(**{**arguments.model_config, **overrides})


def make_processor(arguments):
    from maft import MaftImageProcessor, MaftProcessor
    from maft.data.clip_tokenizer import load_clip_tokenizer

    image_processor = MaftImageProcessor(shortest_edge=arguments.image_size, longest_edge=4 * arguments.image_size,
                                         clip_image_size=arguments.clip_image_size)
    return MaftProcessor(image_processor, load_clip_tokenizer())


def random_image(size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def class_names(count: int) -> list[str]:
    return [f"category number {index}" for index in range(count)]


def time_model(arguments, compiled: bool) -> dict:
    """Inference of one image with the vocabulary cached: images/s and peak memory, per dtype (see `precision`), eager
    or compiled (first call, which compiles, reported apart)."""
    from maft import MaftModel

    config = model_config(arguments)
    torch.manual_seed(0)
    base_model = MaftModel(config).eval()
    processor = make_processor(arguments)
    with torch.no_grad():  # the vocabulary, encoded once
        text_embeds = base_model.get_text_embeddings(**processor.tokenize_class_names(class_names(arguments.classes)))
    inputs = {**processor(images=random_image(arguments.image_size)), "text_embeds": text_embeds}
    rows = []
    for dtype_name in arguments.compile_dtypes if compiled else arguments.model_dtypes:
        model, model_inputs, precision = in_precision(base_model, inputs, DTYPES[dtype_name], arguments)
        run_model = torch.compile(model, backend=arguments.compile_backend) if compiled else model

        def segment():
            with precision:
                run_model(**model_inputs)
            synchronize(arguments.device)

        rows.append({"dtype": dtype_name, **timed_calls(segment, arguments.repeats, arguments.device)})
        del model, run_model
    return {"passed": all("error" not in row for row in rows), "compiled": compiled, "image_size": arguments.image_size,
            "classes": arguments.classes, "rows": rows}


def in_precision(base_model, inputs: dict, dtype: torch.dtype, arguments):
    """A copy of `base_model` on the device, the inputs, and the context to call it in, for `dtype`: weights and
    floating inputs cast to it (`--model-precision cast`), or float32 under autocast to it."""
    cast = dtype if arguments.model_precision == "cast" else torch.float32
    model = copy.deepcopy(base_model).to(arguments.device, cast)
    moved = {key: value.to(arguments.device, cast) if value.is_floating_point() else value.to(arguments.device)
             for key, value in inputs.items()}
    autocast = arguments.model_precision == "autocast" and dtype != torch.float32
    return model, moved, torch.autocast(arguments.device, dtype=dtype, enabled=autocast)


def timed_calls(run: Callable[[], None], repeats: int, device: str) -> dict:
    """First call (vocabulary encoding, compilation), then the median of `repeats` calls, images/s and peak memory;
    or the error of the first call (a dtype the model does not support yet must not cost the other rows)."""
    with torch.inference_mode():
        started = time.perf_counter()
        try:
            run()
        except Exception as error:
            return {"error": f"{type(error).__name__}: {error}"}
        first = time.perf_counter() - started
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    return {"first_call_s": first, "median_s": median, "images_per_s": 1 / median, "peak_memory_mib": peak_memory_mib(run, device)}


def time_ipclip(arguments) -> dict:
    """IP-CLIP with `proposals` mask proposals against a plain forward of the same CLIP vision model."""
    from maft import MaftClipVisionModel

    config = model_config(arguments)
    torch.manual_seed(0)
    base_model = MaftClipVisionModel(config.vision_config).eval()
    pixel_values = torch.randn(1, 3, arguments.clip_image_size, arguments.clip_image_size)
    masks = random_blob_masks(arguments.proposals)
    rows = []
    for dtype_name in arguments.model_dtypes:
        model, inputs, precision = in_precision(base_model, {"images": pixel_values, "masks": masks}, DTYPES[dtype_name], arguments)
        for method, call in {
            "plain CLIP": lambda: model(inputs["images"], interpolate_pos_encoding=True),
            f"IP-CLIP, Q={arguments.proposals}": lambda: model(inputs["images"], mask_proposals=inputs["masks"],
                                                               interpolate_pos_encoding=True),
        }.items():
            def run():
                with precision:
                    call()
                synchronize(arguments.device)

            rows.append({"method": method, "dtype": dtype_name, **timed_calls(run, arguments.repeats, arguments.device)})
    return {"passed": all("error" not in row for row in rows), "clip_image_size": arguments.clip_image_size, "rows": rows}


def time_mask_naming(arguments) -> dict:
    """Naming `proposals` given masks end to end in float32 (benchmarks/mask_naming.py): IP-CLIP in one pass against
    CLIP per masked crop, with the model of `--model-config` (random weights) and an image of `--image-size`."""
    import mask_naming
    from maft import MaftModel

    config = model_config(arguments)
    torch.manual_seed(0)
    model = MaftModel(config).eval().to(arguments.device)
    image = np.asarray(random_image(arguments.image_size))
    text_embeds = torch.nn.functional.normalize(torch.randn(arguments.classes, config.projection_dim), dim=-1).to(arguments.device)
    masks = mask_naming.random_disc_masks(arguments.proposals, arguments.image_size)
    runs = mask_naming.namers(model, make_processor(arguments), image, masks, text_embeds, arguments.device)
    rows = [{"method": f"{mask_naming.METHODS[method]}, K={arguments.proposals}", "dtype": "float32",
             **timed_calls(run, arguments.repeats, arguments.device)} for method, run in runs.items()]
    return {"passed": all("error" not in row for row in rows), "rows": rows}


def time_collection(arguments) -> dict:
    """`maft segment`'s loop (`segment_collection`) over a folder of `--collection-images` random images of
    `--image-size` with the model of `--model-config` (random weights) and `--classes` classes, per
    `COLLECTION_VARIANTS`: images/s of a second pass over the folder (the first one compiles and warms up)."""
    import tempfile

    from maft import MaftModel
    from maft.cli.image_collections import open_collection
    from maft.cli.segment_collection import segment_collection

    config = model_config(arguments)
    torch.manual_seed(0)
    base_model = MaftModel(config).eval()
    processor = make_processor(arguments)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for index in range(arguments.collection_images):
            random_image(arguments.image_size).save(Path(folder) / f"image-{index:04d}.png")
        collection = open_collection([str(Path(folder) / "*.png")])
        for dtype_name, compiled, batch_size in COLLECTION_VARIANTS:
            batch_size = batch_size or arguments.collection_batch_size
            model = copy.deepcopy(base_model).to(arguments.device, DTYPES[dtype_name])
            run_model = torch.compile(model, backend=arguments.compile_backend) if compiled else model
            row = {"method": f"collection loop, batch {batch_size}{', compiled' if compiled else ''}", "dtype": dtype_name}
            try:
                with tempfile.TemporaryDirectory() as output:
                    passes = [segment_collection(run_model, processor, collection, class_names(arguments.classes), Path(output),
                                                 batch_size=batch_size, num_workers=arguments.collection_workers,
                                                 overwrite=True) for _ in range(2)]
                failed = [reason for summary in passes for _, _, reason in summary.failed]
                if failed:
                    raise RuntimeError(f"{len(failed)} images failed, the first: {failed[0]}")
                row |= {"first_pass_s": passes[0].seconds, "seconds": passes[1].seconds,
                        "images_per_s": passes[1].done / passes[1].seconds}
            except Exception as error:  # a variant that fails must not cost the others
                row["error"] = f"{type(error).__name__}: {error}"
            rows.append(row)
            del model, run_model
    return {"passed": all("error" not in row for row in rows), "images": arguments.collection_images,
            "image_size": arguments.image_size, "classes": arguments.classes, "rows": rows}


def training_batch(arguments, config, model):
    """A batch of one random image and label map on the device, and the vocabulary's text embeddings."""
    from maft.training import MaftTrainingCollator

    rng = np.random.default_rng(0)
    label = rng.integers(0, arguments.classes, (arguments.image_size, arguments.image_size)) // 40 * 40 % arguments.classes
    example = {"image": random_image(arguments.image_size), "label": label.astype(np.int64)}
    processor = make_processor(arguments)
    tokens = processor.tokenize_class_names(class_names(arguments.classes))
    with torch.no_grad():
        text_embeds = model.get_text_embeddings(**{name: value.to(arguments.device) for name, value in tokens.items()})
    return MaftTrainingCollator(processor)([example]).to(arguments.device), text_embeds


def train_steps(arguments, stage: str, steps: int) -> dict:
    """`steps` optimizer steps of training stage `stage` ("proposals" or "maft") with its recipe, in bfloat16 autocast."""
    from maft import MaftModel
    from maft.training import get_recipe

    config = model_config(arguments)
    torch.manual_seed(0)
    model = MaftModel(config).to(arguments.device)
    recipe = get_recipe(stage)
    recipe.apply_to(model)
    stage_loss = recipe.training_loss(model)
    optimizer = recipe.optimizer(model)
    batch, text_embeds = training_batch(arguments, config, model)
    recipe.set_training_modes(model)
    losses, seconds = [], []
    if arguments.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        started = time.perf_counter()
        with torch.autocast(arguments.device, dtype=torch.bfloat16):
            loss = sum(stage_loss(model, batch, text_embeds).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        synchronize(arguments.device)
        seconds.append(time.perf_counter() - started)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() / 2**20 if arguments.device == "cuda" else None
    return {"passed": all(np.isfinite(losses)), "losses": losses, "step_seconds": seconds, "peak_memory_mib": peak}


def run_training_steps(arguments) -> dict:
    stages = {"maft": train_steps(arguments, "maft", steps=2), "proposals": train_steps(arguments, "proposals", steps=1)}
    return {"passed": all(result["passed"] for result in stages.values()), "stages": stages}


# The table

def print_table(report: dict) -> None:
    environment_info = report["environment"]
    print(f"\nGPU check on {environment_info.get('gpu', environment_info['device'])}, torch {environment_info['torch']}, "
          f"CUDA {environment_info['cuda']}, commit {environment_info['commit']}\n")
    print("| step | what | result |")
    print("|---|---|---|")
    for step, result in report["steps"].items():
        for what, outcome in table_rows(step, result):
            print(f"| {step} | {what} | {outcome} |")


def table_rows(step: str, result: dict) -> list[tuple[str, str]]:
    if "error" in result:
        return [("error", result["error"].splitlines()[0])]
    if step == "build":
        return [(result["name"], f"{result['build_seconds']:.1f} s{' (cached)' if result['was_cached'] else ''}")]
    if step == "tests":
        return [("pytest -m cuda", result["summary"])]
    if step == "parity":
        return [(f"{row['case']}, {row['dtype']} vs {row['against']}",
                 f"{'ok' if row['passed'] else 'FAILED'}: max relative error {max(row['relative_errors'].values()):.1e} "
                 f"(tolerance {row['tolerance']:.0e})") for row in result["rows"]]
    if step == "gradcheck":
        return [("float64 gradcheck", "ok" if result["passed"] else "FAILED")]
    if step == "kernel_timings":
        return [(f"{row['implementation']}, {row['dtype']}",
                 f"forward {row['forward_ms']:.2f} ms, forward+backward {row['forward_backward_ms']:.2f} ms") for row in result["rows"]]
    if step == "training":
        return [(f"stage {stage}, bf16 autocast",
                 f"losses {', '.join(f'{loss:.3f}' for loss in stage_result['losses'])}; steps "
                 f"{', '.join(f'{seconds:.2f}' for seconds in stage_result['step_seconds'])} s"
                 + (f"; peak {stage_result['peak_memory_mib']:.0f} MiB" if stage_result["peak_memory_mib"] is not None else ""))
                for stage, stage_result in result["stages"].items()]
    if step == "collection":
        return [(f"{row['method']}, {row['dtype']}", f"FAILED: {row['error'].splitlines()[0]}" if "error" in row else
                 f"{row['images_per_s']:.2f} images/s ({result['images']} images; first pass {row['first_pass_s']:.1f} s)")
                for row in result["rows"]]
    label = {"model_eager": "model, eager", "model_compiled": "model, compiled", "ipclip": "", "mask_naming": ""}[step]
    return [(f"{row.get('method', label)}, {row['dtype']}", timing_summary(row)) for row in result["rows"]]


def timing_summary(row: dict) -> str:
    if "error" in row:
        return f"FAILED: {row['error'].splitlines()[0]}"
    return (f"{row['images_per_s']:.2f} images/s ({1e3 * row['median_s']:.1f} ms; first call {row['first_call_s']:.1f} s), "
            f"peak {row['peak_memory_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
