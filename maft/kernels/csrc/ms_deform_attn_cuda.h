// Plain C++ interface of the CUDA kernels, so that the .cu compiles without torch's headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "ms_deform_attn_sample.h"

namespace maft {

enum class CudaDtype { Float32, Float64, Float16, BFloat16 };

// Inputs are of `dtype`; output and gradients are zero-filled buffers of the accumulation type (float64 for Float64
// inputs, float32 otherwise), so that every atomic addition is a float or double one, native on all architectures
// CUDA 13 supports (sm_75 and newer): no half or bfloat16 atomics are needed. `stream` is a cudaStream_t. Each returns
// the launch's error (cudaGetLastError right after the launch).
cudaError_t ms_deform_attn_cuda_forward(CudaDtype dtype, const void* value, const int64_t* shapes, const int64_t* starts,
                                        const void* locations, const void* attention, void* output, const Dimensions& d,
                                        void* stream);

cudaError_t ms_deform_attn_cuda_backward(CudaDtype dtype, const void* value, const int64_t* shapes, const int64_t* starts,
                                         const void* locations, const void* attention, const void* grad_output,
                                         void* grad_value, void* grad_locations, void* grad_attention, const Dimensions& d,
                                         void* stream);

}  // namespace maft
