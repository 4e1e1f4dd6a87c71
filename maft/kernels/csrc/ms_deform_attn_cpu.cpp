// CPU multi-scale deformable attention, forward and backward, parallel with at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sample.h"

namespace maft {
namespace {

template <typename scalar_t>
void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const scalar_t* locations,
                    const scalar_t* attention, scalar_t* output, const Dimensions& d) {
  const long row_stride = static_cast<long>(d.heads) * d.channels;
  at::parallel_for(0, static_cast<int64_t>(d.batch) * d.queries * d.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t n = index / (static_cast<int64_t>(d.queries) * d.heads), m = index % d.heads;
      scalar_t* out = output + index * d.channels;
      const scalar_t* sample_locations = locations + index * d.levels * d.points * 2;
      const scalar_t* sample_attention = attention + index * d.levels * d.points;
      for (int l = 0; l < d.levels; ++l) {
        const int height = static_cast<int>(shapes[2 * l]), width = static_cast<int>(shapes[2 * l + 1]);
        const scalar_t* level_values = value + ((n * d.spatial + starts[l]) * d.heads + m) * d.channels;
        for (int p = 0; p < d.points; ++p) {
          const int sample = l * d.points + p;
          const scalar_t h = sample_locations[2 * sample + 1] * height - scalar_t(0.5);
          const scalar_t w = sample_locations[2 * sample] * width - scalar_t(0.5);
          BilinearCorners<scalar_t> corners;
          if (!locate_sample(h, w, height, width, row_stride, corners)) continue;
          scalar_t corner_values[4];
          for (int c = 0; c < d.channels; ++c) {
            out[c] += sample_attention[sample] * sample_value(level_values + c, corners, corner_values);
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const scalar_t* locations,
                     const scalar_t* attention, const scalar_t* grad_output, scalar_t* grad_value, scalar_t* grad_locations,
                     scalar_t* grad_attention, const Dimensions& d) {
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
            const scalar_t h = locations[2 * sample + 1] * height - scalar_t(0.5);
            const scalar_t w = locations[2 * sample] * width - scalar_t(0.5);
            BilinearCorners<scalar_t> corners;
            if (!locate_sample(h, w, height, width, row_stride, corners)) continue;
            scalar_t grad_h = 0, grad_w = 0, grad_a = 0;
            for (int c = 0; c < d.channels; ++c) {
              scalar_t* channel_grad = grad_value + level_offset + c;
              sample_backward(value + level_offset + c, corners, attention[sample], out_grad[c],
                              [channel_grad](long offset, scalar_t amount) { channel_grad[offset] += amount; },
                              &grad_h, &grad_w, &grad_a);
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
  auto output = at::zeros({d.batch, d.queries, d.heads, d.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_forward", [&] {
    forward_kernel<scalar_t>(value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                             locations.data_ptr<scalar_t>(), attention.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), d);
  });
  return output.view({d.batch, d.queries, d.heads * d.channels});
}

std::vector<at::Tensor> ms_deform_attn_cpu_backward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                                                    const at::Tensor& locations, const at::Tensor& attention,
                                                    const at::Tensor& grad_output) {
  const Dimensions d = dimensions_of(value, locations);
  auto grad_value = at::zeros_like(value);
  auto grad_locations = at::zeros_like(locations);
  auto grad_attention = at::zeros_like(attention);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_backward", [&] {
    backward_kernel<scalar_t>(value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                              locations.data_ptr<scalar_t>(), attention.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
                              grad_value.data_ptr<scalar_t>(), grad_locations.data_ptr<scalar_t>(),
                              grad_attention.data_ptr<scalar_t>(), d);
  });
  return {grad_value, grad_locations, grad_attention};
}

}  // namespace maft
