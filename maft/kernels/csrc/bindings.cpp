// Python bindings: dispatch to the CPU kernel, or (when built WITH_CUDA) to the CUDA kernels.
#include <torch/extension.h>

#include "ms_deform_attn.h"

#ifdef WITH_CUDA
// c10's CUDA headers only: ATen/cuda/CUDAContext.h pulls in cusparse.h, which not every toolkit install has.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ms_deform_attn_cuda.h"
#endif

namespace maft {
namespace {

// The Python wrapper guarantees these; checked again so that a direct call cannot read out of bounds.
void check_inputs(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts, const at::Tensor& locations,
                  const at::Tensor& attention) {
  for (const at::Tensor* tensor : {&value, &shapes, &starts, &locations, &attention}) {
    TORCH_CHECK(tensor->is_contiguous(), "multi-scale deformable attention: every input must be contiguous");
    TORCH_CHECK(tensor->device() == value.device(), "multi-scale deformable attention: inputs on ", tensor->device(),
                " and ", value.device());
  }
  TORCH_CHECK(shapes.scalar_type() == at::kLong && starts.scalar_type() == at::kLong,
              "multi-scale deformable attention: spatial shapes and level starts must be int64");
  TORCH_CHECK(locations.scalar_type() == value.scalar_type() && attention.scalar_type() == value.scalar_type(),
              "multi-scale deformable attention: value, locations and attention weights must share one dtype");
}

#ifdef WITH_CUDA
CudaDtype cuda_dtype(const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kFloat: return CudaDtype::Float32;
    case at::kDouble: return CudaDtype::Float64;
    case at::kHalf: return CudaDtype::Float16;
    case at::kBFloat16: return CudaDtype::BFloat16;
    default: TORCH_CHECK(false, "the CUDA kernel supports float32, float64, float16 and bfloat16, got ", tensor.scalar_type());
  }
}

// Options of the buffers the CUDA kernels accumulate into: float64 for float64 inputs, float32 otherwise.
at::TensorOptions accumulation_options(const at::Tensor& value) {
  return value.options().dtype(value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}
#endif

at::Tensor forward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts, const at::Tensor& locations,
                   const at::Tensor& attention) {
  check_inputs(value, shapes, starts, locations, attention);
  if (!value.is_cuda()) return ms_deform_attn_cpu_forward(value, shapes, starts, locations, attention);
#ifdef WITH_CUDA
  const c10::cuda::CUDAGuard device_guard(value.device());
  const Dimensions d = dimensions_of(value, locations);
  auto output = at::zeros({d.batch, d.queries, d.heads * d.channels}, accumulation_options(value));
  C10_CUDA_CHECK(ms_deform_attn_cuda_forward(cuda_dtype(value), value.data_ptr(), shapes.data_ptr<int64_t>(),
                                             starts.data_ptr<int64_t>(), locations.data_ptr(), attention.data_ptr(),
                                             output.data_ptr(), d, c10::cuda::getCurrentCUDAStream().stream()));
  return output.to(value.scalar_type());
#else
  TORCH_CHECK(false, "this build of the multi-scale deformable attention extension has no CUDA kernel");
#endif
}

std::vector<at::Tensor> backward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                                 const at::Tensor& locations, const at::Tensor& attention, const at::Tensor& grad_output) {
  check_inputs(value, shapes, starts, locations, attention);
  TORCH_CHECK(grad_output.is_contiguous() && grad_output.scalar_type() == value.scalar_type() &&
                  grad_output.device() == value.device(),
              "multi-scale deformable attention: the output gradient must be contiguous, of value's dtype and device");
  if (!value.is_cuda()) return ms_deform_attn_cpu_backward(value, shapes, starts, locations, attention, grad_output);
#ifdef WITH_CUDA
  const c10::cuda::CUDAGuard device_guard(value.device());
  const Dimensions d = dimensions_of(value, locations);
  const auto options = accumulation_options(value);
  auto grad_value = at::zeros(value.sizes(), options);
  auto grad_locations = at::zeros(locations.sizes(), options);
  auto grad_attention = at::zeros(attention.sizes(), options);
  C10_CUDA_CHECK(ms_deform_attn_cuda_backward(cuda_dtype(value), value.data_ptr(), shapes.data_ptr<int64_t>(),
                                              starts.data_ptr<int64_t>(), locations.data_ptr(), attention.data_ptr(),
                                              grad_output.data_ptr(), grad_value.data_ptr(), grad_locations.data_ptr(),
                                              grad_attention.data_ptr(), d, c10::cuda::getCurrentCUDAStream().stream()));
  const auto dtype = value.scalar_type();
  return {grad_value.to(dtype), grad_locations.to(dtype), grad_attention.to(dtype)};
#else
  TORCH_CHECK(false, "this build of the multi-scale deformable attention extension has no CUDA kernel");
#endif
}

}  // namespace
}  // namespace maft

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("forward", &maft::forward, "multi-scale deformable attention, forward");
  module.def("backward", &maft::backward, "multi-scale deformable attention, backward");
}
