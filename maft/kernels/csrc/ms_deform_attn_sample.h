// Per-sample arithmetic of multi-scale deformable attention, shared by the CPU and CUDA kernels so that the CPU tests
// exercise the arithmetic the GPU runs. A sample reads one head's channel of one level at a normalised location:
// pixel coordinates h = y * H - 0.5, w = x * W - 0.5, bilinear interpolation of the four neighbours, zero outside.
#pragma once

#ifdef __CUDACC__
#define MAFT_HOST_DEVICE __host__ __device__
#else
#define MAFT_HOST_DEVICE
#endif

namespace maft {

// Sizes of one call: value (batch, spatial, heads, channels); sampling locations (batch, queries, heads, levels, points, 2).
struct Dimensions {
  int batch, spatial, heads, channels, queries, levels, points;
};

// Reads a stored element as the accumulation type (specialised for half types in the CUDA source).
template <typename acc_t, typename scalar_t>
MAFT_HOST_DEVICE inline acc_t load_as(const scalar_t& stored) {
  return static_cast<acc_t>(stored);
}

// The four neighbours of (h, w) in a level of `height` x `width`: their offsets in a value tensor whose rows
// (positions) are `row_stride` elements apart (-1 where outside), and their bilinear weights.
template <typename acc_t>
struct BilinearCorners {
  long offset[4];
  acc_t weight[4];
  acc_t h_low_weight, h_high_weight, w_low_weight, w_high_weight;
};

template <typename acc_t>
MAFT_HOST_DEVICE inline bool locate_sample(acc_t h, acc_t w, int height, int width, long row_stride,
                                           BilinearCorners<acc_t>& corners) {
  if (!(h > acc_t(-1) && w > acc_t(-1) && h < acc_t(height) && w < acc_t(width))) return false;
  const long h_low = static_cast<long>(h >= acc_t(0) ? h : h - acc_t(1));  // floor, for h > -1
  const long w_low = static_cast<long>(w >= acc_t(0) ? w : w - acc_t(1));
  const acc_t lh = h - acc_t(h_low), lw = w - acc_t(w_low);
  corners.h_low_weight = acc_t(1) - lh;
  corners.h_high_weight = lh;
  corners.w_low_weight = acc_t(1) - lw;
  corners.w_high_weight = lw;
  const long rows[2] = {h_low, h_low + 1};
  const long columns[2] = {w_low, w_low + 1};
  const acc_t row_weights[2] = {acc_t(1) - lh, lh};
  const acc_t column_weights[2] = {acc_t(1) - lw, lw};
  for (int r = 0; r < 2; ++r) {
    for (int c = 0; c < 2; ++c) {
      const bool inside = rows[r] >= 0 && rows[r] < height && columns[c] >= 0 && columns[c] < width;
      corners.offset[2 * r + c] = inside ? (rows[r] * width + columns[c]) * row_stride : -1;
      corners.weight[2 * r + c] = row_weights[r] * column_weights[c];
    }
  }
  return true;
}

// Bilinear value of one channel: `values` points at channel c of position 0 of the level.
template <typename scalar_t, typename acc_t>
MAFT_HOST_DEVICE inline acc_t sample_value(const scalar_t* values, const BilinearCorners<acc_t>& corners, acc_t* corner_values) {
  acc_t result = acc_t(0);
  for (int k = 0; k < 4; ++k) {
    corner_values[k] = corners.offset[k] >= 0 ? load_as<acc_t>(values[corners.offset[k]]) : acc_t(0);
    result += corners.weight[k] * corner_values[k];
  }
  return result;
}

// Gradient of `attention * sample` for one channel, given the output gradient of that channel: adds to the value
// gradient through `add_to_value(offset, amount)` (plain on the CPU, atomic on the GPU) and returns, through the
// pointers, the contributions to d/dh, d/dw (pixel units) and d/dattention.
template <typename scalar_t, typename acc_t, typename AddToValue>
MAFT_HOST_DEVICE inline void sample_backward(const scalar_t* values, const BilinearCorners<acc_t>& corners, acc_t attention,
                                             acc_t grad_output, AddToValue add_to_value, acc_t* grad_h, acc_t* grad_w,
                                             acc_t* grad_attention) {
  acc_t corner_values[4];
  const acc_t sampled = sample_value(values, corners, corner_values);
  *grad_attention += grad_output * sampled;
  const acc_t scaled = attention * grad_output;
  for (int k = 0; k < 4; ++k) {
    if (corners.offset[k] >= 0) add_to_value(corners.offset[k], scaled * corners.weight[k]);
  }
  // value = (1-lh)(1-lw) v00 + (1-lh) lw v01 + lh (1-lw) v10 + lh lw v11
  *grad_h += scaled * (corners.w_low_weight * (corner_values[2] - corner_values[0]) +
                       corners.w_high_weight * (corner_values[3] - corner_values[1]));
  *grad_w += scaled * (corners.h_low_weight * (corner_values[1] - corner_values[0]) +
                       corners.h_high_weight * (corner_values[3] - corner_values[2]));
}

}  // namespace maft
