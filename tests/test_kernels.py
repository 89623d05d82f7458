"""The custom ops: the native ones against loop-based definitions; dispatch, fallback and the build cache.

The compiled kernels themselves are checked in test_kernels_compiled.py.
"""

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ipltool.errors import UsageError
from ipltool.kernels import FusedLeakyReLU, KernelBuildError, build, dispatch, fused_leaky_relu, resolve_impl
from ipltool.kernels.upfirdn2d import upfirdn2d

# Stands in for a CUDA tensor where only the device matters (these machines have no GPU).
FAKE_CUDA = SimpleNamespace(is_cuda=True, device="cuda:0")


def _failing_build(counter=None):
    def extension():
        if counter is not None:
            counter.append(1)
        raise KernelBuildError("no CUDA toolkit (nvcc) found to compile the kernels", hint="set CUDA_HOME")

    return extension


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
    assert dispatch.kernel_choice() == "auto"
    assert resolve_impl() == "native"
    monkeypatch.setenv("IPL_KERNELS", "native")
    assert resolve_impl() == "native"
    monkeypatch.setenv("IPL_KERNELS", "fast")
    with pytest.raises(UsageError, match="IPL_KERNELS"):
        resolve_impl()
    with pytest.raises(UsageError, match="unknown kernel implementation"):
        upfirdn2d(torch.zeros(1, 1, 2, 2), torch.ones(1, 1), impl="warp")


def test_auto_runs_cpu_tensors_natively_without_building(monkeypatch):
    monkeypatch.setattr(build, "extension", lambda: pytest.fail("auto must not build for a CPU tensor"))
    x = torch.randn(2, 3, 4, 4)
    assert resolve_impl(None, x) == "native"
    torch.testing.assert_close(fused_leaky_relu(x, torch.zeros(3)), F.leaky_relu(x, 0.2) * math.sqrt(2))
    assert upfirdn2d(x, torch.ones(1, 1)).shape == x.shape


def test_cuda_choice_refuses_cpu_tensors(monkeypatch):
    monkeypatch.setenv("IPL_KERNELS", "cuda")
    with pytest.raises(UsageError, match="run on CUDA tensors, this one is on cpu"):
        upfirdn2d(torch.zeros(1, 1, 4, 4), torch.ones(2, 2))
    with pytest.raises(UsageError, match="CUDA tensors"):
        fused_leaky_relu(torch.zeros(2, 3), torch.zeros(3))


def test_auto_falls_back_with_one_warning(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(build, "extension", _failing_build(calls))
    assert resolve_impl(None, FAKE_CUDA) == "native"
    assert resolve_impl("auto", FAKE_CUDA) == "native"
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert "no CUDA toolkit (nvcc) found" in err and "native PyTorch ops" in err and "set CUDA_HOME" in err
    assert len(calls) == 2  # build.extension() itself remembers the failure (tested below)


def test_cuda_choice_fails_instead_of_falling_back(monkeypatch, capsys):
    monkeypatch.setattr(build, "extension", _failing_build())
    with pytest.raises(KernelBuildError, match="no CUDA toolkit"):
        resolve_impl("cuda", FAKE_CUDA)
    assert "warning" not in capsys.readouterr().err


def test_cuda_choice_with_unsupported_arguments_is_an_error():
    with pytest.raises(ValueError, match="negative_slope >= 0"):
        fused_leaky_relu(torch.zeros(2, 3), negative_slope=-0.1, impl="cuda")
    kernel = torch.ones(2, 2, requires_grad=True)
    with pytest.raises(ValueError, match="no gradient for the kernel"):
        upfirdn2d(torch.zeros(1, 1, 4, 4), kernel, impl="cuda")
    # auto leaves such calls to the native op, which supports them.
    assert upfirdn2d(torch.zeros(1, 1, 4, 4), kernel).requires_grad


def test_native_activation_keeps_the_input_dtype():
    x = torch.randn(2, 3, 4, 4).bfloat16()
    assert fused_leaky_relu(x, torch.randn(3)).dtype == torch.bfloat16


def test_extension_remembers_a_failed_build(monkeypatch):
    calls = []

    def compile_kernels():
        calls.append(1)
        raise KernelBuildError("boom")

    monkeypatch.setattr(build, "compile_kernels", compile_kernels)
    for _ in range(3):
        with pytest.raises(KernelBuildError, match="boom"):
            build.extension()
    assert len(calls) == 1
    build.forget()
    with pytest.raises(KernelBuildError):
        build.extension()
    assert len(calls) == 2


# ----------------------------------------------------------------------------
# The build cache


def test_build_key_follows_sources_and_architectures(monkeypatch, tmp_path):
    a = build.build_target("9.0")
    assert a == build.build_target("9.0")
    assert a.path.parent == Path(os.environ["IPL_CACHE"]) / "kernels"
    assert build.build_target("8.0").key != a.key
    sources = tmp_path / "csrc"
    sources.mkdir()
    for name in build.SOURCES + build.HEADERS:
        (sources / name).write_bytes((build.SOURCE_DIR / name).read_bytes())
    monkeypatch.setattr(build, "SOURCE_DIR", sources)
    assert build.build_target("9.0").key == a.key
    (sources / "upfirdn2d.h").write_text((sources / "upfirdn2d.h").read_text() + "\n// edited\n")
    assert build.build_target("9.0").key != a.key


def test_architectures_come_from_the_env_or_the_gpu(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6;9.0")
    assert build.cuda_archs() == "8.6;9.0"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KernelBuildError, match="no CUDA device") as info:
        build.cuda_archs()
    assert "TORCH_CUDA_ARCH_LIST" in info.value.hint


def test_cuda_home_skips_wrapper_scripts(monkeypatch, tmp_path):
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "bin" / "nvcc").write_text("")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    wrapper = tmp_path / "wrapper" / "bin"
    wrapper.mkdir(parents=True)
    (wrapper / "nvcc").write_text(f"#!/bin/sh\nexec {toolkit}/bin/nvcc \"$@\"\n")
    (wrapper / "nvcc").chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper))
    real = build.find_cuda_home()
    assert real is None or (real / "include" / "cuda_runtime.h").is_file()  # never the wrapper's parent
    assert real != wrapper.parent
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    (link_dir / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    monkeypatch.setenv("PATH", str(link_dir))
    assert build.find_cuda_home() == toolkit
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "chosen"))
    assert build.find_cuda_home() == tmp_path / "chosen"


def _fake_toolkit(monkeypatch, tmp_path):
    toolkit = tmp_path / "toolkit"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "bin" / "nvcc").write_text("")
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    monkeypatch.setattr(torch.version, "cuda", "13.0", raising=False)


def test_failed_build_keeps_the_log_and_leaves_no_folder(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    _fake_toolkit(monkeypatch, tmp_path)

    def load(**kwargs):
        Path(kwargs["build_directory"], "half-written.o").write_text("")
        raise RuntimeError("Error building extension 'ipl_kernels': [1/3] nvcc ...\nops.cu(12): error: identifier \"x\" is undefined\nninja: build stopped")

    monkeypatch.setattr(cpp_extension, "load", load)
    target = build.build_target("9.0")
    lines = []
    with pytest.raises(KernelBuildError, match='ops.cu\\(12\\): error: identifier "x" is undefined') as info:
        build.compile_kernels(target, announce=lines.append)
    assert str(target.log) in info.value.hint and "IPL_KERNELS=native" in info.value.hint
    assert "ninja: build stopped" in target.log.read_text()
    assert not target.path.exists()
    assert [p.name for p in target.path.parent.iterdir() if p.is_dir()] == []  # no staging folder left
    assert len(lines) == 1 and "compiling the CUDA kernels" in lines[0]

    # The next run reports the failure at once instead of compiling for minutes again...
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("retried a failed build"))
    with pytest.raises(KernelBuildError, match="an earlier build of the CUDA kernels failed: ops.cu") as info:
        build.compile_kernels(target, announce=lines.append)
    assert "ipl kernels build" in info.value.hint
    # ...until it is asked to retry, as `ipl kernels build` does.
    monkeypatch.setattr(cpp_extension, "load", load)
    with pytest.raises(KernelBuildError, match="compiling the CUDA kernels failed"):
        build.compile_kernels(target, announce=lines.append, retry_failed=True)


def test_successful_build_is_moved_into_place_and_reused(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    _fake_toolkit(monkeypatch, tmp_path)
    seen = {}

    def load(**kwargs):
        seen.update(kwargs, arch_env=os.environ["TORCH_CUDA_ARCH_LIST"])
        Path(kwargs["build_directory"], f"{build.NAME}.so").write_bytes(b"binary")
        return "fresh module"

    monkeypatch.setattr(cpp_extension, "load", load)
    target = build.build_target("8.0;9.0")
    stale = target.path.parent / f".{target.path.name}-killed"  # staging of a build killed earlier
    (stale / "sub").mkdir(parents=True)
    lines = []
    assert build.compile_kernels(target, announce=lines.append) == "fresh module"
    assert not stale.exists()
    assert seen["arch_env"] == "8.0;9.0" and "TORCH_CUDA_ARCH_LIST" not in os.environ
    assert seen["name"] == build.NAME and Path(seen["build_directory"]) != target.path
    assert target.library.read_bytes() == b"binary"
    assert "compiled in" in lines[-1] and str(target.path) in lines[-1]
    assert build.cached_builds() == [target.path]

    # The second use imports the cached library without compiling.
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("rebuilt a cached build"))
    monkeypatch.setattr(build, "_import", lambda t: f"cached {t.key}")
    assert build.compile_kernels(target, announce=lines.append) == f"cached {target.key}"
    assert build.clear_cache() == len(b"binary")
    assert not build.cache_root().exists()


def test_interrupted_build_leaves_no_staging_folder(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    _fake_toolkit(monkeypatch, tmp_path)

    def load(**kwargs):
        Path(kwargs["build_directory"], "partial.o").write_text("")
        raise KeyboardInterrupt

    monkeypatch.setattr(cpp_extension, "load", load)
    target = build.build_target("9.0")
    with pytest.raises(KeyboardInterrupt):
        build.compile_kernels(target, announce=lambda line: None)
    assert [p for p in target.path.parent.iterdir() if p.is_dir()] == []


def test_torch_without_cuda_is_named(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None, raising=False)
    with pytest.raises(KernelBuildError, match="built without CUDA"):
        build.compile_kernels(build.build_target("9.0"))


def test_broken_cached_library_says_how_to_clear(tmp_path):
    target = build.build_target("9.0")
    target.path.mkdir(parents=True)
    target.library.write_bytes(b"not a shared object")
    with pytest.raises(KernelBuildError, match="do not load") as info:
        build._import(target)
    assert "ipl kernels clear" in info.value.hint


# ----------------------------------------------------------------------------
# The command line


def test_kernels_flag_and_env_are_validated(run_cli, monkeypatch):
    code, _, err = run_cli("--kernels", "fast", "prompts", "list")
    assert code == 2 and "unknown kernel implementation 'fast'" in err
    monkeypatch.setenv("IPL_KERNELS", "warp")
    code, _, err = run_cli("prompts", "list")
    assert code == 2 and "IPL_KERNELS" in err and "Traceback" not in err


def test_kernels_flag_sets_the_choice(run_cli):
    code, out, _ = run_cli("--kernels", "native", "kernels", "info", "--json")
    assert code == 0
    import json

    status = json.loads(out)
    assert status["choice"] == "native" and status["uses"].startswith("native")


def test_kernels_info_explains_the_cpu_case(run_cli, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    code, out, _ = run_cli("kernels", "info")
    assert code == 0
    assert "no CUDA device" in out and "TORCH_CUDA_ARCH_LIST" in out


def test_kernels_build_and_clear_commands(run_cli, monkeypatch):
    compiled = []
    monkeypatch.setattr(build, "compile_kernels", lambda target, verbose=False, retry_failed=False: compiled.append((target.archs, verbose, retry_failed)))
    code, out, _ = run_cli("kernels", "build", "--arch", "9.0", "--verbose")
    assert code == 0 and compiled == [("9.0", True, True)] and "kernels for sm 9.0 built" in out
    target = build.build_target("9.0")
    target.path.mkdir(parents=True)
    target.library.write_bytes(b"12345")
    code, out, _ = run_cli("kernels", "clear")
    assert code == 0 and "removed 5 bytes" in out and not target.path.exists()
    code, _, err = run_cli("kernels", "build", "--arch", " ")
    assert code == 2 and "--arch is empty" in err


def test_strict_cuda_fails_before_a_run_directory_exists(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli("--kernels", "cuda", "adapt", "--domain", "disney", "--smoke", "--out", str(tmp_path / "runs"))
    assert code == 2 and "this run is on cpu" in err
    assert not (tmp_path / "runs").exists()


def test_strict_cuda_builds_up_front_on_a_gpu(monkeypatch):
    from ipltool.kernels.dispatch import check_device

    monkeypatch.setenv("IPL_KERNELS", "cuda")
    monkeypatch.setattr(build, "extension", _failing_build())
    with pytest.raises(KernelBuildError):
        check_device(torch.device("cuda", 0))
    monkeypatch.setenv("IPL_KERNELS", "auto")
    check_device(torch.device("cuda", 0))  # auto builds lazily, on the first CUDA op
