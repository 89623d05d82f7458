"""StyleGAN2's two custom ops behind one dispatch point.

`fused_leaky_relu` (bias + leaky ReLU + gain) and `upfirdn2d` (upsample, FIR filter,
downsample). Each exists as a plain PyTorch reference (`_*_native`), which is the
specification, and as compiled C++/CUDA kernels (`csrc/`, built by `build.py` on first
CUDA use). `dispatch.resolve_impl` is the single place that decides which one a call uses.
"""

from ipltool.kernels.build import KernelBuildError
from ipltool.kernels.dispatch import available_impls, kernel_choice, resolve_impl
from ipltool.kernels.fused_act import FusedLeakyReLU, fused_leaky_relu
from ipltool.kernels.upfirdn2d import upfirdn2d

__all__ = [
    "FusedLeakyReLU",
    "KernelBuildError",
    "available_impls",
    "fused_leaky_relu",
    "kernel_choice",
    "resolve_impl",
    "upfirdn2d",
]
