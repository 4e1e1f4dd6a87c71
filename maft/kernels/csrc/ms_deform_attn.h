// Declarations shared by the bindings and the CPU kernel.
#pragma once

#include <torch/extension.h>

#include <vector>

#include "ms_deform_attn_sample.h"

namespace maft {

// value (N, S, M, D), sampling locations (N, Lq, M, L, P, 2).
inline Dimensions dimensions_of(const at::Tensor& value, const at::Tensor& locations) {
  return Dimensions{static_cast<int>(value.size(0)),     static_cast<int>(value.size(1)),
                    static_cast<int>(value.size(2)),     static_cast<int>(value.size(3)),
                    static_cast<int>(locations.size(1)), static_cast<int>(locations.size(3)),
                    static_cast<int>(locations.size(4))};
}

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                                      const at::Tensor& locations, const at::Tensor& attention);

std::vector<at::Tensor> ms_deform_attn_cpu_backward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                                                    const at::Tensor& locations, const at::Tensor& attention,
                                                    const at::Tensor& grad_output);

}  // namespace maft
