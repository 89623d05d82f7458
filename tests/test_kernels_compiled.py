"""The compiled kernels (kernels/csrc) against the native ops.

Three levels, from what every machine can do to what needs a GPU:

1. slow: a CPU ("host") build of the same bindings and per-element cores, with plain
   loops in place of the CUDA launches (tests/kernels_host/host_ops.cpp). Through it the
   Python autograd Functions run on the CPU, so values, first and second derivatives,
   argument checks and the adjoint padding of upfirdn2d are checked without a GPU.
2. slow: the real CUDA build with `ipl kernels build`, as a user runs it (needs nvcc;
   compiles for sm 9.0 when there is no GPU), and the import of the library.
3. gpu: the CUDA kernels on config-f shapes, in every dtype, forward and gradients, and
   a whole generator with either implementation.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from ipltool.kernels import build

fused_act = importlib.import_module("ipltool.kernels.fused_act")
upfirdn2d_module = importlib.import_module("ipltool.kernels.upfirdn2d")

HOST_SOURCES = Path(__file__).parent / "kernels_host"
HAS_GPU = torch.cuda.is_available()


def gpu(test):
    """Marked `gpu`, and skipped with the reason where no CUDA device is visible."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device (none here)")(test))

# (up, down, pad x0 x1 y0 y1, kernel shape): the generator's blur after the transposed
# convolution, its 2x upsampling of the RGB skip, the encoders' 2x downsampling, and
# asymmetric and cropping cases that catch swapped axes.
GEOMETRIES = [
    ((1, 1), (1, 1), (1, 1, 1, 1), (4, 4)),
    ((2, 2), (1, 1), (2, 1, 2, 1), (4, 4)),
    ((1, 1), (2, 2), (1, 1, 1, 1), (4, 4)),
    ((2, 1), (1, 2), (1, 2, 0, 3), (3, 5)),
    ((3, 2), (2, 1), (2, 2, 1, 1), (5, 3)),
    ((1, 1), (1, 1), (-1, -2, 0, 1), (1, 1)),
]


HOST_FLAGS = ["-O2"]


def _host_sources() -> list[Path]:
    return [build.SOURCE_DIR / "bindings.cpp", HOST_SOURCES / "host_ops.cpp"]


def _host_key() -> str:
    """Hash of what the host build depends on: its sources and headers, torch, Python and the flags."""
    digest = hashlib.sha256()
    for path in [*_host_sources(), *(build.SOURCE_DIR / name for name in build.HEADERS)]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(f"{torch.__version__}|{sys.version}|{' '.join(HOST_FLAGS)}".encode())
    return digest.hexdigest()[:16]


def _host_module(directory: Path):
    """Build the host extension in `directory`, or import the library an earlier run built there.

    The library is imported as it is rather than through `cpp_extension.load`: the key of
    `directory` already covers what the binary depends on, while ninja would rebuild
    whenever the paths of the sources or of torch's headers differ (a clone elsewhere,
    another virtual environment). A library that does not load (a build killed while
    linking) is built again.
    """
    from torch.utils import cpp_extension

    library = directory / "ipl_kernels_host.so"
    if library.is_file():
        try:
            spec = importlib.util.spec_from_file_location("ipl_kernels_host", library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except ImportError:
            shutil.rmtree(directory)
            directory.mkdir()
    return cpp_extension.load(
        name="ipl_kernels_host",
        sources=[str(path) for path in _host_sources()],
        extra_include_paths=[str(build.SOURCE_DIR)],
        extra_cflags=HOST_FLAGS,
        build_directory=str(directory),
    )


@pytest.fixture(scope="module")
def host_ops(build_cache):
    """The host build, compiled once per content key and reused by later runs (ninja sees nothing to do)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("needs a C++ compiler")
    directory = build_cache / f"host-{_host_key()}"
    with FileLock(f"{directory}.lock"):  # parallel test workers build it once
        return _host_module(directory)


@pytest.fixture
def compiled(host_ops, monkeypatch):
    """Route the compiled code path to the host build."""
    monkeypatch.setattr(build, "extension", lambda: host_ops)
    return host_ops


def _upfirdn2d_both(x, kernel, up, down, pad):
    native = upfirdn2d_module._upfirdn2d_native(x, kernel, *up, *down, *pad)
    compiled = upfirdn2d_module._Upfirdn2dCuda.apply(x, kernel, *up, *down, *pad)
    return native, compiled


@pytest.mark.slow
@pytest.mark.parametrize("up,down,pad,kshape", GEOMETRIES)
def test_host_upfirdn2d_matches_native_with_exact_gradients(compiled, up, down, pad, kshape):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    kernel = torch.rand(*kshape, dtype=torch.float64)
    native, fast = _upfirdn2d_both(x, kernel, up, down, pad)
    assert fast.shape == native.shape
    torch.testing.assert_close(fast, native, rtol=1e-12, atol=1e-12)

    def op(t):
        return upfirdn2d_module._Upfirdn2dCuda.apply(t, kernel, *up, *down, *pad)

    assert torch.autograd.gradcheck(op, (x,))
    assert torch.autograd.gradgradcheck(op, (x,))


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_host_ops_on_config_f_shapes(compiled, dtype, tol):
    torch.manual_seed(0)
    blur = torch.tensor([1.0, 3.0, 3.0, 1.0])
    blur = blur[:, None] * blur[None, :]
    blur = blur / blur.sum()
    cases = [
        (torch.randn(2, 512, 9, 9), blur * 4, (1, 1), (1, 1), (1, 1, 1, 1)),  # blur after the 2x transposed conv
        (torch.randn(2, 3, 64, 64), blur * 4, (2, 2), (1, 1), (2, 1, 2, 1)),  # ToRGB skip upsampling
        (torch.randn(2, 64, 64, 64), blur, (1, 1), (2, 2), (1, 1, 1, 1)),  # encoder downsampling
    ]
    for x, kernel, up, down, pad in cases:
        native, fast = _upfirdn2d_both(x.to(dtype), kernel, up, down, pad)
        assert fast.dtype == dtype
        # The compiled op sums in float32 whatever the storage type, so compare with fp32.
        reference = upfirdn2d_module._upfirdn2d_native(x.to(dtype).float(), kernel, *up, *down, *pad)
        torch.testing.assert_close(fast.float(), reference, rtol=tol, atol=tol)
    for shape in [(2, 512), (2, 512, 4, 4), (2, 64, 32, 32)]:
        x, bias = torch.randn(shape).to(dtype), torch.randn(shape[1]).to(dtype)
        fast = fused_act._fused_leaky_relu_cuda(x, bias, 0.2, math.sqrt(2))
        reference = fused_act._fused_leaky_relu_native(x.float(), bias.float(), 0.2, math.sqrt(2))
        assert fast.dtype == dtype
        torch.testing.assert_close(fast.float(), reference, rtol=tol, atol=tol)


@pytest.mark.slow
def test_host_bias_act_gradients(compiled):
    torch.manual_seed(0)
    for shape in [(4, 5), (3, 5, 4, 4)]:
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
        for slope, scale in [(0.2, math.sqrt(2)), (0.0, 1.0), (0.1, -2.0)]:
            def op(a, b):
                return fused_act._fused_leaky_relu_cuda(a, b, slope, scale)

            torch.testing.assert_close(op(x, bias), fused_act._fused_leaky_relu_native(x, bias, slope, scale))
            assert torch.autograd.gradcheck(op, (x, bias))
            assert torch.autograd.gradgradcheck(op, (x, bias))
        assert torch.autograd.gradcheck(lambda a: fused_act._fused_leaky_relu_cuda(a, None, 0.2, 1.0), (x,))


@pytest.mark.slow
def test_host_bias_act_with_an_fp32_bias_under_autocast(compiled):
    x = torch.randn(2, 8, 4, 4).bfloat16().requires_grad_(True)
    bias = torch.nn.Parameter(torch.randn(8))
    y = fused_act._fused_leaky_relu_cuda(x, bias, 0.2, math.sqrt(2))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert bias.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    expected = torch.where(x.detach().float() + bias.detach().bfloat16().float().view(1, 8, 1, 1) > 0, 1.0, 0.2) * math.sqrt(2)
    torch.testing.assert_close(bias.grad, expected.sum(dim=(0, 2, 3)), rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_host_bindings_check_their_arguments(host_ops):
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(3\)"):
        host_ops.bias_act(x, torch.zeros(4), 0.2, 1.0)
    with pytest.raises(RuntimeError, match="bias must have the dtype of x"):
        host_ops.bias_act(x, torch.zeros(3, dtype=torch.float64), 0.2, 1.0)
    with pytest.raises(RuntimeError, match="negative_slope must be >= 0"):
        host_ops.bias_act(x, torch.zeros(3), -0.2, 1.0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        host_ops.bias_act(x.transpose(2, 3), torch.zeros(3), 0.2, 1.0)
    with pytest.raises(RuntimeError, match="floating-point"):
        host_ops.upfirdn2d(torch.zeros(1, 1, 4, 4, dtype=torch.int64), torch.ones(2, 2), 1, 1, 1, 1, 0, 0, 0, 0)
    with pytest.raises(RuntimeError, match=r"shape \(N, C, H, W\)"):
        host_ops.upfirdn2d(torch.zeros(4, 4), torch.ones(2, 2), 1, 1, 1, 1, 0, 0, 0, 0)
    with pytest.raises(RuntimeError, match="empty output"):
        host_ops.upfirdn2d(torch.zeros(1, 1, 4, 4), torch.ones(2, 2), 1, 1, 1, 1, -3, -3, 0, 0)
    with pytest.raises(RuntimeError, match="up and down must be >= 1"):
        host_ops.upfirdn2d(torch.zeros(1, 1, 4, 4), torch.ones(2, 2), 0, 1, 1, 1, 0, 0, 0, 0)
    with pytest.raises(RuntimeError, match="grad and y must have one shape"):
        host_ops.bias_act_grad(torch.zeros(2, 3), torch.zeros(2, 4), 0.2, 1.0)


@pytest.mark.slow
def test_host_generator_matches_native(compiled, monkeypatch):
    """A whole generator, forward and backward, through the compiled code path."""
    from ipltool.models.stylegan2 import Generator

    # Dispatch sends CPU tensors to the native ops; here they take the compiled path.
    monkeypatch.setattr(upfirdn2d_module, "resolve_impl", lambda impl, x: "cuda")
    monkeypatch.setattr(fused_act, "resolve_impl", lambda impl, x: "cuda")
    torch.manual_seed(0)
    g = Generator(32, 64, 2, channel_multiplier=1).double()
    z = torch.randn(2, 64, dtype=torch.float64)
    noise = g.noise_list(randomize=False)

    def render():
        g.zero_grad(set_to_none=True)
        image = g.synthesis(g.to_w_plus([g.mapping(z)]), noise)
        image.square().mean().backward()
        return image.detach(), [p.grad.clone() for p in g.parameters() if p.grad is not None]

    fast_image, fast_grads = render()
    monkeypatch.setattr(upfirdn2d_module, "resolve_impl", lambda impl, x: "native")
    monkeypatch.setattr(fused_act, "resolve_impl", lambda impl, x: "native")
    native_image, native_grads = render()
    torch.testing.assert_close(fast_image, native_image, rtol=1e-10, atol=1e-10)
    assert len(fast_grads) == len(native_grads) > 10
    for a, b in zip(fast_grads, native_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------
# The real CUDA build


def _cuda_toolkit_or_skip():
    if build.find_cuda_home() is None:
        pytest.skip("needs the CUDA toolkit (nvcc) to compile the kernels")
    if torch.version.cuda is None:
        pytest.skip("needs a CUDA build of torch")


@pytest.mark.slow
def test_cuda_kernels_compile_and_load(run_cli, monkeypatch, build_cache):
    """`ipl kernels build` compiles csrc/ with nvcc, caches it, and the library imports.

    Without a GPU it builds for sm 9.0 (TORCH_CUDA_ARCH_LIST), as a container build would.
    nvcc takes minutes on two cores, so a successful build is kept in the test build cache
    under its key (sources, torch, CUDA, architectures, Python, flags): a later run with
    the same key starts from that build and checks that the command reuses and loads it;
    any edit of the sources compiles again (IPL_TEST_REBUILD=1 compiles regardless).
    """
    _cuda_toolkit_or_skip()
    if not HAS_GPU:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    target = build.build_target()
    kept = build_cache / "cuda" / target.path.name
    with FileLock(f"{kept}.lock"):
        reuse = (kept / target.library.name).is_file()
        if reuse:
            shutil.copytree(kept, target.path)
        code, out, err = run_cli("kernels", "build", "--json")
        assert code == 0, err
        assert json.loads(out) == {"build": str(target.path), "archs": target.archs, "reused": reuse}
        assert target.library.is_file() and "compiling the CUDA kernels" not in err  # --json silences status lines
        if not reuse:
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(target.path, kept.with_name(kept.name + ".tmp"), dirs_exist_ok=True)
            os.replace(kept.with_name(kept.name + ".tmp"), kept)

    module = build.compile_kernels(target)  # imported from the cache, no compiler run
    assert module.device == "cuda"
    assert {"bias_act", "bias_act_grad", "upfirdn2d"} <= set(dir(module))
    with pytest.raises(RuntimeError, match="x must be on cuda"):
        module.upfirdn2d(torch.zeros(1, 1, 4, 4), torch.ones(2, 2), 1, 1, 1, 1, 0, 0, 0, 0)

    code, out, _ = run_cli("kernels", "build", "--json")
    assert code == 0 and json.loads(out)["reused"] is True
    code, out, _ = run_cli("kernels", "info", "--json")
    assert json.loads(out)["built"] is True


# ----------------------------------------------------------------------------
# On the GPU

CONFIG_F_BLUR = [(512, r) for r in (4, 8, 16, 32, 64)] + [(256, 128), (128, 256), (64, 512), (32, 1024)]
DTYPE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture
def cuda_ops(monkeypatch):
    # The native ops' convolutions would otherwise run in TF32 on Ampere and later GPUs,
    # a 10-bit mantissa: the comparisons below are against true fp32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    os.environ.pop("IPL_KERNELS", None)
    return build.extension()


@gpu
@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCE))
def test_gpu_upfirdn2d_on_config_f_shapes(cuda_ops, dtype):
    tol = DTYPE_TOLERANCE[dtype]
    torch.manual_seed(0)
    blur = torch.tensor([1.0, 3.0, 3.0, 1.0], device="cuda")
    blur = blur[:, None] * blur[None, :] / 64
    for channels, res in CONFIG_F_BLUR:
        cases = [
            (torch.randn(2, channels, 2 * res + 1, 2 * res + 1, device="cuda"), blur * 4, (1, 1), (1, 1), (1, 1, 1, 1)),
            (torch.randn(2, 3, res, res, device="cuda"), blur * 4, (2, 2), (1, 1), (2, 1, 2, 1)),
            (torch.randn(2, channels, 2 * res, 2 * res, device="cuda"), blur, (1, 1), (2, 2), (1, 1, 1, 1)),
        ]
        for x, kernel, up, down, pad in cases:
            x = x.to(dtype).requires_grad_(True)
            fast = upfirdn2d_module._Upfirdn2dCuda.apply(x, kernel, *up, *down, *pad)
            x32 = x.detach().float().requires_grad_(True)
            native = upfirdn2d_module._upfirdn2d_native(x32, kernel, *up, *down, *pad)
            torch.testing.assert_close(fast.float(), native, rtol=tol, atol=tol)
            grad = torch.randn_like(native)
            (fast_grad,) = torch.autograd.grad(fast, x, grad.to(dtype))
            (native_grad,) = torch.autograd.grad(native, x32, grad)
            torch.testing.assert_close(fast_grad.float(), native_grad, rtol=tol, atol=tol * 10)


@gpu
@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCE))
def test_gpu_bias_act_on_config_f_shapes(cuda_ops, dtype):
    tol = DTYPE_TOLERANCE[dtype]
    torch.manual_seed(0)
    shapes = [(2, 512)] + [(2, c, r, r) for c, r in CONFIG_F_BLUR]
    for shape in shapes:
        x = torch.randn(shape, device="cuda").to(dtype).requires_grad_(True)
        bias = torch.randn(shape[1], device="cuda", requires_grad=True)
        fast = fused_act._fused_leaky_relu_cuda(x, bias, 0.2, math.sqrt(2))
        x32 = x.detach().float().requires_grad_(True)
        b32 = bias.detach().to(dtype).float().requires_grad_(True)
        native = fused_act._fused_leaky_relu_native(x32, b32, 0.2, math.sqrt(2))
        torch.testing.assert_close(fast.float(), native, rtol=tol, atol=tol)
        grad = torch.randn_like(native)
        fast_grads = torch.autograd.grad(fast, (x, bias), grad.to(dtype))
        native_grads = torch.autograd.grad(native, (x32, b32), grad)
        # Where x + b is within rounding of 0, the output can round to 0 in fp16 and the
        # slope side is taken: the same inherent ambiguity as at 0 itself, so left out.
        decided = (x32.detach() + b32.detach().view(-1, *([1] * (x.ndim - 2)))).abs() > 1e-3
        torch.testing.assert_close(fast_grads[0].float()[decided], native_grads[0][decided], rtol=tol, atol=tol)
        # The bias gradient sums many elements; compare relative to its size.
        scale = native_grads[1].abs().max().item() + 1
        torch.testing.assert_close(fast_grads[1].float(), native_grads[1], rtol=tol, atol=tol * scale * 10)


@gpu
def test_gpu_double_precision_gradcheck(cuda_ops):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 6, device="cuda", dtype=torch.float64, requires_grad=True)
    for up, down, pad, kshape in GEOMETRIES:
        kernel = torch.rand(*kshape, device="cuda", dtype=torch.float64)

        def op(t):
            return upfirdn2d_module._Upfirdn2dCuda.apply(t, kernel, *up, *down, *pad)

        assert torch.autograd.gradcheck(op, (x,))
        assert torch.autograd.gradgradcheck(op, (x,))
    bias = torch.randn(3, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: fused_act._fused_leaky_relu_cuda(a, b, 0.2, math.sqrt(2)), (x, bias))


@gpu
def test_gpu_generator_is_the_same_with_either_implementation(cuda_ops, monkeypatch):
    from ipltool.models.stylegan2 import Generator

    torch.manual_seed(0)
    g = Generator(256, 512, 8).cuda()
    z = torch.randn(2, 512, device="cuda")
    noise = g.noise_list(randomize=False)
    images = {}
    for impl in ("cuda", "native"):
        monkeypatch.setenv("IPL_KERNELS", impl)
        with torch.no_grad():
            images[impl] = g.synthesis(g.to_w_plus([g.mapping(z)]), noise)
    torch.testing.assert_close(images["cuda"], images["native"], rtol=1e-4, atol=1e-4)
