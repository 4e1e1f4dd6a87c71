// CUDA multi-scale deformable attention: one thread per (batch, query, head, channel); float32 accumulation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ms_deform_attn_cuda.h"

namespace maft {

template <>
__host__ __device__ inline float load_as<float, __half>(const __half& stored) {
  return __half2float(stored);
}

template <>
__host__ __device__ inline float load_as<float, __nv_bfloat16>(const __nv_bfloat16& stored) {
  return __bfloat162float(stored);
}

namespace {

constexpr int kThreads = 256;

inline int blocks_for(long total) { return static_cast<int>((total + kThreads - 1) / kThreads); }

// Calls visit(level_offset, sample, corners, height, width) for each sample of thread `index` (over N * Lq * M * D) that
// falls inside its level; `level_offset` points at the thread's channel of the level's first position in `value`.
template <typename scalar_t, typename Visit>
__device__ inline void for_each_sample(long index, const Dimensions& d, const int64_t* shapes, const int64_t* starts,
                                       const scalar_t* locations, Visit visit) {
  const long query_head = index / d.channels;
  const long m = query_head % d.heads, n = query_head / (static_cast<long>(d.queries) * d.heads);
  const long row_stride = static_cast<long>(d.heads) * d.channels;
  for (int l = 0; l < d.levels; ++l) {
    const int height = static_cast<int>(shapes[2 * l]), width = static_cast<int>(shapes[2 * l + 1]);
    const long level_offset = ((n * d.spatial + starts[l]) * d.heads + m) * d.channels + index % d.channels;
    for (int p = 0; p < d.points; ++p) {
      const long sample = query_head * d.levels * d.points + l * d.points + p;
      const float h = load_as<float>(locations[2 * sample + 1]) * height - 0.5f;
      const float w = load_as<float>(locations[2 * sample]) * width - 0.5f;
      BilinearCorners<float> corners;
      if (locate_sample(h, w, height, width, row_stride, corners)) visit(level_offset, sample, corners, height, width);
    }
  }
}

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const scalar_t* locations,
                               const scalar_t* attention, float* output, Dimensions d) {
  const long index = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= static_cast<long>(d.batch) * d.queries * d.heads * d.channels) return;
  float result = 0.f;
  for_each_sample(index, d, shapes, starts, locations,
                  [&](long level_offset, long sample, const BilinearCorners<float>& corners, int, int) {
                    float corner_values[4];
                    result += load_as<float>(attention[sample]) * sample_value(value + level_offset, corners, corner_values);
                  });
  output[index] = result;
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const scalar_t* locations,
                                const scalar_t* attention, const scalar_t* grad_output, float* grad_value,
                                float* grad_locations, float* grad_attention, Dimensions d) {
  const long index = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= static_cast<long>(d.batch) * d.queries * d.heads * d.channels) return;
  const float out_grad = load_as<float>(grad_output[index]);
  for_each_sample(index, d, shapes, starts, locations,
                  [&](long level_offset, long sample, const BilinearCorners<float>& corners, int height, int width) {
                    float* channel_grad = grad_value + level_offset;
                    float grad_h = 0.f, grad_w = 0.f, grad_a = 0.f;
                    sample_backward(value + level_offset, corners, load_as<float>(attention[sample]), out_grad,
                                    [channel_grad](long offset, float amount) { atomicAdd(channel_grad + offset, amount); },
                                    &grad_h, &grad_w, &grad_a);
                    atomicAdd(grad_locations + 2 * sample, grad_w * width);
                    atomicAdd(grad_locations + 2 * sample + 1, grad_h * height);
                    atomicAdd(grad_attention + sample, grad_a);
                  });
}

template <typename scalar_t>
void launch_forward(const void* value, const int64_t* shapes, const int64_t* starts, const void* locations,
                    const void* attention, float* output, const Dimensions& d, cudaStream_t stream) {
  const long total = static_cast<long>(d.batch) * d.queries * d.heads * d.channels;
  forward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(value), shapes, starts, static_cast<const scalar_t*>(locations),
      static_cast<const scalar_t*>(attention), output, d);
}

template <typename scalar_t>
void launch_backward(const void* value, const int64_t* shapes, const int64_t* starts, const void* locations,
                     const void* attention, const void* grad_output, float* grad_value, float* grad_locations,
                     float* grad_attention, const Dimensions& d, cudaStream_t stream) {
  const long total = static_cast<long>(d.batch) * d.queries * d.heads * d.channels;
  backward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(value), shapes, starts, static_cast<const scalar_t*>(locations),
      static_cast<const scalar_t*>(attention), static_cast<const scalar_t*>(grad_output), grad_value, grad_locations,
      grad_attention, d);
}

}  // namespace

void ms_deform_attn_cuda_forward(CudaDtype dtype, const void* value, const int64_t* shapes, const int64_t* starts,
                                 const void* locations, const void* attention, float* output, const Dimensions& d,
                                 void* stream) {
  auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case CudaDtype::Float32: return launch_forward<float>(value, shapes, starts, locations, attention, output, d, cuda_stream);
    case CudaDtype::Float16: return launch_forward<__half>(value, shapes, starts, locations, attention, output, d, cuda_stream);
    case CudaDtype::BFloat16:
      return launch_forward<__nv_bfloat16>(value, shapes, starts, locations, attention, output, d, cuda_stream);
  }
}

void ms_deform_attn_cuda_backward(CudaDtype dtype, const void* value, const int64_t* shapes, const int64_t* starts,
                                  const void* locations, const void* attention, const void* grad_output, float* grad_value,
                                  float* grad_locations, float* grad_attention, const Dimensions& d, void* stream) {
  auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case CudaDtype::Float32:
      return launch_backward<float>(value, shapes, starts, locations, attention, grad_output, grad_value, grad_locations,
                                    grad_attention, d, cuda_stream);
    case CudaDtype::Float16:
      return launch_backward<__half>(value, shapes, starts, locations, attention, grad_output, grad_value, grad_locations,
                                     grad_attention, d, cuda_stream);
    case CudaDtype::BFloat16:
      return launch_backward<__nv_bfloat16>(value, shapes, starts, locations, attention, grad_output, grad_value,
                                            grad_locations, grad_attention, d, cuda_stream);
  }
}

}  // namespace maft
