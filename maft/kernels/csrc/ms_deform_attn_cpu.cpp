// CPU multi-scale deformable attention, forward and backward, parallel with at::parallel_for. Half and bfloat16 inputs
// are read as float and accumulated in float (at::opmath_type), as on the GPU; results are cast back at the end.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sample.h"

namespace maft {
namespace {

template <typename scalar_t, typename acc_t>
void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const scalar_t* locations,
                    const scalar_t* attention, acc_t* output, const Dimensions& d) {
  const long row_stride = static_cast<long>(d.heads) * d.channels;
  at::parallel_for(0, static_cast<int64_t>(d.batch) * d.queries * d.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t n = index / (static_cast<int64_t>(d.queries) * d.heads), m = index % d.heads;
      acc_t* out = output + index * d.channels;
      const scalar_t* sample_locations = locations + index * d.levels * d.points * 2;
      const scalar_t* sample_attention = attention + index * d.levels * d.points;
      for (int l = 0; l < d.levels; ++l) {
        const int height = static_cast<int>(shapes[2 * l]), width = static_cast<int>(shapes[2 * l + 1]);
        const scalar_t* level_values = value + ((n * d.spatial + starts[l]) * d.heads + m) * d.channels;
        for (int p = 0; p < d.points; ++p) {
          const int sample = l * d.points + p;
          const acc_t h = load_as<acc_t>(sample_locations[2 * sample + 1]) * height - acc_t(0.5);
          const acc_t w = load_as<acc_t>(sample_locations[2 * sample]) * width - acc_t(0.5);
          BilinearCorners<acc_t> corners;
          if (!locate_sample(h, w, height, width, row_stride, corners)) continue;
          const acc_t weight = load_as<acc_t>(sample_attention[sample]);
          acc_t corner_values[4];
          for (int c = 0; c < d.channels; ++c) {
            out[c] += weight * sample_value(level_values + c, corners, corner_values);
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const scalar_t* locations,
                     const scalar_t* attention, const scalar_t* grad_output, acc_t* grad_value, acc_t* grad_locations,
                     acc_t* grad_attention, const Dimensions& d) {
  const long row_stride = static_cast<long>(d.heads) * d.channels;
  // One task per (batch, head): each owns a disjoint slice of the value gradient, so no two threads write one entry.
  at::parallel_for(0, static_cast<int64_t>(d.batch) * d.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / d.heads, m = task % d.heads;
      for (int q = 0; q < d.queries; ++q) {
        const int64_t index = (n * d.queries + q) * d.heads + m;
        const scalar_t* out_grad = grad_output + index * d.channels;
        for (int l = 0; l < d.levels; ++l) {
          const int height = static_cast<int>(shapes[2 * l]), width = static_cast<int>(shapes[2 * l + 1]);
          const long level_offset = ((n * d.spatial + starts[l]) * d.heads + m) * d.channels;
          for (int p = 0; p < d.points; ++p) {
            const int64_t sample = index * d.levels * d.points + l * d.points + p;
            const acc_t h = load_as<acc_t>(locations[2 * sample + 1]) * height - acc_t(0.5);
            const acc_t w = load_as<acc_t>(locations[2 * sample]) * width - acc_t(0.5);
            BilinearCorners<acc_t> corners;
            if (!locate_sample(h, w, height, width, row_stride, corners)) continue;
            const acc_t weight = load_as<acc_t>(attention[sample]);
            acc_t grad_h = 0, grad_w = 0, grad_a = 0;
            for (int c = 0; c < d.channels; ++c) {
              acc_t* channel_grad = grad_value + level_offset + c;
              sample_backward(value + level_offset + c, corners, weight, load_as<acc_t>(out_grad[c]),
                              [channel_grad](long offset, acc_t amount) { channel_grad[offset] += amount; }, &grad_h,
                              &grad_w, &grad_a);
            }
            grad_locations[2 * sample] = grad_w * width;
            grad_locations[2 * sample + 1] = grad_h * height;
            grad_attention[sample] = grad_a;
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                                      const at::Tensor& locations, const at::Tensor& attention) {
  const Dimensions d = dimensions_of(value, locations);
  at::Tensor output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cpu_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    output = at::zeros({d.batch, d.queries, d.heads, d.channels}, value.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    forward_kernel<scalar_t, acc_t>(value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                                    locations.data_ptr<scalar_t>(), attention.data_ptr<scalar_t>(), output.data_ptr<acc_t>(), d);
  });
  return output.view({d.batch, d.queries, d.heads * d.channels}).to(value.scalar_type());
}

std::vector<at::Tensor> ms_deform_attn_cpu_backward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                                                    const at::Tensor& locations, const at::Tensor& attention,
                                                    const at::Tensor& grad_output) {
  const Dimensions d = dimensions_of(value, locations);
  at::Tensor grad_value, grad_locations, grad_attention;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cpu_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto accumulate = value.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    grad_value = at::zeros(value.sizes(), accumulate);
    grad_locations = at::zeros(locations.sizes(), accumulate);
    grad_attention = at::zeros(attention.sizes(), accumulate);
    backward_kernel<scalar_t, acc_t>(value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                                     locations.data_ptr<scalar_t>(), attention.data_ptr<scalar_t>(),
                                     grad_output.data_ptr<scalar_t>(), grad_value.data_ptr<acc_t>(),
                                     grad_locations.data_ptr<acc_t>(), grad_attention.data_ptr<acc_t>(), d);
  });
  const auto dtype = value.scalar_type();
  return {grad_value.to(dtype), grad_locations.to(dtype), grad_attention.to(dtype)};
}

}  // namespace maft
