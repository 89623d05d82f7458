"""Fault injection: a run killed (SIGKILL), stopped (SIGTERM, Ctrl-C) or crashed at any step, then resumed,
ends bit for bit where an uninterrupted run ends (issue 14, sections 6 and 7).

`ipl adapt` is killed with SIGKILL at seeded random points of its step log, in a subprocess
(nothing of the dying process can help); `ipl train-mapper` is stopped with SIGTERM, in a
subprocess and in-process, and crashed in-process. The resumes run in-process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ipltool.train import stage1_run
from ipltool.train.run import RunDir

#: A smoke adapt: 3 mapper steps, then 8 adaptation steps, a state every 2 steps of each stage.
ADAPT = ("--domain", "disney", "--smoke", "--steps", "8", "--save-every", "2")
ADAPT_RECORDS = 3 + 8
TRAIN_MAPPER = ("--domain", "disney", "--smoke", "--steps", "8", "--save-every", "3")


def _ipl(*args: str) -> subprocess.Popen:
    """`ipl --device cpu ARGS` in a subprocess (it inherits the test's isolated environment)."""
    code = "from ipltool.cli import run; run()"
    return subprocess.Popen([sys.executable, "-c", code, "--device", "cpu", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _records(out: Path) -> int:
    """Complete lines of the step log of the only run under `out` (0 before it exists)."""
    logs = list(out.glob("*/log.jsonl"))
    try:
        return logs[0].read_bytes().count(b"\n") if logs else 0
    except FileNotFoundError:  # replaced by truncate_log at that moment
        return 0


def _signal_at(proc: subprocess.Popen, out: Path, records: int, delay: float, sig: int, timeout: float = 120) -> tuple[str, str]:
    """Send `sig` to `proc` `delay` seconds after its step log has `records` lines; its (stdout, stderr) once it ended."""
    deadline = time.monotonic() + timeout
    while _records(out) < records:
        assert proc.poll() is None, f"the run ended before step record {records}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(sig)
    return proc.communicate(timeout=timeout)


def _tensors(path: Path, key: str) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)[key]


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _losses(run_dir: Path) -> list[tuple[str, int, float]]:
    return [(r["stage"], r["step"], r["loss"]) for r in RunDir.open(run_dir).read_log()]


def _stop_stage1_at(monkeypatch, step: int, how: str) -> None:
    """Make stage 1 receive SIGTERM after step `step` (`how="sigterm"`) or die before it (`"crash"`)."""
    real_step = stage1_run.stage1_step
    calls = {"n": 0}

    def step_then_stop(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step and how == "crash":
            raise RuntimeError("simulated kill")
        terms = real_step(*args, **kwargs)
        if calls["n"] == step and how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        return terms

    monkeypatch.setattr(stage1_run, "stage1_step", step_then_stop)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, ipl_at) -> Path:
    """The reference: the same smoke adapt run, never interrupted (in-process, as the resumes)."""
    root = tmp_path_factory.mktemp("whole")
    assert ipl_at(root, "--quiet", "--device", "cpu", "adapt", *ADAPT, "--out", str(root / "runs")) == 0
    return next((root / "runs").iterdir())


# Three seeded points: one in stage 1, two in stage 2, each a random fraction of a step late.
_rng = random.Random(14)
KILL_POINTS = [(_rng.randint(1, 2), _rng.uniform(0, 0.02)), *((n, _rng.uniform(0, 0.03)) for n in sorted(_rng.sample(range(4, ADAPT_RECORDS - 1), 2)))]


@pytest.mark.parametrize("records, delay", KILL_POINTS, ids=[f"after-record-{n}" for n, _ in KILL_POINTS])
def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_adapt(run_cli, tmp_path, uninterrupted, records, delay):
    out = tmp_path / "runs"
    proc = _ipl("adapt", *ADAPT, "--out", str(out))
    _signal_at(proc, out, records, delay, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    (run_dir,) = list(out.iterdir())
    assert not (run_dir / "generator.pt").exists()

    code, stdout, err = run_cli("--device", "cpu", "adapt", "--resume", str(run_dir), "--json")
    assert code == 0, err
    assert json.loads(stdout)["steps"] == 8
    _assert_same(_tensors(uninterrupted / "generator.pt", "g_ema"), _tensors(run_dir / "generator.pt", "g_ema"))
    _assert_same(_tensors(uninterrupted / "mapper.pt", "state_dict"), _tensors(run_dir / "mapper.pt", "state_dict"))
    assert _losses(run_dir) == _losses(uninterrupted)  # each step logged once, with the same loss
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary file left behind


@pytest.mark.parametrize("how", ["sigterm", "crash"])
def test_adapt_stopped_in_stage_1_resumes_stage_1(run_cli, tmp_path, monkeypatch, uninterrupted, how):
    with monkeypatch.context() as patch:
        _stop_stage1_at(patch, 2, how)
        code, _, err = run_cli("--device", "cpu", "adapt", *ADAPT, "--out", str(tmp_path))
    (run_dir,) = list(tmp_path.iterdir())
    saved = torch.load(run_dir / "state.pt", weights_only=True) if (run_dir / "state.pt").exists() else None
    if how == "sigterm":
        assert code == 130 and "stopped at step 2 of 3 of stage 1" in err and f"ipl adapt --resume {run_dir}" in err.replace("\n", "")
        assert saved["stage"] == "mapper" and saved["step"] == 2
    else:
        assert code == 1 and saved is None  # died before the first state: stage 1 starts over
    assert not (run_dir / "mapper.pt").exists()
    code, _, err = run_cli("--device", "cpu", "adapt", "--resume", str(run_dir))
    assert code == 0, err
    _assert_same(_tensors(uninterrupted / "mapper.pt", "state_dict"), _tensors(run_dir / "mapper.pt", "state_dict"))
    _assert_same(_tensors(uninterrupted / "generator.pt", "g_ema"), _tensors(run_dir / "generator.pt", "g_ema"))
    assert _losses(run_dir) == _losses(uninterrupted)


# ----------------------------------------------------------------------------
# train-mapper: the same stop/save/resume contract as adapt


def _train_mapper(run_cli, out: Path, *args: str) -> tuple[int, dict | None, str]:
    code, stdout, err = run_cli("--device", "cpu", "train-mapper", *args, "--out", str(out), "--json")
    return code, (json.loads(stdout) if code == 0 else None), err


@pytest.mark.parametrize("how", ["sigterm", "crash"])
def test_train_mapper_resume_ends_with_the_mapper_of_an_uninterrupted_run(run_cli, tmp_path, monkeypatch, how):
    code, whole, err = _train_mapper(run_cli, tmp_path / "whole", *TRAIN_MAPPER)
    assert code == 0, err
    with monkeypatch.context() as patch:
        _stop_stage1_at(patch, 5, how)
        code, _, err = _train_mapper(run_cli, tmp_path / "cut", *TRAIN_MAPPER)
    (cut,) = list((tmp_path / "cut").iterdir())
    if how == "sigterm":  # the step in flight finishes, its state is saved, and the run says how to go on
        assert code == 130 and "stopped at step 5 of 8 of stage 1" in err and f"ipl train-mapper --resume {cut}" in err.replace("\n", "")
        assert torch.load(cut / "state.pt", weights_only=True)["step"] == 5
    else:  # a crash leaves the last periodic state
        assert code == 1 and torch.load(cut / "state.pt", weights_only=True)["step"] == 3
    assert not (cut / "mapper.pt").exists()

    code, resumed, err = _train_mapper(run_cli, tmp_path / "unused", "--resume", str(cut))
    assert code == 0, err
    assert resumed["resumed_from"] == (5 if how == "sigterm" else 3) and not (tmp_path / "unused").exists()
    _assert_same(_tensors(Path(whole["mapper"]), "state_dict"), _tensors(cut / "mapper.pt", "state_dict"))
    assert _losses(cut) == _losses(Path(whole["run_dir"]))


def test_train_mapper_resume_extends_and_keeps_its_settings(run_cli, tmp_path):
    code, long, err = _train_mapper(run_cli, tmp_path / "long", *TRAIN_MAPPER)
    assert code == 0, err
    code, short, err = _train_mapper(run_cli, tmp_path / "short", *TRAIN_MAPPER[:-4], "--steps", "5", "--save-every", "3")
    assert code == 0, err
    code, extended, err = _train_mapper(run_cli, tmp_path / "unused", "--resume", short["run_dir"], "--steps", "8")
    assert code == 0, err
    assert extended["resumed_from"] == 5 and RunDir.open(short["run_dir"]).read_config()["mapper"]["steps"] == 8
    _assert_same(_tensors(Path(long["mapper"]), "state_dict"), _tensors(Path(short["mapper"]), "state_dict"))
    code, _, err = _train_mapper(run_cli, tmp_path / "unused", "--resume", short["run_dir"], "--steps", "4")
    assert code == 2 and "never shortened" in err
    code, _, err = _train_mapper(run_cli, tmp_path / "unused", "--resume", short["run_dir"], "--lr", "0.1")
    assert code == 2 and "drop --lr" in err
    code, _, err = _train_mapper(run_cli, tmp_path / "unused", "--resume", str(tmp_path))
    assert code == 2 and "not a run directory" in err
    code, _, err = _train_mapper(run_cli, tmp_path / "unused")
    assert code == 2 and "missing --domain" in err


def test_sigterm_stops_a_train_mapper_process_with_a_message_and_exit_130(run_cli, tmp_path):
    out = tmp_path / "runs"
    proc = _ipl("train-mapper", "--domain", "disney", "--smoke", "--steps", "60", "--out", str(out))
    _, stderr = _signal_at(proc, out, 3, 0.0, signal.SIGTERM)
    (run_dir,) = list(out.iterdir())
    assert proc.returncode == 130, stderr
    assert "stopped at step" in stderr and f"ipl train-mapper --resume {run_dir}" in stderr.replace("\n", "")
    saved = torch.load(run_dir / "state.pt", weights_only=True)
    assert saved["stage"] == "mapper" and 3 <= saved["step"] < 60
    code, resumed, err = _train_mapper(run_cli, tmp_path / "unused", "--resume", str(run_dir))
    assert code == 0 and resumed["resumed_from"] == saved["step"], err
    assert [r["step"] for r in RunDir.open(run_dir).read_log()] == list(range(1, 61))
