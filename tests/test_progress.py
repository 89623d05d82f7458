"""Progress wherever stderr goes: plain lines off a terminal, their cadence, and `--json` parity."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest

from ipltool import console, progress
from ipltool.errors import UsageError
from test_fetch_cli import registry, served  # noqa: F401  (fixtures: files on a local HTTP server)

# A plain line of a training stage: `stage 2: ipl  step 2/3  loss 0.8123  1.52 steps/s  eta 1s`.
STEP_LINE = re.compile(r"^(stage [12]: \w+)  step (\d+)/(\d+)  loss -?\d+\.\d{4}(  (\d+\.\d\d) steps/s  eta (\d+m)?\d+s)?$")


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FlushedLines(io.StringIO):
    """A stream that remembers which lines were flushed."""

    def __init__(self):
        super().__init__()
        self.flushed: list[str] = []

    def flush(self):
        self.flushed = self.getvalue().splitlines()


def _reporter(unit="step", interval=15.0):
    clock, stream = FakeClock(), FlushedLines()
    return progress.Reporter(unit, interval=interval, clock=clock, stream=stream, bar=False), clock, stream


def _step_lines(stderr: str) -> dict[str, list[re.Match]]:
    """The progress lines in `stderr`, by stage."""
    found: dict[str, list[re.Match]] = {}
    for line in stderr.splitlines():
        match = STEP_LINE.match(line)
        if match:
            found.setdefault(match[1], []).append(match)
    return found


# -- the cadence, on a fake clock ---------------------------------------------------------


def test_lines_come_every_tenth_of_the_total_and_at_the_end():
    reporter, clock, stream = _reporter()
    with reporter:
        for step in range(1, 101):
            clock.now = step * 1.0  # 100 steps in 100 s: the tenth (10 steps) comes before 15 s
            reporter.update("stage 2: ipl", step, 100, loss=0.5)
    steps = [int(line.split()[4].split("/")[0]) for line in stream.getvalue().splitlines()]
    assert steps == [1, 11, 21, 31, 41, 51, 61, 71, 81, 91, 100]
    assert stream.flushed == stream.getvalue().splitlines()  # each line is flushed as it is written


def test_lines_come_every_interval_when_steps_are_slow():
    reporter, clock, stream = _reporter(interval=15.0)
    with reporter:
        for step in range(1, 21):
            clock.now = step * 4.0  # a tenth of 1000 steps would take 400 s: the interval (15 s) comes first
            reporter.update("stage 1: mapper", step, 1000, loss=0.5)
    steps = [int(line.split()[4].split("/")[0]) for line in stream.getvalue().splitlines()]
    # Printed at 4 s, then at the first update 15 s after the last line (20 s, 36 s, 52 s, 68 s),
    # and step 20 is the last update when the task closes early.
    assert steps == [1, 5, 9, 13, 17, 20]


def test_a_line_shows_count_loss_rate_and_eta():
    reporter, clock, stream = _reporter()
    with reporter:
        reporter.update("stage 2: ipl", 1, 301, loss=0.9)
        clock.now = 20.0
        reporter.update("stage 2: ipl", 41, 301, loss=0.8123)
    first, line = stream.getvalue().splitlines()
    assert first == "stage 2: ipl  step 1/301  loss 0.9000"  # no rate before a second update
    assert line == "stage 2: ipl  step 41/301  loss 0.8123  2.00 steps/s  eta 2m10s"


def test_rates_count_from_the_first_update_so_a_resumed_run_is_not_too_fast():
    reporter, clock, stream = _reporter()
    with reporter:
        reporter.update("stage 2: ipl", 201, 300)  # resumed at step 200
        clock.now = 10.0
        reporter.update("stage 2: ipl", 231, 300)
    assert stream.getvalue().splitlines()[-1] == "stage 2: ipl  step 231/300  3.00 steps/s  eta 23s"


def test_bytes_are_shown_in_megabytes():
    reporter, clock, stream = _reporter(progress.BYTES)
    with reporter:
        reporter.update("stylegan2-ffhq", 0, 400_000_000)
        clock.now = 10.0
        reporter.update("stylegan2-ffhq", 40_000_000, None)  # None keeps the total
    assert stream.getvalue().splitlines() == [
        "stylegan2-ffhq  0.0/400.0 MB",
        "stylegan2-ffhq  40.0/400.0 MB  4.00 MB/s  eta 1m30s",
    ]


def test_a_task_that_starts_over_restarts_its_rate_and_cadence():
    reporter, clock, stream = _reporter("sample")
    with reporter:
        for done in (4, 8, 4, 8):  # two passes over the same run (two metrics)
            clock.now += 1.0
            reporter.update("eval disney", done, 8)
    assert stream.getvalue().splitlines() == [
        "eval disney  sample 4/8",
        "eval disney  sample 8/8  4.00 samples/s  eta 0s",
        "eval disney  sample 4/8",
        "eval disney  sample 8/8  4.00 samples/s  eta 0s",
    ]


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(progress.ENV_VAR, "0")
    stream = io.StringIO()
    with progress.Reporter(clock=FakeClock(), stream=stream, bar=False) as reporter:
        for step in range(1, 6):
            reporter.update("stage 1: mapper", step, 1000)  # no time passes, far below a tenth: printed all the same
    assert reporter.interval == 0 and len(stream.getvalue().splitlines()) == 5
    monkeypatch.delenv(progress.ENV_VAR)
    assert progress.interval_seconds() == progress.DEFAULT_SECONDS
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(progress.ENV_VAR, bad)
        with pytest.raises(UsageError, match=progress.ENV_VAR):
            progress.interval_seconds()


@pytest.mark.parametrize("flag", ["quiet", "json"])
def test_quiet_and_json_print_nothing(monkeypatch, flag):
    monkeypatch.setattr(console.options, flag, True)
    reporter, _, stream = _reporter()
    with reporter:
        reporter.update("stage 2: ipl", 1, 3, loss=0.5)
    assert stream.getvalue() == ""


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_the_rich_bar(monkeypatch):
    from rich.console import Console

    screen = Terminal()
    monkeypatch.setattr(console, "err", Console(file=screen, force_terminal=True, force_interactive=True, width=100))
    with progress.track(3, "stage 2: ipl") as update:
        for step in (1, 2, 3):
            update(step, loss=0.25)
    assert "3/3" in screen.getvalue() and "loss 0.2500" in screen.getvalue()
    assert "step 3/3" not in screen.getvalue()  # the bar, not the plain lines


# -- the commands, with stderr captured (not a terminal) ------------------------------------


def _adapt_args(tmp_path, *extra):
    return ("--device", "cpu", "adapt", "--domain", "disney", "--smoke", "--out", str(tmp_path / "runs"), *extra)


def test_adapt_prints_plain_progress_lines(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv(progress.ENV_VAR, "0")
    code, stdout, stderr = run_cli(*_adapt_args(tmp_path))
    assert code == 0, stderr
    assert "plumbing check" in stderr and "run directory:" in stderr and "adapted generator written" in stdout
    lines = _step_lines(stderr)
    assert set(lines) == {"stage 1: mapper", "stage 2: ipl"}
    for stage in lines.values():
        assert [(m[2], m[3]) for m in stage] == [("1", "3"), ("2", "3"), ("3", "3")]
        assert stage[0][4] is None and all(m[5] for m in stage[1:])  # steps/s and eta from the second step on
        assert stage[-1][0].endswith("eta 0s")


@pytest.mark.parametrize("where", ["global", "local"])
def test_json_anywhere_silences_progress_and_status_lines(run_cli, tmp_path, monkeypatch, where):
    monkeypatch.setenv(progress.ENV_VAR, "0")
    args = ("--json", *_adapt_args(tmp_path)) if where == "global" else _adapt_args(tmp_path, "--json")
    code, stdout, stderr = run_cli(*args)
    assert code == 0, stderr
    assert json.loads(stdout)["steps"] == 3
    assert not _step_lines(stderr) and "run directory" not in stderr and "plumbing check" not in stderr


def test_train_mapper_prints_plain_progress_lines(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv(progress.ENV_VAR, "0")
    code, _, stderr = run_cli("--device", "cpu", "train-mapper", "--domain", "disney", "--smoke", "--out", str(tmp_path))
    assert code == 0, stderr
    lines = _step_lines(stderr)["stage 1: mapper"]
    assert [m[2] for m in lines] == ["1", "2", "3"] and lines[-1][5]


def test_every_commands_json_flag_is_the_global_one():
    """Each command's --json sets the global option while parsing, before the command runs."""
    import typer

    from ipltool.cli import app

    def leaves(command, path=()):
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                yield from leaves(sub, (*path, name))
        else:
            yield path, command

    with_json = set()
    for path, command in leaves(typer.main.get_command(app)):
        if any("--json" in getattr(param, "opts", ()) for param in command.params):
            console.reset()
            command.make_context(path[-1], ["--json"], resilient_parsing=True)  # required options may be missing
            assert console.options.json, f"ipl {' '.join(path)} --json is not the global --json"
            with_json.add(" ".join(path))
    console.reset()
    expected = {"adapt", "train-mapper", "stylize", "eval", "fetch", "plugins", "prompts list", "prompts show", "prompts validate",
                "kernels info", "kernels build"}
    assert expected <= with_json


def test_stylize_prints_photos_and_their_outcomes(run_cli, tmp_path, monkeypatch):
    pytest.importorskip("dlib", reason="the align extra (dlib-bin) is not installed")
    skdata = pytest.importorskip("skimage.data", reason="scikit-image (dev extra) ships the test photo")
    import numpy as np
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(skdata.astronaut()).save(photos / "astronaut.jpg")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(photos / "grey.png")  # no face
    (photos / "notes.png").write_text("not a picture\n")  # unreadable
    monkeypatch.setenv(progress.ENV_VAR, "0")
    code, _, stderr = run_cli("--device", "cpu", "stylize", str(photos), "--smoke", "--batch", "1", "--out", str(tmp_path / "out"))
    assert code == 1, stderr  # two photos failed
    lines = [line for line in stderr.splitlines() if line.startswith("stylize  photo ")]
    assert [line.split()[2] for line in lines] == ["1/3", "2/3", "3/3"]
    assert re.fullmatch(r"stylize  photo 3/3  ok 1 · no face 1 · unreadable 1 · error 0  \d+\.\d\d photos/s  eta 0s", lines[-1])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, ipl_at):
    """One `ipl adapt --smoke` run of two steps."""
    root = tmp_path_factory.mktemp("runs")
    assert ipl_at(root, "--quiet", "--device", "cpu", "adapt", "--domain", "disney", "--smoke", "--steps", "2", "--out", str(root)) == 0
    return next(p for p in root.iterdir() if p.name.startswith("disney-"))


def test_eval_prints_the_current_task(run_cli, smoke_run, tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity", reason="the eval extra (torch-fidelity) is not installed")
    monkeypatch.setenv(progress.ENV_VAR, "0")
    args = ("--device", "cpu", "eval", str(smoke_run), "--metrics", "clip", "--n", "4", "--batch", "2", "--report", str(tmp_path / "r"))
    code, _, stderr = run_cli(*args)
    assert code == 0, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(f"eval {smoke_run.name}  sample ")]
    assert [line.split()[3] for line in lines] == ["2/4", "4/4"]
    assert re.fullmatch(rf"eval {smoke_run.name}  sample 4/4  \d+\.\d\d samples/s  eta 0s", lines[-1])


def test_fetch_prints_bytes_and_speed(run_cli, registry, monkeypatch):  # noqa: F811
    monkeypatch.delenv("IPL_OFFLINE")
    monkeypatch.setenv(progress.ENV_VAR, "0")
    code, _, stderr = run_cli("fetch", "test-known")
    assert code == 0, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("test-known  ")]
    assert lines[0] == "test-known  0.0/0.1 MB"
    assert re.fullmatch(r"test-known  0\.1/0\.1 MB  \d+\.\d\d MB/s  eta 0s", lines[-1])
    code, stdout, stderr = run_cli("fetch", "test-known", "--force", "--json")
    assert code == 0 and json.loads(stdout)["models"][0]["verified"] is True
    assert "test-known  " not in stderr and "downloading" not in stderr


def test_a_redirected_stderr_gets_progress_lines(tmp_path):
    """The real non-terminal path: `ipl adapt` in a subprocess whose stderr is a file."""
    log = tmp_path / "adapt.log"
    command = [sys.executable, "-c", "from ipltool.cli import run; run()", *_adapt_args(tmp_path)]
    with open(log, "w") as stderr:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=dict(os.environ), timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text
    lines = _step_lines(text)
    assert [m[2] for m in lines["stage 2: ipl"]] == ["1", "2", "3"] and lines["stage 2: ipl"][-1][5]
    assert "\x1b[" not in text and "\r" not in text  # no terminal control codes in a log file

