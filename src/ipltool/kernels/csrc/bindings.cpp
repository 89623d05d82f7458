// Python entry points of the compiled kernels. Every argument is checked here, once for
// all builds, so a wrong call fails with a message instead of reading out of bounds.
#include <torch/extension.h>

#include "ops.h"

namespace {

void check_input(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(ipl::on_device(t), name, " must be on ", ipl::kDeviceName, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ", t.scalar_type());
}

void check_activation(double slope, double scale) {
  // The backward pass reads the sign of the pre-activation from the output (bias_act.h).
  TORCH_CHECK(slope >= 0.0, "negative_slope must be >= 0, got ", slope);
  TORCH_CHECK(scale != 0.0, "scale must not be 0");
}

torch::Tensor bias_act(const torch::Tensor& x, const torch::Tensor& bias, double slope, double scale) {
  check_input(x, "x");
  check_activation(slope, scale);
  TORCH_CHECK(x.dim() >= 2, "x must have shape (N, C, ...), got ", x.sizes());
  const int64_t channels = x.size(1);
  const int64_t inner = channels == 0 || x.size(0) == 0 ? 1 : x.numel() / (x.size(0) * channels);
  if (bias.numel() > 0) {
    check_input(bias, "bias");
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == channels, "bias must have shape (", channels, "), got ", bias.sizes());
    TORCH_CHECK(bias.scalar_type() == x.scalar_type(), "bias must have the dtype of x (", x.scalar_type(), "), got ",
                bias.scalar_type());
    TORCH_CHECK(bias.device() == x.device(), "bias and x must be on the same device");
  }
  return ipl::bias_act_run(x, bias, slope, scale, channels, inner);
}

torch::Tensor bias_act_grad(const torch::Tensor& grad, const torch::Tensor& y, double slope, double scale) {
  check_input(grad, "grad");
  check_input(y, "y");
  check_activation(slope, scale);
  TORCH_CHECK(grad.sizes() == y.sizes(), "grad and y must have one shape, got ", grad.sizes(), " and ", y.sizes());
  TORCH_CHECK(grad.scalar_type() == y.scalar_type(), "grad and y must have one dtype");
  TORCH_CHECK(grad.device() == y.device(), "grad and y must be on the same device");
  return ipl::bias_act_grad_run(grad, y, slope, scale);
}

torch::Tensor upfirdn2d(const torch::Tensor& x, const torch::Tensor& kernel, int64_t up_x, int64_t up_y,
                        int64_t down_x, int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0,
                        int64_t pad_y1) {
  check_input(x, "x");
  TORCH_CHECK(x.dim() == 4, "x must have shape (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(kernel.dim() == 2 && kernel.size(0) > 0 && kernel.size(1) > 0, "kernel must have shape (kh, kw), got ",
              kernel.sizes());
  TORCH_CHECK(kernel.device() == x.device(), "kernel and x must be on the same device");
  TORCH_CHECK(up_x >= 1 && up_y >= 1 && down_x >= 1 && down_y >= 1, "up and down must be >= 1");

  ipl::Upfirdn2dParams p;
  p.in_h = x.size(2);
  p.in_w = x.size(3);
  p.up_x = up_x;
  p.up_y = up_y;
  p.down_x = down_x;
  p.down_y = down_y;
  p.pad_x0 = pad_x0;
  p.pad_y0 = pad_y0;
  p.k_h = kernel.size(0);
  p.k_w = kernel.size(1);
  p.out_h = ipl::upfirdn2d_out_size(p.in_h, up_y, down_y, pad_y0, pad_y1, p.k_h);
  p.out_w = ipl::upfirdn2d_out_size(p.in_w, up_x, down_x, pad_x0, pad_x1, p.k_w);
  TORCH_CHECK(p.out_h > 0 && p.out_w > 0, "upfirdn2d: the padding leaves an empty output for input ", x.sizes(),
              " and kernel ", kernel.sizes());
  // Taps are summed in float (double for double inputs), whatever the storage type.
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return ipl::upfirdn2d_run(x, kernel.to(acc).contiguous(), p);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ipltool's compiled StyleGAN2 ops (fused bias + leaky ReLU, upfirdn2d)";
  m.attr("device") = ipl::kDeviceName;
  m.def("bias_act", &bias_act, "scale * leaky_relu(x + bias[c], slope)", pybind11::arg("x"), pybind11::arg("bias"),
        pybind11::arg("slope"), pybind11::arg("scale"));
  m.def("bias_act_grad", &bias_act_grad, "grad * d(bias_act)/dx from the output y", pybind11::arg("grad"),
        pybind11::arg("y"), pybind11::arg("slope"), pybind11::arg("scale"));
  m.def("upfirdn2d", &upfirdn2d, "upsample, pad, FIR-filter, downsample", pybind11::arg("x"), pybind11::arg("kernel"),
        pybind11::arg("up_x"), pybind11::arg("up_y"), pybind11::arg("down_x"), pybind11::arg("down_y"),
        pybind11::arg("pad_x0"), pybind11::arg("pad_x1"), pybind11::arg("pad_y0"), pybind11::arg("pad_y1"));
}
