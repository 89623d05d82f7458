// CUDA loops of the compiled ops: one thread per output element, grid-stride, all
// arithmetic in the accumulation type (float for half/bfloat16/float, double for double).
// Only c10's CUDA headers are used: ATen/cuda/CUDAContext.h pulls in cuSPARSE and cuBLAS
// headers, which a minimal CUDA toolkit does not ship.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>

#include "bias_act.h"
#include "ops.h"
#include "upfirdn2d.h"

namespace ipl {

const char* const kDeviceName = "cuda";

bool on_device(const torch::Tensor& t) { return t.is_cuda(); }

namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU; the grid-stride loops cover larger tensors.
constexpr int64_t kMaxBlocks = 65535;

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)); }

template <typename scalar_t, typename acc_t>
__global__ void bias_act_kernel(scalar_t* __restrict__ y, const scalar_t* __restrict__ x,
                                const scalar_t* __restrict__ bias, int64_t n, int64_t channels, int64_t inner,
                                acc_t slope, acc_t scale) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[channel_of(i, channels, inner)]) : acc_t(0);
    y[i] = static_cast<scalar_t>(bias_act_forward<acc_t>(static_cast<acc_t>(x[i]), b, slope, scale));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bias_act_grad_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ grad,
                                     const scalar_t* __restrict__ y, int64_t n, acc_t slope, acc_t scale) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = static_cast<scalar_t>(
        bias_act_backward<acc_t>(static_cast<acc_t>(grad[i]), static_cast<acc_t>(y[i]), slope, scale));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void upfirdn2d_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                 const acc_t* __restrict__ k, Upfirdn2dParams p, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t plane_in = p.in_h * p.in_w;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t ox = i % p.out_w;
    const int64_t rest = i / p.out_w;
    const int64_t oy = rest % p.out_h;
    const int64_t plane = rest / p.out_h;
    out[i] = static_cast<scalar_t>(upfirdn2d_point<scalar_t, acc_t>(x + plane * plane_in, k, p, oy, ox));
  }
}

}  // namespace

torch::Tensor bias_act_run(const torch::Tensor& x, const torch::Tensor& bias, double slope, double scale,
                           int64_t channels, int64_t inner) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ipl_bias_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bias_act_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), bias.numel() > 0 ? bias.data_ptr<scalar_t>() : nullptr, n,
        channels, inner, static_cast<acc_t>(slope), static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

torch::Tensor bias_act_grad_run(const torch::Tensor& grad, const torch::Tensor& y, double slope, double scale) {
  const c10::cuda::CUDAGuard guard(grad.device());
  auto out = torch::empty_like(grad);
  const int64_t n = grad.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ipl_bias_act_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bias_act_grad_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, static_cast<acc_t>(slope),
        static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

torch::Tensor upfirdn2d_run(const torch::Tensor& x, const torch::Tensor& kernel, const Upfirdn2dParams& p) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({x.size(0), x.size(1), p.out_h, p.out_w}, x.options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ipl_upfirdn2d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    upfirdn2d_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), kernel.data_ptr<acc_t>(), p, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace ipl
