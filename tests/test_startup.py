"""Commands that compute nothing must not import torch (it alone takes seconds to import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

# Every command that only reads files, metadata or help text. Each runs in the same fresh
# interpreter, in this order, and the first one after which torch is loaded is reported.
LIGHT_COMMANDS = [
    ["--help"],
    ["--version"],
    *([name, "--help"] for name in ("fetch", "train-mapper", "adapt", "stylize", "eval", "plugins")),
    ["prompts", "--help"],
    ["prompts", "list"],
    ["prompts", "show", "disney"],
    ["prompts", "validate", "DOMAIN_FILE"],
    ["kernels", "--help"],
    ["kernels", "info"],
    ["plugins"],
    ["fetch", "--list"],
    ["--json", "fetch", "--list"],
]

_PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from ipltool.cli import main

    results = []
    for args in json.loads(sys.argv[1]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(args)
        results.append({"args": args, "code": code, "torch": "torch" in sys.modules, "err": err.getvalue()[-300:]})
    print(json.dumps(results))
    """
)


def test_light_commands_never_import_torch(tmp_path):
    domain_file = Path(__file__).resolve().parents[1] / "src" / "ipltool" / "domains" / "disney.toml"
    commands = [[str(domain_file) if a == "DOMAIN_FILE" else a for a in args] for args in LIGHT_COMMANDS]
    env = {**os.environ, "IPL_CACHE": str(tmp_path / "cache"), "IPL_DOMAINS_DIR": str(tmp_path / "domains"), "COLUMNS": "120"}
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(commands)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for result in results:
        assert result["code"] == 0, f"ipl {' '.join(result['args'])} failed: {result['err']}"
        assert not result["torch"], f"`ipl {' '.join(result['args'])}` imported torch"


def test_kernel_facts_without_torch_match_torch():
    """`ipl kernels info` reads torch's version file instead of importing torch: the values must agree."""
    probe = "import json, sys; from ipltool.kernels import build; print(json.dumps([build.torch_versions(), 'torch' in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    (version, cuda), imported = json.loads(done.stdout)
    import torch

    assert not imported
    assert (version, cuda) == (torch.__version__, torch.version.cuda)


def test_gpu_is_read_from_the_driver_without_torch(tmp_path):
    """Without torch loaded, the first visible GPU comes from nvidia-smi, honouring CUDA_VISIBLE_DEVICES."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n[ "$2" = "3" ] && echo "NVIDIA H200, 9.0" && exit 0\necho "No devices were found"; exit 6\n')
    fake.chmod(0o755)
    probe = "import json; from ipltool.kernels import build; print(json.dumps([build.visible_gpu(), build.cuda_archs()]))"

    def run(visible: str | None):
        env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
        env.pop("TORCH_CUDA_ARCH_LIST", None)
        env.pop("CUDA_VISIBLE_DEVICES", None)
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)

    done = run("3,1")
    assert json.loads(done.stdout) == [["NVIDIA H200", "9.0"], "9.0"]
    for hidden in ("", "-1", "0"):  # none visible, or a device the driver does not have
        done = run(hidden)
        assert done.returncode == 1 and "no CUDA device to compile the kernels for" in done.stderr
