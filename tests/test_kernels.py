"""Multi-scale deformable attention: the compiled CPU kernel against the PyTorch reference and transformers' function,
gradients, backend selection, input errors, the layer, and (where a CUDA build of torch and nvcc exist) the CUDA build."""

import shutil
import warnings

import pytest
import torch
from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention as transformers_msda

from maft.kernels import (
    KernelBuildError,
    MultiScaleDeformableAttention,
    load_extension,
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_pytorch,
)
from maft.kernels import extension, functional


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


@pytest.fixture
def broken_build(monkeypatch):
    """Make every kernel build fail, as on a machine without a compiler, and forget earlier builds and warnings."""
    monkeypatch.setattr(extension, "_loaded", {})
    monkeypatch.setattr(extension, "_failed", {})
    monkeypatch.setattr(functional, "_warned_fallback", set())

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


def test_unsupported_dtypes(cpu_kernel, monkeypatch):
    monkeypatch.setattr(functional, "_warned_fallback", set())
    value, shapes, starts, locations, weights = random_inputs(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="the cpu kernel supports float32, float64; got torch.bfloat16"):
        multi_scale_deformable_attention(value, shapes, starts, locations, weights, backend="cpu")
    with pytest.warns(UserWarning, match="does not support torch.bfloat16"):
        output = multi_scale_deformable_attention(value, shapes, starts, locations, weights, backend="auto")
    assert output.dtype == torch.bfloat16


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
    ],
)
def test_input_errors(change, message):
    with pytest.raises(ValueError, match=message):
        multi_scale_deformable_attention(*change(*random_inputs()), backend="pytorch")


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
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(embed_dim=30, num_heads=4)


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build: the CUDA kernel cannot be compiled")
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_build():
    module = load_extension("cuda")
    assert hasattr(module, "forward") and hasattr(module, "backward")
