// A CPU build of the compiled kernels, for the tests only: the same bindings
// (bindings.cpp) and the same per-element cores (bias_act.h, upfirdn2d.h) as the CUDA
// build, with plain loops in place of the CUDA launches. It lets machines without a GPU
// check the kernels' arithmetic, indexing and argument checks against the native ops.
#include <ATen/OpMathType.h>
#include <torch/extension.h>

#include "bias_act.h"
#include "ops.h"
#include "upfirdn2d.h"

namespace ipl {

const char* const kDeviceName = "cpu";

bool on_device(const torch::Tensor& t) { return t.is_cpu(); }

torch::Tensor bias_act_run(const torch::Tensor& x, const torch::Tensor& bias, double slope, double scale,
                           int64_t channels, int64_t inner) {
  auto y = torch::empty_like(x);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ipl_bias_act_host", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = bias.numel() > 0 ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      const acc_t b = bp != nullptr ? static_cast<acc_t>(bp[channel_of(i, channels, inner)]) : acc_t(0);
      yp[i] = static_cast<scalar_t>(
          bias_act_forward<acc_t>(static_cast<acc_t>(xp[i]), b, static_cast<acc_t>(slope), static_cast<acc_t>(scale)));
    }
  });
  return y;
}

torch::Tensor bias_act_grad_run(const torch::Tensor& grad, const torch::Tensor& y, double slope, double scale) {
  auto out = torch::empty_like(grad);
  const int64_t n = grad.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ipl_bias_act_grad_host", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      op[i] = static_cast<scalar_t>(bias_act_backward<acc_t>(static_cast<acc_t>(gp[i]), static_cast<acc_t>(yp[i]),
                                                             static_cast<acc_t>(slope), static_cast<acc_t>(scale)));
    }
  });
  return out;
}

torch::Tensor upfirdn2d_run(const torch::Tensor& x, const torch::Tensor& kernel, const Upfirdn2dParams& p) {
  auto out = torch::empty({x.size(0), x.size(1), p.out_h, p.out_w}, x.options());
  const int64_t planes = x.size(0) * x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ipl_upfirdn2d_host", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const acc_t* kp = kernel.data_ptr<acc_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for (int64_t plane = 0; plane < planes; ++plane) {
      for (int64_t oy = 0; oy < p.out_h; ++oy) {
        for (int64_t ox = 0; ox < p.out_w; ++ox) {
          *op++ = static_cast<scalar_t>(upfirdn2d_point<scalar_t, acc_t>(xp + plane * p.in_h * p.in_w, kp, p, oy, ox));
        }
      }
    }
  });
  return out;
}

}  // namespace ipl
