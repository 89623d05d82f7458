// What a build provides for its device: ops.cu for CUDA. The bindings in bindings.cpp
// check every argument first, so these functions receive contiguous tensors of one
// floating dtype on their device, with valid sizes.
#pragma once

#include <torch/extension.h>

#include "upfirdn2d.h"

namespace ipl {

// The device these loops run on ("cuda"), and whether a tensor lives there.
extern const char* const kDeviceName;
bool on_device(const torch::Tensor& t);

// y = scale * leaky_relu(x + bias[c]); bias is empty or has `channels` entries.
torch::Tensor bias_act_run(const torch::Tensor& x, const torch::Tensor& bias, double slope, double scale,
                           int64_t channels, int64_t inner);

// grad * d(bias_act)/dx, from the forward output y.
torch::Tensor bias_act_grad_run(const torch::Tensor& grad, const torch::Tensor& y, double slope, double scale);

// (N, C, H, W) -> (N, C, out_h, out_w); `kernel` is in the accumulation type (float or double).
torch::Tensor upfirdn2d_run(const torch::Tensor& x, const torch::Tensor& kernel, const Upfirdn2dParams& p);

}  // namespace ipl
