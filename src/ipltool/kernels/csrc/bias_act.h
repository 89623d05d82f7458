// Fused bias + leaky ReLU + gain: y = scale * leaky_relu(x + b[c], slope).
#pragma once

#include "common.h"

namespace ipl {

// One element of the forward pass, computed in the accumulation type acc_t.
template <typename acc_t>
IPL_HD acc_t bias_act_forward(acc_t x, acc_t bias, acc_t slope, acc_t scale) {
  const acc_t v = x + bias;
  return (v > acc_t(0) ? v : v * slope) * scale;
}

// One element of the backward pass from the forward *output* y, so the input need not
// be kept alive. With slope >= 0 and scale != 0 (checked by the bindings),
// y * scale > 0 exactly when x + bias > 0. At x + bias == 0 the slope side is taken,
// as torch.nn.functional.leaky_relu's own gradient does.
template <typename acc_t>
IPL_HD acc_t bias_act_backward(acc_t grad, acc_t y, acc_t slope, acc_t scale) {
  return grad * (y * scale > acc_t(0) ? scale : slope * scale);
}

// Channel of flat index i in a contiguous (N, C, inner...) tensor.
IPL_HD int64_t channel_of(int64_t i, int64_t channels, int64_t inner) {
  return (i / inner) % channels;
}

}  // namespace ipl
