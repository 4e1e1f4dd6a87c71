"""Multi-scale deformable attention: the compiled CPU kernel against the PyTorch reference and transformers' function,
gradients, backend selection, input errors, the layer, and (where a CUDA build of torch and nvcc exist) the CUDA build."""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention as transformers_msda

from maft import deformable_attention
from maft.deformable_attention import (
    MultiScaleDeformableAttention,
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_pytorch,
)
from maft.kernels import KernelBuildError, extension, load_extension, multi_scale_deformable_attention_compiled


REPO_ROOT = Path(__file__).resolve().parents[1]


def random_inputs(batch=2, heads=4, channels=8, queries=7, points=2, shapes=((6, 5), (3, 4), (2, 2)), dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(shapes)
    value = torch.randn(batch, int(sizes.sum()), heads, channels, generator=generator, dtype=dtype)
    # Partly outside [0, 1]: zero padding must be exercised.
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator, dtype=dtype).softmax(-1)
    return value, spatial_shapes, level_start_index, locations, weights


@pytest.fixture(scope="module")
def cpu_kernel():
    return load_extension("cpu")


@pytest.mark.parametrize(
    "heads, channels, points, shapes",
    [(1, 3, 1, ((5, 7),)), (3, 32, 4, ((6, 5), (3, 4), (2, 2))), (8, 48, 2, ((9, 4), (5, 2), (1, 3), (2, 2))), (2, 5, 3, ((4, 4), (2, 2)))],
)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_cpu_kernel_matches_the_reference(cpu_kernel, heads, channels, points, shapes, dtype, tolerance):
    value, spatial_shapes, starts, locations, weights = random_inputs(heads=heads, channels=channels, points=points, shapes=shapes, dtype=dtype)
    inputs = [tensor.requires_grad_() for tensor in (value, locations, weights)]
    compiled = multi_scale_deformable_attention(value, spatial_shapes, starts, locations, weights, backend="cpu")
    reference = multi_scale_deformable_attention_pytorch(value, spatial_shapes, locations, weights)
    assert compiled.shape == (2, 7, heads * channels)
    torch.testing.assert_close(compiled, reference, rtol=tolerance, atol=tolerance)
    grad_output = torch.randn_like(compiled)
    for compiled_grad, reference_grad in zip(
        torch.autograd.grad(compiled, inputs, grad_output), torch.autograd.grad(reference, inputs, grad_output)
    ):
        torch.testing.assert_close(compiled_grad, reference_grad, rtol=tolerance * 10, atol=tolerance * 10)


def test_cpu_kernel_gradcheck(cpu_kernel):
    value, spatial_shapes, starts, locations, weights = random_inputs(batch=1, heads=2, channels=3, queries=3, dtype=torch.float64)
    # Keep locations away from pixel-centre grid lines, where bilinear sampling is not differentiable.
    locations = (locations * 0.9 + 0.013).requires_grad_()
    inputs = (value.requires_grad_(), locations, weights.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda v, l, w: multi_scale_deformable_attention(v, spatial_shapes, starts, l, w, backend="cpu"), inputs
    )


def test_reference_matches_transformers_function():
    value, spatial_shapes, starts, locations, weights = random_inputs(heads=8, channels=32, points=4)
    ours = multi_scale_deformable_attention_pytorch(value, spatial_shapes, locations, weights)
    theirs = transformers_msda(value, [tuple(shape) for shape in spatial_shapes.tolist()], locations, weights)
    torch.testing.assert_close(ours, theirs)


def test_cpu_kernel_matches_transformers_function(cpu_kernel):
    value, spatial_shapes, starts, locations, weights = random_inputs(heads=8, channels=32, points=4, seed=3)
    ours = multi_scale_deformable_attention(value, spatial_shapes, starts, locations, weights, backend="cpu")
    theirs = transformers_msda(value, [tuple(shape) for shape in spatial_shapes.tolist()], locations, weights)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "pytorch"])
def test_compiles_into_one_graph_with_shapes_as_a_list(cpu_kernel, backend):
    """With spatial shapes as int pairs and no level starts, torch.compile captures the whole call, kernel included (a
    custom operator with a fake implementation), and gives the eager forward and gradients."""
    value, spatial_shapes, _, locations, weights = random_inputs()
    shapes_list = [tuple(shape) for shape in spatial_shapes.tolist()]

    def attention(v, l, w):
        return multi_scale_deformable_attention(v, shapes_list, None, l, w, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    results = []
    for run in (attention, compiled):
        inputs = [tensor.clone().requires_grad_() for tensor in (value, locations, weights)]
        output = run(*inputs)
        results.append([output, *torch.autograd.grad(output.square().sum(), inputs)])
    for eager_result, compiled_result in zip(*results):
        torch.testing.assert_close(compiled_result, eager_result)


def test_kernel_operators_are_registered_consistently(cpu_kernel):
    """torch.library's checks of the custom operators: schema, fake implementation, autograd registration."""
    value, spatial_shapes, starts, locations, weights = random_inputs(batch=1, heads=2, channels=3, queries=3)
    arguments = (value.requires_grad_(), spatial_shapes, starts, locations.requires_grad_(), weights.requires_grad_())
    torch.library.opcheck(multi_scale_deformable_attention_compiled, arguments)


@pytest.fixture
def fresh_kernel_state(monkeypatch):
    """Forget earlier builds, failures and fallback warnings for the duration of the test."""
    monkeypatch.setattr(extension, "_loaded", {})
    monkeypatch.setattr(extension, "_failed", {})
    monkeypatch.setattr(deformable_attention, "_warned_fallback", set())


@pytest.fixture
def broken_build(fresh_kernel_state, monkeypatch):
    """Make every kernel build fail, as on a machine without a compiler."""

    def fail(device_type):
        raise KernelBuildError(f"no compiler for the {device_type} kernel (test)")

    monkeypatch.setattr(extension, "_build", fail)


def test_auto_falls_back_with_exactly_one_warning(broken_build):
    inputs = random_inputs()
    with pytest.warns(UserWarning, match="falls back to the PyTorch reference.*no compiler for the cpu kernel") as record:
        first = multi_scale_deformable_attention(*inputs, backend="auto")
        second = multi_scale_deformable_attention(*inputs, backend="auto")
    assert len([warning for warning in record if "falls back" in str(warning.message)]) == 1
    torch.testing.assert_close(first, multi_scale_deformable_attention_pytorch(inputs[0], inputs[1], inputs[3], inputs[4]))
    torch.testing.assert_close(first, second)


def test_demanding_a_compiled_kernel_raises_when_it_cannot_be_built(broken_build):
    with pytest.raises(KernelBuildError, match="no compiler for the cpu kernel"):
        multi_scale_deformable_attention(*random_inputs(), backend="cpu")


def test_environment_variable_overrides_the_backend(broken_build, monkeypatch):
    monkeypatch.setenv("MAFT_DEFORMABLE_ATTENTION_BACKEND", "pytorch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        multi_scale_deformable_attention(*random_inputs(), backend="cpu")  # would raise without the override
    monkeypatch.setenv("MAFT_DEFORMABLE_ATTENTION_BACKEND", "gpu")
    with pytest.raises(ValueError, match="MAFT_DEFORMABLE_ATTENTION_BACKEND must be one of auto, cuda, cpu, pytorch; got 'gpu'"):
        multi_scale_deformable_attention(*random_inputs())


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_cpu_kernel_half_precision_matches_the_float32_reference(cpu_kernel, dtype, tolerance):
    """Half and bfloat16 inputs are accumulated in float32: the error is that of rounding the results once."""
    value, spatial_shapes, starts, locations, weights = (
        tensor.to(dtype) if tensor.is_floating_point() else tensor for tensor in random_inputs(heads=8, channels=32, points=4)
    )
    half_inputs = [tensor.requires_grad_() for tensor in (value, locations, weights)]
    float_inputs = [tensor.detach().float().requires_grad_() for tensor in half_inputs]
    compiled = multi_scale_deformable_attention(half_inputs[0], spatial_shapes, starts, *half_inputs[1:], backend="cpu")
    reference = multi_scale_deformable_attention_pytorch(float_inputs[0], spatial_shapes, *float_inputs[1:])
    assert compiled.dtype == dtype
    assert_close_relative_to_largest(compiled, reference, tolerance)
    grad_output = torch.randn(reference.shape, generator=torch.Generator().manual_seed(1))
    compiled_grads = torch.autograd.grad(compiled, half_inputs, grad_output.to(dtype))
    for compiled_grad, reference_grad in zip(compiled_grads, torch.autograd.grad(reference, float_inputs, grad_output)):
        assert compiled_grad.dtype == dtype
        assert_close_relative_to_largest(compiled_grad, reference_grad, tolerance)


def assert_close_relative_to_largest(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    largest = expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected, rtol=0, atol=tolerance * largest)


def test_unsupported_dtypes():
    value, shapes, starts, locations, weights = random_inputs()
    with pytest.raises(ValueError, match="`value` must be a floating-point tensor, got torch.int64"):
        multi_scale_deformable_attention(value.long(), shapes, starts, locations, weights, backend="cpu")
    float8 = [tensor.to(torch.float8_e4m3fn) for tensor in (value, locations, weights)]
    with pytest.raises(ValueError, match="the cpu kernel supports float32, float64, float16, bfloat16; got torch.float8_e4m3fn"):
        multi_scale_deformable_attention(float8[0], shapes, starts, *float8[1:], backend="cpu")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda v, s, i, l, w: (v[0], s, i, l, w), "`value` must be"),
        (lambda v, s, i, l, w: (v, s, i, l[..., :1], w), "`sampling_locations` must be"),
        (lambda v, s, i, l, w: (v, s, i, l, w[..., :1]), "`attention_weights` must be"),
        (lambda v, s, i, l, w: (v, s[:2], i[:2], l, w), "`spatial_shapes` must be"),
        (lambda v, s, i, l, w: (v[:, :-1], s, i, l, w), "positions but `spatial_shapes` sum to"),
        (lambda v, s, i, l, w: (v, s, i + 1, l, w), "`level_start_index` must be \\[0, 30, 42\\]"),
        (lambda v, s, i, l, w: (v, s, i, l.double(), w), "share one dtype"),
        (lambda v, s, i, l, w: (v[:1], s, i, l, w), "disagree on batch size"),
        (lambda v, s, i, l, w: (v, s.float(), i, l, w), "`spatial_shapes` must hold integers, got torch.float32"),
        (lambda v, s, i, l, w: (v, s * torch.tensor([[1, 1], [-1, -1], [1, 1]]), i, l, w), "level 1 is \\(-3, -4\\)"),
        (lambda v, s, i, l, w: (v, [(6, 5), (3, 4), (2, 0)], i, l, w), "positive .* level 2 is \\(2, 0\\)"),
        (lambda v, s, i, l, w: (v, [(6, 5), (3, 4)], i, l, w), "got 2 levels"),
        (lambda v, s, i, l, w: (v, [(6, 5), (3, 4), (2.5, 2)], i, l, w), "list of \\(height, width\\) int pairs"),
        (lambda v, s, i, l, w: (v, [(6, 5), (3, 4), (1, 3)], None, l, w), "positions but `spatial_shapes` sum to 45"),
        (lambda v, s, i, l, w: (v, s.tolist(), [0, 30, 41], l, w), "`level_start_index` must be \\[0, 30, 42\\]"),
    ],
)
@pytest.mark.parametrize("backend", ["pytorch", "cpu"])
def test_input_errors(cpu_kernel, change, message, backend):
    with pytest.raises(ValueError, match=message):
        multi_scale_deformable_attention(*change(*random_inputs()), backend=backend)


@pytest.mark.parametrize("backend", ["pytorch", "cpu", "auto"])
def test_non_finite_sampling_locations_are_skipped_on_every_backend(cpu_kernel, backend):
    """A NaN or infinite location contributes nothing, whatever its attention weight, and gets zero gradients, as in
    the original CUDA op: the result is that of the same inputs with those samples' weights set to zero."""
    value, spatial_shapes, starts, locations, weights = random_inputs(heads=4, channels=8, points=2)
    skipped = [(0, 0, 0, 0, 0, 0), (0, 1, 1, 1, 0, 1), (1, 2, 3, 2, 1, 0), (1, 6, 2, 0, 1, 1)]
    for index, bad in zip(skipped, [float("nan"), float("inf"), -float("inf"), float("nan")]):
        locations[index] = bad
        weights[index[:-1]] = float("nan") if index[0] == 0 else 0.7
    skipped_samples = ~torch.isfinite(locations).all(-1)
    inputs = [tensor.clone().requires_grad_() for tensor in (value, locations, weights)]
    output = multi_scale_deformable_attention(inputs[0], spatial_shapes, starts, inputs[1], inputs[2], backend=backend)
    clean = [value.clone(), locations.nan_to_num(0.5, 0.5, 0.5), weights.masked_fill(skipped_samples, 0.0)]
    clean = [tensor.requires_grad_() for tensor in clean]
    expected = multi_scale_deformable_attention_pytorch(clean[0], spatial_shapes, clean[1], clean[2])
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    grad_output = torch.randn_like(output)
    grad_value, grad_locations, grad_weights = torch.autograd.grad(output, inputs, grad_output)
    expected_grad_value, expected_grad_locations, _ = torch.autograd.grad(expected, clean, grad_output)
    assert torch.isfinite(grad_value).all() and torch.isfinite(grad_locations).all() and torch.isfinite(grad_weights).all()
    torch.testing.assert_close(grad_value, expected_grad_value, rtol=1e-5, atol=1e-5)
    assert not grad_locations[skipped_samples].any() and not grad_weights[skipped_samples].any()
    torch.testing.assert_close(grad_locations[~skipped_samples], expected_grad_locations[~skipped_samples], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["pytorch", "cpu"])
def test_spatial_shapes_as_a_list_of_int_pairs(cpu_kernel, backend):
    value, spatial_shapes, starts, locations, weights = random_inputs()
    from_tensor = multi_scale_deformable_attention(value, spatial_shapes, starts, locations, weights, backend=backend)
    shapes_list = [tuple(shape) for shape in spatial_shapes.tolist()]
    torch.testing.assert_close(multi_scale_deformable_attention(value, shapes_list, None, locations, weights, backend=backend), from_tensor)
    torch.testing.assert_close(
        multi_scale_deformable_attention(value, shapes_list, starts.tolist(), locations, weights, backend=backend), from_tensor
    )


def test_layer_initialisation_and_forward(cpu_kernel):
    torch.manual_seed(0)
    layer = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=3, num_points=2, backend="cpu")
    assert torch.equal(layer.sampling_offsets.weight, torch.zeros_like(layer.sampling_offsets.weight))
    assert torch.equal(layer.attention_weights.weight, torch.zeros_like(layer.attention_weights.weight))
    offsets = layer.sampling_offsets.bias.view(4, 3, 2, 2)
    # Each head points in its own direction; the second point is twice as far as the first.
    assert torch.allclose(offsets[:, :, 1], 2 * offsets[:, :, 0])
    assert len({tuple(direction.tolist()) for direction in offsets[:, 0, 0]}) == 4
    _, spatial_shapes, starts, _, _ = random_inputs()
    query, value = torch.randn(2, 7, 32), torch.randn(2, int(spatial_shapes.prod(1).sum()), 32)
    points = torch.rand(2, 7, 3, 2)
    compiled = layer(query, points, value, spatial_shapes, starts)
    layer.backend = "pytorch"
    torch.testing.assert_close(compiled, layer(query, points, value, spatial_shapes, starts), rtol=1e-5, atol=1e-5)
    boxes = torch.cat([points, torch.full_like(points, 0.2)], dim=-1)
    assert layer(query, boxes, value, spatial_shapes, starts).shape == (2, 7, 32)
    padding = torch.zeros(2, value.shape[1], dtype=torch.bool)
    padding[:, :5] = True
    masked = layer(query, points, value, spatial_shapes, starts, value_padding_mask=padding)
    value[:, :5] = 1e3  # padded values must not matter
    torch.testing.assert_close(masked, layer(query, points, value, spatial_shapes, starts, value_padding_mask=padding))
    shapes_list = [tuple(shape) for shape in spatial_shapes.tolist()]
    torch.testing.assert_close(layer(query, points, value, shapes_list), layer(query, points, value, spatial_shapes, starts))
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(embed_dim=30, num_heads=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_half_precision_layer_samples_in_float32(cpu_kernel, monkeypatch, dtype):
    """The projections run in half precision; the sampling locations, attention weights and values reach the kernel
    in float32 (bfloat16 locations would miss by a third of a pixel on an 80-pixel map)."""
    torch.manual_seed(0)
    layer = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=1, num_points=2, backend="cpu")
    torch.nn.init.normal_(layer.sampling_offsets.weight, std=0.5)
    half_layer = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=1, num_points=2, backend="cpu").to(dtype)
    half_layer.load_state_dict(layer.state_dict())
    query, value = torch.randn(1, 50, 32), torch.randn(1, 80 * 80, 32)
    points = torch.rand(1, 50, 1, 2)
    sampled_dtypes = []
    sample = deformable_attention.multi_scale_deformable_attention

    def recording_sample(value, shapes, starts, locations, weights, *args):
        sampled_dtypes.append((value.dtype, locations.dtype, weights.dtype))
        return sample(value, shapes, starts, locations, weights, *args)

    monkeypatch.setattr(deformable_attention, "multi_scale_deformable_attention", recording_sample)
    output = half_layer(query.to(dtype), points, value.to(dtype), [(80, 80)])
    assert output.dtype == dtype and sampled_dtypes == [(torch.float32,) * 3]
    torch.testing.assert_close(output.float(), layer(query, points, value, [(80, 80)]), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("source_dir", ["empty", "missing"])
def test_missing_kernel_sources_fall_back_under_auto(fresh_kernel_state, monkeypatch, tmp_path, source_dir):
    """Without its C++ sources (a remote-code load ships only the Python files) "auto" warns once and uses the
    reference; "cpu" raises KernelBuildError naming the missing files."""
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(extension, "SOURCE_DIR", tmp_path / source_dir)
    inputs = random_inputs()
    with pytest.raises(KernelBuildError, match="missing or unreadable: bindings.cpp .*ms_deform_attn_sample.h"):
        multi_scale_deformable_attention(*inputs, backend="cpu")
    monkeypatch.setattr(extension, "_failed", {})
    with pytest.warns(UserWarning, match="falls back to the PyTorch reference.*kernel sources in .* are missing") as record:
        first = multi_scale_deformable_attention(*inputs, backend="auto")
        multi_scale_deformable_attention(*inputs, backend="auto")
    assert len([warning for warning in record if "falls back" in str(warning.message)]) == 1
    torch.testing.assert_close(first, multi_scale_deformable_attention_pytorch(inputs[0], inputs[1], inputs[3], inputs[4]))


def test_unreadable_kernel_source_raises_kernel_build_error(fresh_kernel_state, monkeypatch, tmp_path):
    for name in extension.CUDA_SOURCES + extension.HEADERS:
        (tmp_path / name).write_text("")
    (tmp_path / "bindings.cpp").unlink()
    (tmp_path / "bindings.cpp").mkdir()  # reading a folder fails like an unreadable file, even as root
    monkeypatch.setattr(extension, "SOURCE_DIR", tmp_path)
    with pytest.raises(KernelBuildError, match="missing or unreadable: bindings.cpp \\(Is a directory\\)"):
        load_extension("cpu")


def test_any_failure_of_the_builder_is_a_kernel_build_error(fresh_kernel_state, monkeypatch, tmp_path):
    """torch's builder raises IndexError, for one, when building for CUDA without a GPU or TORCH_CUDA_ARCH_LIST."""
    from torch.utils import cpp_extension

    def fail(**kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", fail)
    with pytest.raises(KernelBuildError, match="building the cpu kernel .* failed: IndexError: list index out of range"):
        load_extension("cpu")


def test_a_loaded_cuda_extension_serves_the_cpu_kernel(fresh_kernel_state, monkeypatch):
    cuda_build = object()
    monkeypatch.setattr(extension, "_loaded", {"cuda": cuda_build})
    monkeypatch.setattr(extension, "_build", lambda device_type: pytest.fail(f"built the {device_type} kernel again"))
    assert load_extension("cpu") is cuda_build


def test_build_name_depends_on_the_python_environment(monkeypatch):
    name = extension.extension_name("cpu")
    assert name == extension.extension_name("cpu")
    monkeypatch.setattr(sys, "prefix", "/elsewhere/.venv")
    assert extension.extension_name("cpu") != name


CONCURRENT_BUILDER = """
import logging, sys, time
from pathlib import Path
from maft.kernels import extension

logging.basicConfig(level=logging.WARNING, format="%(message)s")
extension.SOURCE_DIR = Path(sys.argv[1])
rendezvous = Path(sys.argv[2])
(rendezvous / sys.argv[3]).touch()
while len(list(rendezvous.iterdir())) < 2:  # start building only when both processes are ready
    time.sleep(0.01)
print(extension.load_extension("cpu").__file__)
"""


def test_concurrent_first_use_builds_once(tmp_path):
    """Two processes loading a kernel at once into an empty TORCH_EXTENSIONS_DIR, with a stale lock left by torch from
    a killed build: both load it, one builds (ninja compiles each source once), neither hangs. Small stand-in sources
    keep the compile short."""
    sources = tmp_path / "csrc"
    sources.mkdir()
    for name in extension.CUDA_SOURCES + extension.HEADERS:
        (sources / name).write_text("")
    (sources / "bindings.cpp").write_text("#include <pybind11/pybind11.h>\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {}\n")
    extensions_dir, rendezvous = tmp_path / "torch_extensions", tmp_path / "rendezvous"
    rendezvous.mkdir()
    environment = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions_dir), "PYTHONPATH": str(REPO_ROOT)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(extension, "SOURCE_DIR", sources)
        name = extension.extension_name("cpu")
    stale_baton = extensions_dir / name / "lock"
    stale_baton.parent.mkdir(parents=True)
    stale_baton.touch()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_BUILDER, str(sources), str(rendezvous), str(index)],
            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for index in range(2)
    ]
    results = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], results
    assert {stdout.strip() for stdout, _ in results} == {str(extensions_dir / name / f"{name}.so")}
    assert sum(stderr.count("building the cpu multi-scale deformable attention kernel") for _, stderr in results) == 1
    assert sum(stderr.count("waiting for another process to finish building") for _, stderr in results) == 1
    compiled = [line for line in (extensions_dir / name / ".ninja_log").read_text().splitlines() if "bindings.o" in line]
    assert len(compiled) == 1


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build: the CUDA kernel cannot be compiled")
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_build():
    module = load_extension("cuda")
    assert hasattr(module, "forward") and hasattr(module, "backward")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def attention_and_gradients(inputs, device, backend, dtype=None, seed=1):
    """Output and gradients of value, locations and weights for `inputs` (as `random_inputs`) moved to `device` and
    `dtype`, as float32 (float64 for float64) on the CPU."""
    value, spatial_shapes, starts, locations, weights = inputs
    tensors = [tensor.to(device, dtype or tensor.dtype).requires_grad_() for tensor in (value, locations, weights)]
    output = multi_scale_deformable_attention(tensors[0], spatial_shapes, starts, tensors[1], tensors[2], backend=backend)
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed)).to(output)
    results = (output, *torch.autograd.grad(output, tensors, grad_output))
    return [result.detach().cpu().to(torch.promote_types(result.dtype, torch.float32)) for result in results]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_cuda_kernel_matches_the_reference_and_the_cpu_kernel(dtype, tolerance):
    inputs = random_inputs(heads=8, channels=32, points=4)
    rounded = [tensor.to(dtype).float() if tensor.is_floating_point() else tensor for tensor in inputs]
    cuda = attention_and_gradients(inputs, "cuda", "cuda", dtype)
    reference = attention_and_gradients(rounded, "cpu", "pytorch")
    cpu = attention_and_gradients(inputs, "cpu", "cpu", dtype)
    for cuda_result, reference_result, cpu_result in zip(cuda, reference, cpu):
        assert_close_relative_to_largest(cuda_result, reference_result, tolerance)
        # Both accumulate in float32 and round once: they differ only by the order of the sums.
        assert_close_relative_to_largest(cuda_result, cpu_result, min(tolerance, 1e-3))


@pytest.mark.cuda
@requires_cuda
def test_cuda_kernel_gradcheck():
    value, spatial_shapes, starts, locations, weights = random_inputs(batch=1, heads=2, channels=3, queries=3, dtype=torch.float64)
    inputs = [tensor.cuda().requires_grad_() for tensor in (value, locations * 0.9 + 0.013, weights)]
    assert torch.autograd.gradcheck(
        lambda v, l, w: multi_scale_deformable_attention(v, spatial_shapes, starts, l, w, backend="cuda"), inputs
    )


@pytest.mark.cuda
@requires_cuda
def test_cuda_kernel_on_awkward_inputs():
    """Non-contiguous inputs, shapes as a list, NaN and infinite locations, an empty batch; "auto" picks the kernel."""
    value, spatial_shapes, starts, locations, weights = random_inputs(heads=4, channels=8)
    locations[0, 1, 2, 0, 1, 0], locations[1, 3, 0, 2, 0, 1] = float("nan"), float("inf")
    expected = attention_and_gradients((value, spatial_shapes, starts, locations, weights), "cpu", "cpu")
    shapes_list = [tuple(shape) for shape in spatial_shapes.tolist()]
    strided = [torch.stack([tensor, torch.zeros_like(tensor)], -1)[..., 0] for tensor in (value, locations, weights)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        actual = attention_and_gradients((strided[0], shapes_list, None, strided[1], strided[2]), "cuda", "auto")
    for actual_result, expected_result in zip(actual, expected):
        assert torch.isfinite(actual_result).all()
        torch.testing.assert_close(actual_result, expected_result, rtol=1e-5, atol=1e-5)
    empty = attention_and_gradients((value[:0], spatial_shapes, starts, locations[:0], weights[:0]), "cuda", "cuda")
    assert [tuple(result.shape) for result in empty] == [(0, 7, 32), (0, *value.shape[1:]), (0, *locations.shape[1:]),
                                                         (0, *weights.shape[1:])]


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_kernel_on_the_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the device guard launches on their device."""
    inputs = random_inputs(heads=4, channels=8)
    torch.cuda.set_device(0)
    on_second = attention_and_gradients(inputs, "cuda:1", "cuda")
    for second, first in zip(on_second, attention_and_gradients(inputs, "cuda:0", "cuda")):
        torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-5)
