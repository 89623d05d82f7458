"""The native custom ops against independent, loop-based computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from ipltool.errors import UsageError
from ipltool.kernels import FusedLeakyReLU, fused_leaky_relu, resolve_impl, upfirdn2d


def _upfirdn2d_loops(x, k, up, down, pad):
    """Direct definition: y[i, j] = sum_{a, b} u[i*down + a, j*down + b] * k[kh-1-a, kw-1-b]."""
    n, c, h, w = x.shape
    u = torch.zeros(n, c, h * up, w * up, dtype=torch.float64)
    u[:, :, ::up, ::up] = x.double()
    p0, p1 = pad
    padded = torch.zeros(n, c, h * up + p0 + p1, w * up + p0 + p1, dtype=torch.float64)
    padded[:, :, p0 : p0 + h * up, p0 : p0 + w * up] = u
    kh, kw = k.shape
    out_h = (padded.shape[2] - kh) // down + 1
    out_w = (padded.shape[3] - kw) // down + 1
    y = torch.zeros(n, c, out_h, out_w, dtype=torch.float64)
    kf = k.double()
    for i in range(out_h):
        for j in range(out_w):
            patch = padded[:, :, i * down : i * down + kh, j * down : j * down + kw]
            y[:, :, i, j] = (patch * kf.flip(0, 1)).sum((2, 3))
    return y


@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 1)), (2, 1, (2, 1)), (1, 2, (1, 1)), (2, 2, (1, 2))])
def test_upfirdn2d_matches_definition(up, down, pad):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5)
    k = torch.rand(4, 4)  # asymmetric, so a missing flip would show
    got = upfirdn2d(x, k, up=up, down=down, pad=pad)
    want = _upfirdn2d_loops(x, k, up, down, pad)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_upfirdn2d_negative_pad_crops():
    x = torch.arange(36.0).view(1, 1, 6, 6)
    one = torch.ones(1, 1)
    out = upfirdn2d(x, one, pad=(-1, -2))
    torch.testing.assert_close(out, x[:, :, 1:4, 1:4])


def test_fused_leaky_relu_formula_and_module():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 3, 3)
    b = torch.randn(5)
    want = torch.where(x + b.view(1, 5, 1, 1) >= 0, x + b.view(1, 5, 1, 1), 0.2 * (x + b.view(1, 5, 1, 1))) * math.sqrt(2)
    torch.testing.assert_close(fused_leaky_relu(x, b), want)
    # The negative slope argument is honoured (the reference CPU path ignored it).
    torch.testing.assert_close(fused_leaky_relu(x, b, negative_slope=0.1, scale=1.0), F.leaky_relu(x + b.view(1, 5, 1, 1), 0.1))
    module = FusedLeakyReLU(5)
    assert module.bias.shape == (5,) and torch.count_nonzero(module.bias.detach()) == 0
    torch.testing.assert_close(module(x), F.leaky_relu(x, 0.2) * math.sqrt(2))
    # 2-D inputs (the mapping network) take the bias along dim 1 too.
    x2 = torch.randn(3, 5)
    torch.testing.assert_close(fused_leaky_relu(x2, b), F.leaky_relu(x2 + b, 0.2) * math.sqrt(2))


def test_dispatch_reads_env_and_rejects_unknown(monkeypatch):
    assert resolve_impl() == "native"
    monkeypatch.setenv("IPL_KERNELS", "native")
    assert resolve_impl() == "native"
    monkeypatch.setenv("IPL_KERNELS", "fast")
    with pytest.raises(UsageError, match="IPL_KERNELS"):
        resolve_impl()
    with pytest.raises(UsageError, match="unknown kernel implementation"):
        upfirdn2d(torch.zeros(1, 1, 2, 2), torch.ones(1, 1), impl="warp")
