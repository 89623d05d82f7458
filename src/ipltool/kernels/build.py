"""Compile the C++/CUDA kernels on first CUDA use, into a cache keyed by what the binary depends on.

Nothing here runs at import: `import ipltool` and `ipl --help` work without a compiler
or a GPU. The first CUDA call builds `csrc/` with `torch.utils.cpp_extension.load`
(ninja) into a staging folder, which is renamed into place only once the build has
succeeded, under a file lock, so concurrent runs build once and an interrupted build
leaves nothing half-written. Later runs import the cached library directly, without
ninja. The cache key hashes the sources, the torch and CUDA versions, the target GPU
architectures and the Python version, so an upgrade of any of them builds anew.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

from ipltool import paths
from ipltool.errors import IplError, first_line

NAME = "ipl_kernels"
SOURCE_DIR = Path(__file__).with_name("csrc")
SOURCES = ("bindings.cpp", "ops.cu")
HEADERS = ("common.h", "bias_act.h", "upfirdn2d.h", "ops.h")
CXX_FLAGS = ("-O3",)
# No --use_fast_math: the kernels must match the native ops, which use IEEE division and exp.
CUDA_FLAGS = ("-O3",)
TROUBLESHOOTING = "docs/troubleshooting.md#compiled-kernels"


class KernelBuildError(IplError):
    """The compiled kernels cannot be built or loaded here (no toolkit, no GPU, a compiler error)."""


@dataclass(frozen=True)
class BuildTarget:
    """One build of the kernels: the GPU architectures it is for and its cache folder."""

    archs: str
    key: str
    path: Path

    @property
    def library(self) -> Path:
        """The compiled Python extension inside the cache folder."""
        return self.path / f"{NAME}{'.pyd' if os.name == 'nt' else '.so'}"

    @property
    def log(self) -> Path:
        """Where the compiler output of a failed build is kept (beside the cache folder)."""
        return self.path.with_name(self.path.name + ".log")


def cache_root() -> Path:
    """`<IPL_CACHE>/kernels`: every build of the kernels, one folder per key."""
    return paths.cache_dir() / "kernels"


def find_cuda_home() -> Path | None:
    """The CUDA toolkit to compile with: `$CUDA_HOME` or `$CUDA_PATH`, else the first install found.

    torch guesses the toolkit from `which nvcc`, which is wrong when `nvcc` is a wrapper
    script outside the toolkit (as on these machines), so candidates are checked for
    the compiler and the runtime headers.
    """
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            return Path(os.environ[name])
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates += [Path("/usr/local/cuda"), *sorted(Path("/usr/local").glob("cuda-*"), reverse=True)]
    for home in candidates:
        if (home / "include" / "cuda_runtime.h").is_file() and any((home / "bin").glob("nvcc*")):
            return home
    return None


def torch_versions() -> tuple[str, str | None]:
    """`(torch.__version__, torch.version.cuda)` of the installed torch, without importing it.

    `ipl kernels info` must answer in a fraction of a second, and importing torch takes
    seconds, so the values are read from `torch/version.py`. Once torch is imported
    (every command that runs a model), its own attributes are used.
    """
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        return torch.__version__, torch.version.cuda
    spec = importlib.util.find_spec("torch")
    values: dict[str, object] = {}
    if spec is not None and spec.submodule_search_locations:
        version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
        try:
            tree = ast.parse(version_file.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            tree = None
        for node in tree.body if tree else []:
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else getattr(node, "target", None)
            if isinstance(target, ast.Name) and isinstance(getattr(node, "value", None), ast.Constant):
                values[target.id] = node.value.value
    if not isinstance(values.get("__version__"), str):  # an unusual install: ask torch itself
        import torch

        return torch.__version__, torch.version.cuda
    cuda = values.get("cuda")
    return str(values["__version__"]), cuda if isinstance(cuda, str) else None


def visible_gpu() -> tuple[str, str] | None:
    """`(name, "major.minor")` of the GPU torch would run on, or None when there is none.

    With torch imported, torch answers. Without it, the NVIDIA driver's `nvidia-smi` is
    asked about the first device `CUDA_VISIBLE_DEVICES` leaves visible (what torch
    calls `cuda:0`), so `ipl kernels info` needs no torch import.
    """
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability()
        return torch.cuda.get_device_name(), f"{major}.{minor}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = visible.split(",")[0].strip() if visible is not None else "0"
    smi = shutil.which("nvidia-smi")
    if not first or first.startswith("-") or smi is None:
        return None
    try:
        result = subprocess.run(
            [smi, "-i", first, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    line = result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else ""
    name, _, cap = line.rpartition(",")
    return (name.strip(), cap.strip()) if name.strip() and cap.strip() else None


def cuda_archs() -> str:
    """The architectures to compile for: `$TORCH_CUDA_ARCH_LIST`, else the current GPU's.

    Raises:
        KernelBuildError: neither is given (a machine without a GPU and no list).
    """
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if listed:
        return listed
    gpu = visible_gpu()
    if gpu is not None:
        return gpu[1]
    raise KernelBuildError(
        "no CUDA device to compile the kernels for",
        hint="set TORCH_CUDA_ARCH_LIST (e.g. 9.0 for H100) to build without a GPU",
    )


def source_digest() -> str:
    """SHA-256 over the names and bytes of every kernel source and header."""
    digest = hashlib.sha256()
    for name in sorted(SOURCES + HEADERS):
        digest.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    return digest.hexdigest()


def build_target(archs: str | None = None) -> BuildTarget:
    """The cache folder for these sources, this torch and CUDA, these architectures and this Python."""
    torch_version, torch_cuda = torch_versions()
    archs = archs or cuda_archs()
    parts = [
        source_digest(),
        torch_version,
        str(torch_cuda),
        archs,
        f"py{sys.version_info.major}.{sys.version_info.minor}",
        platform.system(),
        platform.machine(),
        " ".join(CXX_FLAGS + CUDA_FLAGS),
    ]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return BuildTarget(archs, key, cache_root() / f"{NAME}-{key}")


def _import(target: BuildTarget) -> ModuleType:
    try:
        spec = importlib.util.spec_from_file_location(NAME, target.library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as err:  # an ImportError with undefined symbols, most often
        raise KernelBuildError(
            f"the cached kernels in {target.path} do not load: {first_line(err)}",
            hint=f"remove them with `ipl kernels clear` and run again (see {TROUBLESHOOTING})",
        ) from None
    return module


@contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _failure_summary(text: str) -> str:
    """The first compiler error line of a build log, else its first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() and not line.lower().startswith("error building extension"):
            return line[:300]
    return lines[0][:300] if lines else "unknown error"


def compile_kernels(
    target: BuildTarget | None = None,
    verbose: bool = False,
    announce: Callable[[str], None] | None = None,
    retry_failed: bool = False,
) -> ModuleType:
    """Import the kernels of `target` (default: this machine's), compiling them first if needed.

    A build that failed before is not retried on every run (it would cost minutes each
    time): its log stays beside the cache folder, and later runs report that failure
    at once until `retry_failed` (`ipl kernels build`) or `ipl kernels clear`.

    Args:
        target: which build (see `build_target`).
        verbose: show the compiler commands and output.
        announce: receives the one status line printed around a compilation
            (default: `ipltool.console.info`).
        retry_failed: compile even when the last attempt for `target` failed.

    Returns:
        The extension module (`bias_act`, `bias_act_grad`, `upfirdn2d`).

    Raises:
        KernelBuildError: no CUDA torch, no toolkit, or the compiler failed. The full
            compiler output is kept in `target.log`.
    """
    import torch
    from filelock import FileLock

    if announce is None:
        from ipltool import console

        announce = console.info
    if torch.version.cuda is None:
        raise KernelBuildError(
            f"this torch ({torch.__version__}) is built without CUDA",
            hint="install a CUDA build of torch to use the compiled kernels, or set IPL_KERNELS=native",
        )
    target = target or build_target()
    target.path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.path) + ".lock"):
        if target.library.is_file():
            return _import(target)
        if target.log.is_file() and not retry_failed:
            raise KernelBuildError(
                f"an earlier build of the CUDA kernels failed: {_failure_summary(target.log.read_text())}",
                hint=f"fix the cause (log: {target.log}), then retry with `ipl kernels build`; or set IPL_KERNELS=native",
            )
        home = find_cuda_home()
        if home is None:
            raise KernelBuildError(
                "no CUDA toolkit (nvcc) found to compile the kernels",
                hint=f"install the CUDA toolkit for torch's CUDA {torch.version.cuda} and set CUDA_HOME, or set IPL_KERNELS=native",
            )
        # Under the lock, any staging folder of this key is left from a killed build.
        for stale in target.path.parent.glob(f".{target.path.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.path.name}-", dir=target.path.parent))
        announce(f"compiling the CUDA kernels for sm {target.archs} with {home} (first use, a minute or two)...")
        started = time.perf_counter()
        try:
            module = _run_build(target, staging, home, verbose)
        except BaseException:  # a failed build, or Ctrl-C during one
            shutil.rmtree(staging, ignore_errors=True)
            raise
        os.replace(staging, target.path)
        target.log.unlink(missing_ok=True)
        announce(f"CUDA kernels compiled in {time.perf_counter() - started:.0f} s, cached in {target.path}")
        return module


def _run_build(target: BuildTarget, staging: Path, home: Path, verbose: bool) -> ModuleType:
    import logging

    # On import, cpp_extension logs its own toolkit guess, which is replaced just below
    # and would only mislead.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)

    # cpp_extension reads the toolkit location once, at import; point it at the one found.
    cpp_extension.CUDA_HOME = str(home)
    try:
        with _env(TORCH_CUDA_ARCH_LIST=target.archs, CUDA_HOME=str(home)):
            return cpp_extension.load(
                name=NAME,
                sources=[str(SOURCE_DIR / name) for name in SOURCES],
                extra_include_paths=[str(SOURCE_DIR)],
                extra_cflags=list(CXX_FLAGS),
                extra_cuda_cflags=list(CUDA_FLAGS),
                build_directory=str(staging),
                verbose=verbose,
            )
    except Exception as err:
        text = str(err)
        target.log.write_text(text + "\n")
        raise KernelBuildError(
            f"compiling the CUDA kernels failed: {_failure_summary(text)}",
            hint=f"the compiler output is in {target.log}; see {TROUBLESHOOTING}, or set IPL_KERNELS=native",
        ) from None


_lock = threading.Lock()
_module: ModuleType | None = None
_failure: KernelBuildError | None = None


def extension() -> ModuleType:
    """The kernels for this process: compiled or imported on the first call, then reused.

    A failure is remembered too, so a run whose build failed does not retry it on every call.

    Raises:
        KernelBuildError: see `compile_kernels`.
    """
    global _module, _failure
    with _lock:
        if _module is None and _failure is None:
            try:
                _module = compile_kernels()
            except KernelBuildError as err:
                _failure = err
        if _failure is not None:
            raise _failure
        return _module


def forget() -> None:
    """Drop what `extension()` remembers (the tests, and `ipl kernels clear`, use this)."""
    global _module, _failure
    with _lock:
        _module = _failure = None


def cached_builds() -> list[Path]:
    """Every complete build in the cache, newest first."""
    root = cache_root()
    if not root.is_dir():
        return []
    builds = [path for path in root.glob(f"{NAME}-*") if path.is_dir()]
    return sorted(builds, key=lambda path: path.stat().st_mtime, reverse=True)


def clear_cache() -> int:
    """Delete every cached build, staging folder, lock and log; returns the bytes freed."""
    root = cache_root()
    if not root.is_dir():
        return 0
    freed = sum(path.stat().st_size for path in root.rglob("*") if path.is_file())
    shutil.rmtree(root)
    forget()
    return freed
