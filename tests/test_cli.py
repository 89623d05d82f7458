"""The `ipl` command line as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_only_working_commands(run_cli):
    code, out, _ = run_cli("--help")
    assert code == 0
    for working in ("prompts", "plugins", "train-mapper", "adapt", "fetch", "stylize", "eval", "kernels"):
        assert f" {working} " in out


def test_version(run_cli):
    from ipltool import __version__

    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"ipl {__version__}"


def test_prompts_list_json_has_the_builtins(run_cli):
    code, out, _ = run_cli("prompts", "list", "--json")
    assert code == 0
    rows = json.loads(out)
    active = {r["name"]: r for r in rows if r["active"]}
    assert len(active) >= 11
    assert active["disney"]["source"] == "photo" and active["disney"]["origin"] == "builtin"
    assert active["tolkien-elf"]["source"] == "human"
    # The global --json flag does the same.
    code, out2, _ = run_cli("--json", "prompts", "list")
    assert json.loads(out2) == rows


def test_prompts_list_table_shows_origin_and_shadowing(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    user = tmp_path / "user-domains"
    user.mkdir(exist_ok=True)
    (user / "disney.toml").write_text('name = "disney"\nsource = "photo"\ntarget = "mine"\ngenerator = "tiny"\n')
    code, out, _ = run_cli("prompts", "list")
    assert code == 0
    assert "user dir" in out and "shadowed by user dir" in out and "built-in" in out


def _toml_loads(text):
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    return tomllib.loads(text)


def test_prompts_show_prints_complete_toml(run_cli):
    code, out, _ = run_cli("prompts", "show", "disney")
    assert code == 0
    data = _toml_loads(out)
    assert data["target"] == "disney" and data["adapt"]["auto_layer_k"] == 12
    assert data["loss"]["lambda_custom"] == 0.2 and data["mapper"]["kind"] == "mlp"
    assert data["clip"] == [{"model": "ViT-B/32", "pretrained": "openai", "weight": 1.0}]


def test_prompts_show_accepts_a_file_and_fills_defaults(run_cli, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\nsource = "photo"\ntarget = "oil painting"\ngenerator = "stylegan2-afhqdog-512"\n')
    code, out, _ = run_cli("prompts", "show", str(path), "--json")
    assert code == 0
    data = json.loads(out)["domain"]
    assert data["adapt"]["auto_layer_k"] == 10 and data["adapt"]["steps"] == 300 and data["ctx_init"] == "a photo of a"


def test_validate_builtin_files(run_cli):
    files = sorted(str(p) for p in (ROOT / "domains").glob("*.toml"))
    assert len(files) >= 11
    code, out, _ = run_cli("prompts", "validate", *files)
    assert code == 0
    assert out.count("ok") >= 11


BROKEN = {
    "bad_toml.toml": ('name = "x"\nsource = [\n', "invalid TOML"),
    "unknown_key.toml": ('name = "x"\nsource = "photo"\ntarget = "t"\ngenerator = "tiny"\nlambda = 1\n', "unknown key 'lambda'"),
    "wrong_type.toml": ('name = "x"\nsource = "photo"\ntarget = "t"\ngenerator = "tiny"\n[adapt]\nbatch = "two"\n', "key 'adapt.batch'"),
    "no_target.toml": ('name = "x"\nsource = "photo"\ngenerator = "tiny"\n', "missing required key 'target'"),
}


def test_validate_broken_files_one_line_each_exit_2(run_cli, tmp_path):
    paths = []
    for name, (text, _) in BROKEN.items():
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    code, out, err = run_cli("prompts", "validate", *paths)
    assert code == 2
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == len(BROKEN)
    for line, (name, (_, needle)) in zip(lines, BROKEN.items()):
        assert name in line and needle in line
    assert "Traceback" not in out + err
    assert "4 of 4 domain file(s) invalid" in err


def test_show_unknown_domain_is_a_usage_error(run_cli):
    code, out, err = run_cli("prompts", "show", "nope")
    assert code == 2
    assert "unknown domain 'nope'" in err and "hint:" in err and "disney" in err
    assert "Traceback" not in err


def test_bad_device_and_bad_option(run_cli):
    code, _, err = run_cli("--device", "tpu", "prompts", "list")
    assert code == 2 and "invalid device 'tpu'" in err
    code, _, err = run_cli("prompts", "list", "--colour")
    assert code == 2 and "--colour" in err


def test_device_resolution():
    import torch

    from ipltool.devices import resolve_device
    from ipltool.errors import UsageError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_unexpected_errors_are_one_line_unless_debug(run_cli, monkeypatch):
    from ipltool import domain

    def boom():
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(domain, "user_domain_dir", boom)
    code, _, err = run_cli("prompts", "list")
    assert code == 1 and "unexpected RuntimeError: disk on fire" in err and "Traceback" not in err
    code, _, err = run_cli("--debug", "prompts", "list")
    assert code == 1 and "Traceback" in err


def test_console_script_end_to_end(tmp_path):
    """The installed `ipl` script: exit codes and no traceback for bad input."""
    env = {**os.environ, "IPL_DOMAINS_DIR": str(tmp_path), "IPL_PLUGINS": ""}
    ok = subprocess.run(["ipl", "prompts", "show", "disney"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and 'target = "disney"' in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [\n")
    res = subprocess.run(["ipl", "prompts", "validate", str(bad)], capture_output=True, text=True, env=env)
    assert res.returncode == 2
    assert "invalid TOML" in res.stdout and "Traceback" not in res.stderr
