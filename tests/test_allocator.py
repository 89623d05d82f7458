"""`ipl --malloc` / `IPL_MALLOC`: glibc's defaults, or freed CPU blocks kept for reuse (`ipltool.allocator`)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from ipltool import allocator
from ipltool.cli import main
from ipltool.errors import UsageError

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
BLOCK_PAGES = 64 * 2**20 // 4096

# Runs `ipl [--malloc ...] prompts list` in-process (the global options apply the choice),
# then allocates, touches and frees a 64 MiB tensor (above glibc's largest automatic mmap
# threshold, 32 MiB) forty times, as training steps do with their activations, and reports
# the page faults of the last ten rounds. (With blocks kept, the first rounds still grow
# the heap: torch asks for aligned blocks a little larger than a freed one.)
_PROBE = textwrap.dedent(
    """
    import contextlib, io, json, resource, sys
    from ipltool import allocator
    from ipltool.cli import main
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(json.loads(sys.argv[1]))
    import torch
    for round in range(40):
        if round == 30:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(16 * 2**20)  # 64 MiB of float32
        block.fill_(1.0)
        del block
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"code": code, "applied": allocator.apply_malloc_choice(), "faults": faults, "err": err.getvalue()}))
    """
)


def _probe(args: list[str], **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("IPL_MALLOC", "LD_PRELOAD", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
    cmd = [sys.executable, "-c", _PROBE, json.dumps([*args, "prompts", "list"])]
    out = subprocess.run(cmd, env={**clean, **env}, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_reuse_keeps_freed_blocks_mapped_and_system_is_the_default():
    default, flag, env = _probe([]), _probe(["--malloc", "reuse"]), _probe([], IPL_MALLOC="reuse")
    assert (default["code"], flag["code"], env["code"]) == (0, 0, 0)
    assert (default["applied"], flag["applied"], env["applied"]) == ("system", "reuse", "reuse")
    # glibc's defaults unmap each block on free, so every round faults all its pages again;
    # with the thresholds lifted, pages mapped in earlier rounds serve these.
    assert default["faults"] >= 9 * BLOCK_PAGES
    assert flag["faults"] <= 2 * BLOCK_PAGES and env["faults"] <= 2 * BLOCK_PAGES


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_the_users_own_malloc_settings_are_left_alone_and_said_so():
    tuned = _probe(["--malloc", "reuse"], MALLOC_TRIM_THRESHOLD_="131072")
    assert tuned["applied"] == "user" and tuned["faults"] >= 9 * BLOCK_PAGES
    assert "MALLOC_TRIM_THRESHOLD_ sets the allocator already" in tuned["err"]
    assert _probe(["--malloc", "reuse"], GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536")["applied"] == "user"


def test_unknown_choice_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv("IPL_MALLOC", "sytem")
    with pytest.raises(UsageError) as caught:
        allocator.malloc_choice()
    assert "unknown IPL_MALLOC value 'sytem' — did you mean 'system'?" in caught.value.message
    with pytest.raises(UsageError) as caught:
        allocator.malloc_choice("resue")
    assert "unknown --malloc value 'resue'" in caught.value.message and "reuse" in caught.value.hint


@pytest.mark.parametrize("args,env", [(["--malloc", "jemalloc"], None), ([], "jemalloc")])
def test_cli_refuses_a_bad_choice_in_one_line_before_any_work(monkeypatch, capsys, args, env):
    monkeypatch.setenv("IPL_MALLOC", env or "system")
    assert main([*args, "prompts", "list"]) == 2
    captured = capsys.readouterr()
    assert "value 'jemalloc'" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_default_and_case_insensitive_choice(monkeypatch):
    monkeypatch.delenv("IPL_MALLOC", raising=False)
    assert allocator.malloc_choice() == "system"
    monkeypatch.setenv("IPL_MALLOC", " Reuse ")
    assert allocator.malloc_choice() == "reuse"
    assert allocator.malloc_choice("SYSTEM") == "system"
