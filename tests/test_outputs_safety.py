"""Output folders: a bad `--out`/`--report`, a disk that fills up mid-run, temporary files of
killed writers, and two `ipl stylize` runs into one folder. Every failure is one line."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ipltool import atomic, outdir
from ipltool.atomic import sweep_stale_temps
from ipltool.images import png_bytes

SQUARE = 64  # --no-align takes square pictures as aligned faces: no face detector needed


def _error_lines(err: str) -> list[str]:
    """The `error:` lines of stderr, after checking no traceback or 'unexpected' slipped through."""
    assert "Traceback" not in err and "unexpected" not in err, err
    return [line for line in err.splitlines() if line.startswith(("error:", "stopped:"))]


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


def _square(path: Path, seed: int) -> Path:
    rng = __import__("random").Random(seed)
    Image.frombytes("RGB", (SQUARE, SQUARE), bytes(rng.randrange(256) for _ in range(SQUARE * SQUARE * 3))).save(path)
    return path


@pytest.fixture
def faces(tmp_path) -> list[Path]:
    folder = tmp_path / "faces"
    folder.mkdir()
    return [_square(folder / f"{name}.png", seed) for seed, name in enumerate(["a", "b"])]


def _manifest(out: Path) -> dict[str, dict]:
    return {r["name"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


@pytest.fixture
def disk_full(monkeypatch):
    """`fill(after, match, code)`: atomic writes of files for which `match(path)` holds fail with
    `code` (ENOSPC) once `after` of them went through; some bytes reach the temporary file first."""
    real = atomic._atomic_open

    def fill(after: int, match=lambda path: True, code: int = errno.ENOSPC) -> dict:
        seen = {"writes": 0}

        @contextlib.contextmanager
        def filling(path):
            with real(path) as f:
                if match(Path(path)):
                    seen["writes"] += 1
                    if seen["writes"] > after:
                        f.write(b"half a file")
                        raise OSError(code, os.strerror(code))
                yield f

        monkeypatch.setattr(atomic, "_atomic_open", filling)
        return seen

    return fill


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


# ---------------------------------------------------------------------------
# --out / --report that cannot take files: refused before any work.


def _commands(tmp_path: Path, target: Path) -> dict[str, list[str]]:
    photo = _square(tmp_path / "face.png", 0)
    return {
        "adapt": ["adapt", "--domain", "disney", "--smoke", "--out", str(target)],
        "train-mapper": ["train-mapper", "--domain", "disney", "--smoke", "--out", str(target)],
        "stylize": ["stylize", str(photo), "--smoke", "--no-align", "--out", str(target)],
        "eval": ["eval", str(tmp_path), "--smoke", "--report", str(target)],
    }


@pytest.mark.parametrize("command", ["adapt", "train-mapper", "stylize", "eval"])
def test_out_that_is_a_file_is_refused_in_one_line(run_cli, tmp_path, command):
    target = tmp_path / "taken.txt"
    target.write_text("not a folder\n")
    flag = "--report" if command == "eval" else "--out"
    code, _, err = run_cli(*_commands(tmp_path, target)[command])
    assert code == 2 and _error_lines(err) == [f"error: {flag} {target} is a file, not a folder"], err
    assert f"choose a folder for {flag}" in err
    code, _, err = run_cli(*_commands(tmp_path, target / "sub")[command])
    assert code == 2 and _error_lines(err) == [f"error: {flag} {target / 'sub'} cannot be made: {target} is a file"], err
    assert target.read_text() == "not a folder\n"


@pytest.fixture
def read_only(monkeypatch):
    """`make(folder)`: creating files in `folder` fails with EROFS, as on a read-only mount.

    Tests run as root, for whom a chmod does not stop writes; `os.access` is faked for the
    same reason (it is what a missing folder is checked with).
    """
    real_open, real_access = os.open, os.access
    frozen: list[str] = []

    def guarded_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and os.path.dirname(os.path.abspath(path)) in frozen:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_access(path, mode, *args, **kwargs):
        return False if mode & os.W_OK and os.path.abspath(path) in frozen else real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "access", guarded_access)
    return lambda folder: frozen.append(os.path.abspath(folder))


@pytest.mark.parametrize("command", ["adapt", "stylize", "eval"])
def test_read_only_out_is_refused_in_one_line(run_cli, tmp_path, read_only, command):
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked)
    flag = "--report" if command == "eval" else "--out"
    code, _, err = run_cli(*_commands(tmp_path, locked)[command])
    assert code == 2 and _error_lines(err) == [f"error: cannot write into {flag} {locked}: read-only file system"], err
    assert f"choose a folder you can write to for {flag}" in err
    # A folder still to be made, under one that is not writable.
    code, _, err = run_cli(*_commands(tmp_path, locked / "new")[command])
    assert code == 2 and _error_lines(err) == [f"error: cannot create {flag} {locked / 'new'}: {locked} is not writable"], err
    assert list(locked.iterdir()) == []


# ---------------------------------------------------------------------------
# A disk that fills up mid-run: one line, finished outputs consistent, the run continuable.


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_stylize_stops_at_a_full_disk_and_continues_with_skip_existing(run_cli, tmp_path, faces, disk_full, code):
    out = tmp_path / "out"
    args = ["stylize", *map(str, faces), "--smoke", "--no-align", "--batch", "1", "--out", str(out)]
    disk_full(after=2, match=lambda p: p.suffix == ".png", code=code)  # face a: aligned + reconstruction; face b fails
    status, _, err = run_cli(*args)
    assert status == 1
    expected = (
        f"error: no space left to write {out / 'aligned' / 'b.png'} (no space left on device)"
        if code == errno.ENOSPC
        else f"error: cannot write {out / 'aligned' / 'b.png'}: read-only file system"
    )
    assert _error_lines(err) == [expected], err
    assert "--skip-existing" in err
    records = _manifest(out)
    assert list(records) == ["a"] and records["a"]["status"] == "ok"  # a line only for the finished photo
    for rel in (records["a"]["outputs"][0]["aligned"], records["a"]["outputs"][0]["reconstruction"]):
        assert Image.open(out / rel).size[0] > 0
    assert _temps(out) == [] and not (out / "aligned" / "b.png").exists()

    disk_full(after=10**9)  # room again
    status, stdout, err = run_cli("--json", *args, "--skip-existing")
    assert status == 0, err
    assert json.loads(stdout)["skipped"] == 1 and set(_manifest(out)) == {"a", "b"}


def test_a_manifest_line_cut_by_a_full_disk_is_taken_back(tmp_path, monkeypatch):
    from ipltool.invert.outputs import Layout, Manifest

    manifest = Manifest(Layout(tmp_path))
    manifest.start([{"input": "a.png", "name": "a"}])
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError) as e:
        manifest.append({"input": "b.png", "name": "b"})
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(manifest.path)
    manifest.append({"input": "c.png", "name": "c"})
    assert list(manifest.read()) == ["a.png", "c.png"]
    assert manifest.path.read_text().count("\n") == 2


def test_adapt_stops_at_a_full_disk_and_resumes(run_cli, tmp_path, disk_full):
    writes = disk_full(after=1, match=lambda p: p.name == "state.pt")  # the save at step 4 fails, step 2 stays
    args = ["adapt", "--domain", "disney", "--smoke", "--method", "nada", "--steps", "6", "--save-every", "2", "--out", str(tmp_path / "runs")]
    code, _, err = run_cli(*args)
    run = next((tmp_path / "runs").iterdir())
    assert code == 1 and writes["writes"] == 2
    assert _error_lines(err) == [f"error: no space left to write {run / 'state.pt'} (no space left on device)"], err
    assert f"`ipl adapt --resume {run}` continues from the last saved step" in err
    assert _temps(run) == [] and not (run / "generator.pt").exists()

    disk_full(after=10**9)
    code, stdout, err = run_cli("--json", "adapt", "--resume", str(run))
    assert code == 0, err
    assert json.loads(stdout)["resumed_from"] == 2 and (run / "generator.pt").is_file()


def test_eval_stops_at_a_full_disk_leaving_whole_report_files(run_cli, tmp_path, disk_full):
    pytest.importorskip("torch_fidelity", reason="the eval extra (torch-fidelity) is not installed")
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 30, 200 - 40 * i)).save(pictures / f"{i}.png")
    report = tmp_path / "report"
    args = ["eval", str(pictures), "--smoke", "--metrics", "diversity", "--n", "4", "--report", str(report)]
    code, _, err = run_cli(*args)
    assert code == 0, err
    before = (report / "metrics.csv").read_text()
    stale = report / f".metrics.json.{_dead_pid()}.0123abcd.tmp"  # left by an eval that was killed
    stale.write_text("{")

    disk_full(after=1, match=lambda p: p.parent == report)  # metrics.json goes through, metrics.csv does not
    code, _, err = run_cli(*args)
    assert code == 1
    assert _error_lines(err) == [f"error: no space left to write {report / 'metrics.csv'} (no space left on device)"], err
    assert "choose another --report" in err and "run the same `ipl eval` again" in err
    json.loads((report / "metrics.json").read_text())  # every report file is whole, old or new
    assert (report / "metrics.csv").read_text() == before
    assert _temps(report) == []  # the stale temporary was swept, the failed one removed


# ---------------------------------------------------------------------------
# Temporary files of killed writers.


def test_open_run_sweeps_dead_writers_temps_and_keeps_live_ones(tmp_path):
    from ipltool.train.run import RunDir

    run = RunDir.create(tmp_path / "runs", "disney", {"name": "disney"})
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        names = {
            "dead": run.path / f".state.pt.{dead}.0123abcd.tmp",
            "dead-in-samples": run.samples_dir / f".step-000002.png.{dead}.89abcdef.tmp",
            "live": run.path / f".generator.pt.{live.pid}.0123abcd.tmp",
            "mine": run.path / f".mapper.pt.{os.getpid()}.0123abcd.tmp",
            "old-style-old": run.path / ".state.pt.fedcba98.tmp",
            "old-style-new": run.path / ".log.jsonl.fedcba98.tmp",
            "not-ours": run.path / ".notes.tmp",
        }
        for path in names.values():
            path.write_bytes(b"partial")
        hours_ago = time.time() - 2 * atomic.STALE_AFTER
        os.utime(names["old-style-old"], (hours_ago, hours_ago))

        RunDir.open(run.path)
        assert {k for k, p in names.items() if p.exists()} == {"live", "mine", "old-style-new", "not-ours"}
    finally:
        live.kill()
        live.wait()
    assert sweep_stale_temps(run.path) == [names["live"]]  # its writer is gone now
    assert sweep_stale_temps(tmp_path / "missing") == []


def test_temp_names_carry_the_writer_pid(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append(Path(src).name), real_replace(src, dst)))
    atomic.atomic_write_text(tmp_path / "f.txt", "x")
    monkeypatch.undo()
    assert len(seen) == 1 and seen[0].startswith(f".f.txt.{os.getpid()}.") and seen[0].endswith(".tmp")
    assert atomic._temp_owner(seen[0]) == os.getpid()


# ---------------------------------------------------------------------------
# Two `ipl stylize` runs into one folder.


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the first run ended early ({proc.returncode}): {proc.stderr.read()}")
        assert time.monotonic() < end, "the first run never took the lock"
        time.sleep(0.02)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="holds the first run with a named pipe (POSIX)")
def test_second_stylize_into_the_same_out_is_refused_and_loses_nothing(run_cli, tmp_path, faces):
    """Run 1 (a real process) holds the lock while it waits on a photo that is a named pipe;
    run 2 is refused without touching the folder; run 1 then finishes with every photo."""
    out = tmp_path / "out"
    pipe = tmp_path / "faces" / "slow.png"
    os.mkfifo(pipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "from ipltool.cli import run; run()", "stylize", "--smoke", "--no-align", "--batch", "1", "--out", str(out)]
    first = subprocess.Popen([*command, str(faces[0]), str(pipe)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / ".ipl-stylize.owner", first)
        code, _, err = run_cli("stylize", str(faces[1]), "--smoke", "--no-align", "--out", str(out))
        assert code == 1
        assert _error_lines(err) == [f"error: another ipl stylize is writing into {out} (pid {first.pid})"], err
        assert "wait for it to finish, or choose another --out" in err
        with open(pipe, "wb") as f:  # let run 1 read its last photo
            f.write(png_bytes(Image.open(faces[1])))
        assert first.wait(timeout=120) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert set(_manifest(out)) == {"a", "slow"} and (out / "contact-sheet-001.png").is_file()
    assert not (out / "contact-sheet-002.png").exists() and not (out / "aligned" / "b.png").exists()


def test_exclusive_names_the_holder_and_a_killed_holder_frees_the_folder(tmp_path):
    folder = tmp_path / "out"
    program = (
        "import sys; from pathlib import Path; from ipltool.outdir import exclusive\n"
        f"with exclusive(Path({str(folder)!r}), 'stylize', '--out'):\n    print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen([sys.executable, "-c", program], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    busy = rf"another ipl stylize is writing into .* \(pid {holder.pid}\)"
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(outdir.OutputError, match=busy), outdir.exclusive(folder, "stylize", "--out"):
            pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the OS drops the lock
        holder.wait(timeout=30)
    assert (folder / ".ipl-stylize.owner").exists()  # stale, and harmless
    with outdir.exclusive(folder, "stylize", "--out"):
        assert json.loads((folder / ".ipl-stylize.owner").read_text())["pid"] == os.getpid()
    assert not (folder / ".ipl-stylize.owner").exists()
