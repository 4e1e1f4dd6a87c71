// CUDA multi-scale deformable attention: one thread per (batch, query, head, channel); float32 accumulation (float64
// for float64 inputs).
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

template <typename scalar_t>
struct Accumulation {
  using type = float;
};

template <>
struct Accumulation<double> {
  using type = double;
};

inline int blocks_for(long total) { return static_cast<int>((total + kThreads - 1) / kThreads); }

// Calls visit(level_offset, sample, corners, height, width) for each sample of thread `index` (over N * Lq * M * D) that
// falls inside its level; `level_offset` points at the thread's channel of the level's first position in `value`.
template <typename acc_t, typename scalar_t, typename Visit>
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
      const acc_t h = load_as<acc_t>(locations[2 * sample + 1]) * height - acc_t(0.5);
      const acc_t w = load_as<acc_t>(locations[2 * sample]) * width - acc_t(0.5);
      BilinearCorners<acc_t> corners;
      if (locate_sample(h, w, height, width, row_stride, corners)) visit(level_offset, sample, corners, height, width);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const scalar_t* locations,
                               const scalar_t* attention, acc_t* output, Dimensions d) {
  const long index = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= static_cast<long>(d.batch) * d.queries * d.heads * d.channels) return;
  acc_t result = 0;
  for_each_sample<acc_t>(index, d, shapes, starts, locations,
                         [&](long level_offset, long sample, const BilinearCorners<acc_t>& corners, int, int) {
                           acc_t corner_values[4];
                           result += load_as<acc_t>(attention[sample]) * sample_value(value + level_offset, corners, corner_values);
                         });
  output[index] = result;
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const scalar_t* locations,
                                const scalar_t* attention, const scalar_t* grad_output, acc_t* grad_value,
                                acc_t* grad_locations, acc_t* grad_attention, Dimensions d) {
  const long index = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= static_cast<long>(d.batch) * d.queries * d.heads * d.channels) return;
  const acc_t out_grad = load_as<acc_t>(grad_output[index]);
  for_each_sample<acc_t>(index, d, shapes, starts, locations,
                         [&](long level_offset, long sample, const BilinearCorners<acc_t>& corners, int height, int width) {
                           acc_t* channel_grad = grad_value + level_offset;
                           acc_t grad_h = 0, grad_w = 0, grad_a = 0;
                           sample_backward(value + level_offset, corners, load_as<acc_t>(attention[sample]), out_grad,
                                           [channel_grad](long offset, acc_t amount) { atomicAdd(channel_grad + offset, amount); },
                                           &grad_h, &grad_w, &grad_a);
                           atomicAdd(grad_locations + 2 * sample, grad_w * width);
                           atomicAdd(grad_locations + 2 * sample + 1, grad_h * height);
                           atomicAdd(grad_attention + sample, grad_a);
                         });
}

template <typename scalar_t>
cudaError_t launch_forward(const void* value, const int64_t* shapes, const int64_t* starts, const void* locations,
                           const void* attention, void* output, const Dimensions& d, cudaStream_t stream) {
  using acc_t = typename Accumulation<scalar_t>::type;
  const long total = static_cast<long>(d.batch) * d.queries * d.heads * d.channels;
  if (total == 0) return cudaSuccess;  // a launch with no blocks is an invalid configuration
  forward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(value), shapes, starts, static_cast<const scalar_t*>(locations),
      static_cast<const scalar_t*>(attention), static_cast<acc_t*>(output), d);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_backward(const void* value, const int64_t* shapes, const int64_t* starts, const void* locations,
                            const void* attention, const void* grad_output, void* grad_value, void* grad_locations,
                            void* grad_attention, const Dimensions& d, cudaStream_t stream) {
  using acc_t = typename Accumulation<scalar_t>::type;
  const long total = static_cast<long>(d.batch) * d.queries * d.heads * d.channels;
  if (total == 0) return cudaSuccess;
  backward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(value), shapes, starts, static_cast<const scalar_t*>(locations),
      static_cast<const scalar_t*>(attention), static_cast<const scalar_t*>(grad_output), static_cast<acc_t*>(grad_value),
      static_cast<acc_t*>(grad_locations), static_cast<acc_t*>(grad_attention), d);
  return cudaGetLastError();
}

// Calls launch.template operator()<scalar_t>() with the element type of `dtype`.
template <typename Launch>
cudaError_t dispatch(CudaDtype dtype, Launch launch) {
  switch (dtype) {
    case CudaDtype::Float32: return launch(float{});
    case CudaDtype::Float64: return launch(double{});
    case CudaDtype::Float16: return launch(__half{});
    case CudaDtype::BFloat16: return launch(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t ms_deform_attn_cuda_forward(CudaDtype dtype, const void* value, const int64_t* shapes, const int64_t* starts,
                                        const void* locations, const void* attention, void* output, const Dimensions& d,
                                        void* stream) {
  return dispatch(dtype, [&](auto element) {
    return launch_forward<decltype(element)>(value, shapes, starts, locations, attention, output, d,
                                             static_cast<cudaStream_t>(stream));
  });
}

cudaError_t ms_deform_attn_cuda_backward(CudaDtype dtype, const void* value, const int64_t* shapes, const int64_t* starts,
                                         const void* locations, const void* attention, const void* grad_output,
                                         void* grad_value, void* grad_locations, void* grad_attention, const Dimensions& d,
                                         void* stream) {
  return dispatch(dtype, [&](auto element) {
    return launch_backward<decltype(element)>(value, shapes, starts, locations, attention, grad_output, grad_value,
                                              grad_locations, grad_attention, d, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace maft
