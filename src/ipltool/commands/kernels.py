"""`ipl kernels`: what the compiled CUDA kernels need, building them ahead of time, clearing their cache."""

from __future__ import annotations

import subprocess
from typing import Optional

import typer
from rich.filesize import decimal

from ipltool import console
from ipltool.errors import UsageError
from ipltool.kernels import build, dispatch

app = typer.Typer(
    help="The compiled CUDA kernels (fused bias + leaky ReLU, upfirdn2d): check, build, clear.",
    no_args_is_help=True,
    epilog=(
        "IPL_KERNELS=auto (default) uses them on CUDA tensors and falls back to the native PyTorch ops with one "
        "warning; native never uses them; cuda fails instead of falling back. See docs/troubleshooting.md."
    ),
)


def _nvcc_version(home) -> str | None:
    nvcc = next(iter(sorted((home / "bin").glob("nvcc*"))), None) if home else None
    if nvcc is None:
        return None
    try:
        text = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    release = [line for line in text.splitlines() if "release" in line]
    return release[0].split("release", 1)[1].strip() if release else None


def _status() -> dict:
    # No torch import here: `ipl kernels info` answers from torch's version file and the driver.
    torch_version, torch_cuda = build.torch_versions()
    visible = build.visible_gpu()
    gpu = visible[0] if visible else None
    home = build.find_cuda_home()
    try:
        archs, arch_error = build.cuda_archs(), None
    except build.KernelBuildError as err:
        archs, arch_error = None, f"{err.message}: {err.hint}"
    target = build.build_target(archs) if archs else None
    choice = dispatch.kernel_choice()
    if choice == "native":
        verdict = "native: IPL_KERNELS=native"
    elif gpu is None:
        verdict = "native: no CUDA device (the compiled kernels run on CUDA tensors only)"
    else:
        verdict = "cuda" + (" (cached)" if target and target.library.is_file() else " (compiled on first use)")
    return {
        "choice": choice,
        "uses": verdict,
        "torch": torch_version,
        "torch_cuda": torch_cuda,
        "gpu": gpu,
        "cuda_home": str(home) if home else None,
        "nvcc": _nvcc_version(home),
        "archs": archs,
        "archs_error": arch_error,
        "cache_dir": str(build.cache_root()),
        "build": str(target.path) if target else None,
        "built": bool(target and target.library.is_file()),
        "cached_builds": [str(path) for path in build.cached_builds()],
    }


@app.command("info")
def info(json_output: bool = console.json_option("Print JSON instead of a table.")) -> None:
    """Show which implementation runs here and why, the toolchain, and the kernel cache."""
    status = _status()
    if console.wants_json(json_output):
        console.print_json(status)
        return
    rows = [
        ("IPL_KERNELS", status["choice"]),
        ("runs", status["uses"]),
        ("torch", f"{status['torch']} (CUDA {status['torch_cuda'] or 'none'})"),
        ("GPU", status["gpu"] or "none"),
        ("CUDA toolkit", f"{status['cuda_home']} (nvcc {status['nvcc'] or '?'})" if status["cuda_home"] else "not found (set CUDA_HOME)"),
        ("architectures", status["archs"] or status["archs_error"]),
        ("this build", f"{status['build']} ({'built' if status['built'] else 'not built yet'})" if status["build"] else "-"),
        ("cached builds", str(len(status["cached_builds"]))),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:  # plain lines: paths must not be cut to the terminal width
        console.out.print(f"[bold]{name:<{width}}[/]  {value}")


@app.command("build")
def build_command(
    arch: Optional[str] = typer.Option(None, "--arch", help="GPU architectures, e.g. 9.0 or '8.0;9.0' (default: TORCH_CUDA_ARCH_LIST, else this GPU's)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show the compiler commands and their output."),
    json_output: bool = console.json_option(),
) -> None:
    """Compile the kernels now (for example in a container image) instead of on first use.

    Works without a GPU when the architectures are given (--arch or TORCH_CUDA_ARCH_LIST).
    A build that already exists in the cache is reused; one that failed before is retried
    (other commands only report the earlier failure, to avoid a long failing build per run).
    """
    if arch is not None and not arch.strip():
        raise UsageError("--arch is empty", hint="e.g. --arch 9.0")
    target = build.build_target(arch.strip() if arch else None)
    was_built = target.library.is_file()
    build.compile_kernels(target, verbose=verbose, retry_failed=True)
    if console.wants_json(json_output):
        console.print_json({"build": str(target.path), "archs": target.archs, "reused": was_built})
    else:
        console.out.print(f"kernels for sm {target.archs} {'already built' if was_built else 'built'}: {target.path}")


@app.command("clear")
def clear() -> None:
    """Delete every cached build of the kernels (they are compiled again on next use)."""
    freed = build.clear_cache()
    console.out.print(f"removed {decimal(freed)} from {build.cache_root()}")
