"""Test harness: user dirs and the cache point at tmp, third-party plugins stay off."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: Where compiled test artefacts (the host build of the kernel cores, the nvcc build) are kept
#: between runs. Their folders are named by a hash of everything the binary depends on, so
#: an edited source builds anew; `IPL_TEST_REBUILD=1` builds everything in a fresh folder.
BUILD_CACHE_ENV = "IPL_TEST_BUILD_CACHE"


def pytest_configure(config):
    """Under pytest-xdist, split the cores between the workers instead of each taking all of them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ["OMP_NUM_THREADS"] = threads  # also for the `ipl` subprocesses some tests start
        import torch

        torch.set_num_threads(int(threads))


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Each test gets its own user domain dir and cache, stays offline, and loads no third-party plugin."""
    monkeypatch.setenv("IPL_DOMAINS_DIR", str(tmp_path / "user-domains"))
    monkeypatch.setenv("IPL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("IPL_PLUGINS", "")
    monkeypatch.setenv("IPL_OFFLINE", "1")  # no test touches the network unless it says so
    # Set, then removed: monkeypatch then restores it even when `ipl --kernels` sets it.
    monkeypatch.setenv("IPL_KERNELS", "auto")
    monkeypatch.delenv("IPL_KERNELS")
    monkeypatch.delenv("IPL_DEBUG", raising=False)
    from ipltool import console
    from ipltool.kernels import build, dispatch

    console.reset()  # no --json/--quiet left over from a command another test ran in-process
    build.forget()  # no compiled kernels or build failure carried over from another test
    dispatch.reset_warning()
    yield


@pytest.fixture
def run_cli(capsys):
    """Run `ipl ARGS...` in-process; returns (exit_code, stdout, stderr)."""
    from ipltool.cli import main

    def run(*args: str):
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="module")
def stage2_models():
    """(source generator, CLIP, prompt encoder, untrained mlp mapper): the tiny random networks of stage 2."""
    import torch

    from ipltool import registry
    from ipltool.models.clip import PromptEncoder, load_clip
    from ipltool.models.stylegan2 import TINY_CONFIG, build_generator

    clip = load_clip("tiny")
    source = build_generator(TINY_CONFIG, seed=0, noise_strength=0.1).eval().requires_grad_(False)
    prompts = PromptEncoder(clip, "a photo of a")
    torch.manual_seed(0)
    mapper = registry.build_mapper("mlp", prompts.n_ctx, prompts.dim, TINY_CONFIG.style_dim)
    return source, clip, prompts, mapper


@pytest.fixture(scope="session")
def build_cache(tmp_path_factory) -> Path:
    """The persistent folder for compiled test artefacts (`$IPL_TEST_BUILD_CACHE`, else the user cache dir).

    With `IPL_TEST_REBUILD=1` it is an empty temporary folder instead, so everything compiles afresh.
    """
    import platformdirs

    if os.environ.get("IPL_TEST_REBUILD", "") not in ("", "0"):
        return tmp_path_factory.mktemp("fresh-builds")
    root = Path(os.environ.get(BUILD_CACHE_ENV) or Path(platformdirs.user_cache_dir("ipltool")) / "test-builds")
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def ipl_at():
    """`run(root, *args)`: `ipl ARGS` in-process, offline, with its cache under `root`; returns the exit code.

    For module-scoped fixtures, which cannot use the per-test environment of `isolated_env`.
    """
    return _ipl_at


def _ipl_at(root: Path, *args: str) -> int:
    from ipltool.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IPL_OFFLINE", "1")
        mp.setenv("IPL_CACHE", str(root / "cache"))
        mp.setenv("IPL_PLUGINS", "")
        return main(list(args))


@pytest.fixture(scope="session")
def make_smoke_runs():
    """`make(root, steps)`: an IPL and a NADA `--smoke` adapt run of disney under `root` (a few seconds each)."""
    return _make_smoke_runs


def _make_smoke_runs(root: Path, steps: int) -> list[Path]:
    for method in ("ipl", "nada"):
        args = ["--quiet", "adapt", "--domain", "disney", "--smoke", "--method", method, "--steps", str(steps), "--out", str(root / method)]
        assert _ipl_at(root, *args) == 0
    return [next((root / method).iterdir()) for method in ("ipl", "nada")]
