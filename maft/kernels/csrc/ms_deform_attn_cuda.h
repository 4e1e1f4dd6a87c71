// Plain C++ interface of the CUDA kernels, so that the .cu compiles without torch's headers.
#pragma once

#include <cstdint>

#include "ms_deform_attn_sample.h"

namespace maft {

enum class CudaDtype { Float32, Float16, BFloat16 };

// Output and gradients are float32 buffers (the accumulation type); inputs are of `dtype`. `stream` is a cudaStream_t.
void ms_deform_attn_cuda_forward(CudaDtype dtype, const void* value, const int64_t* shapes, const int64_t* starts,
                                 const void* locations, const void* attention, float* output, const Dimensions& d,
                                 void* stream);

void ms_deform_attn_cuda_backward(CudaDtype dtype, const void* value, const int64_t* shapes, const int64_t* starts,
                                  const void* locations, const void* attention, const void* grad_output, float* grad_value,
                                  float* grad_locations, float* grad_attention, const Dimensions& d, void* stream);

}  // namespace maft
