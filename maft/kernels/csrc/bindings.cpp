// Python bindings: dispatch to the CPU kernel, or (when built WITH_CUDA) to the CUDA kernels.
#include <torch/extension.h>

#include "ms_deform_attn.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAStream.h>

#include "ms_deform_attn_cuda.h"
#endif

namespace maft {
namespace {

#ifdef WITH_CUDA
CudaDtype cuda_dtype(const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kFloat: return CudaDtype::Float32;
    case at::kHalf: return CudaDtype::Float16;
    case at::kBFloat16: return CudaDtype::BFloat16;
    default: TORCH_CHECK(false, "the CUDA kernel supports float32, float16 and bfloat16, got ", tensor.scalar_type());
  }
}
#endif

at::Tensor forward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts, const at::Tensor& locations,
                   const at::Tensor& attention) {
  if (!value.is_cuda()) return ms_deform_attn_cpu_forward(value, shapes, starts, locations, attention);
#ifdef WITH_CUDA
  const Dimensions d = dimensions_of(value, locations);
  auto output = at::zeros({d.batch, d.queries, d.heads * d.channels}, value.options().dtype(at::kFloat));
  ms_deform_attn_cuda_forward(cuda_dtype(value), value.data_ptr(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                              locations.data_ptr(), attention.data_ptr(), output.data_ptr<float>(), d,
                              c10::cuda::getCurrentCUDAStream().stream());
  return output.to(value.scalar_type());
#else
  TORCH_CHECK(false, "this build of the multi-scale deformable attention extension has no CUDA kernel");
#endif
}

std::vector<at::Tensor> backward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                                 const at::Tensor& locations, const at::Tensor& attention, const at::Tensor& grad_output) {
  if (!value.is_cuda()) return ms_deform_attn_cpu_backward(value, shapes, starts, locations, attention, grad_output);
#ifdef WITH_CUDA
  const Dimensions d = dimensions_of(value, locations);
  auto as_float = value.options().dtype(at::kFloat);
  auto grad_value = at::zeros(value.sizes(), as_float);
  auto grad_locations = at::zeros(locations.sizes(), as_float);
  auto grad_attention = at::zeros(attention.sizes(), as_float);
  ms_deform_attn_cuda_backward(cuda_dtype(value), value.data_ptr(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                               locations.data_ptr(), attention.data_ptr(), grad_output.data_ptr(),
                               grad_value.data_ptr<float>(), grad_locations.data_ptr<float>(),
                               grad_attention.data_ptr<float>(), d, c10::cuda::getCurrentCUDAStream().stream());
  return {grad_value.to(value.scalar_type()), grad_locations.to(value.scalar_type()), grad_attention.to(value.scalar_type())};
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
