"""StyleGAN2's two custom ops behind one dispatch point.

`fused_leaky_relu` (bias + leaky ReLU + gain) and `upfirdn2d` (upsample, FIR filter,
downsample). Each exists as a plain PyTorch reference (`_*_native`), which is the
specification, and as compiled C++/CUDA kernels (`csrc/`, built by `build.py` on first
CUDA use). `dispatch.resolve_impl` is the single place that decides which one a call uses.
"""

from ipltool.lazy import lazy_exports

# The ops import torch; `ipl --help` and `ipl kernels info` import this package only for
# `build` and `dispatch`, so the public names load on first use. `upfirdn2d` is left out:
# the name is also the submodule's, so callers import the op from `ipltool.kernels.upfirdn2d`.
__getattr__ = lazy_exports(
    __name__,
    {
        "KernelBuildError": "build",
        "available_impls": "dispatch",
        "kernel_choice": "dispatch",
        "resolve_impl": "dispatch",
        "FusedLeakyReLU": "fused_act",
        "fused_leaky_relu": "fused_act",
    },
)

__all__ = [
    "FusedLeakyReLU",
    "KernelBuildError",
    "available_impls",
    "fused_leaky_relu",
    "kernel_choice",
    "resolve_impl",
]
