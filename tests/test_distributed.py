"""Commands under `torchrun` on the CPU (gloo): the same results as one process, work split across ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ipltool.distributed import World, block, shard, world

pytestmark = pytest.mark.xdist_group("distributed")
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(IPL_CACHE=str(root / "cache"), IPL_OFFLINE="1", IPL_PLUGINS="", OMP_NUM_THREADS="1", IPL_PROGRESS_SECONDS="0")
    return env


def _ipl(root: Path, *args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    command = [TORCHRUN, "--standalone", f"--nproc-per-node={ranks}", "--no-python", "ipl", *args] if ranks > 1 else ["ipl", *args]
    return subprocess.run(command, cwd=root, env=_env(root), capture_output=True, text=True, timeout=300)


def test_world_and_shards(monkeypatch):
    assert world() == World(0, 1, 0) and not world().distributed
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert world() == World(2, 3, 0) and not world().main
    assert shard(list(range(8))) == [2, 5]
    assert sorted(sum((shard(list(range(8)), World(r, 3)) for r in range(3)), [])) == list(range(8))
    # Whole batches per rank: 10 items in batches of 4 over 2 ranks -> [0, 8) and [8, 10).
    assert [block(10, 4, World(r, 2)) for r in range(2)] == [(0, 8), (8, 10)]
    assert [block(3, 4, World(r, 2)) for r in range(2)] == [(0, 3), (3, 3)]
    monkeypatch.setenv("RANK", "3")
    from ipltool.errors import UsageError

    with pytest.raises(UsageError, match="do not fit"):
        world()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("torchrun")
    done = _ipl(root, "--quiet", "adapt", "-d", "disney", "--smoke", "--steps", "2", "--out", "runs")
    assert done.returncode == 0, done.stderr
    return root


def test_eval_under_torchrun_equals_one_process(root):
    run = next((root / "runs").iterdir())
    args = ["--json", "eval", str(run), "--smoke", "--metrics", "clip,diversity,is", "--samples", "10"]
    single = _ipl(root, *args, "--report", "one")
    assert single.returncode == 0, single.stderr
    shutil.rmtree(run / "eval-cache")  # the ranks must compute, not read the features of the first run
    double = _ipl(root, *args, "--report", "two", ranks=2)
    assert double.returncode == 0, double.stderr
    one, two = json.loads(single.stdout)["runs"][0]["metrics"], json.loads(double.stdout)["runs"][0]["metrics"]
    assert one.keys() == two.keys()
    for key, value in one.items():
        assert value == two[key], (key, value, two[key])  # whole batches per rank: the same numbers
    assert (root / "two" / "metrics.json").is_file() and (root / "two" / "samples").is_dir()


def test_generate_under_torchrun_splits_the_seeds(root):
    one = _ipl(root, "generate", "-g", "disney", "--seeds", "0-4", "--source", "--grid", "--batch", "2", "--out", "one")
    assert one.returncode == 0, one.stderr
    done = _ipl(root, "--json", "generate", "-g", "disney", "--seeds", "0-4", "--source", "--grid", "--batch", "2", "--out", "two", ranks=2)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # one summary, rank 0's, listing every rank's pictures in seed order
    assert [p["row"] for p in summary["pictures"] if p["column"] == "disney"] == [f"seed000{i}" for i in range(5)]
    assert sorted(p.name for p in (root / "two" / "disney").iterdir()) == [f"seed000{i}.png" for i in range(5)]
    for name in ("grid.png", *(f"{column}/seed000{i}.png" for column in ("source", "disney") for i in range(5))):
        assert (root / "two" / name).read_bytes() == (root / "one" / name).read_bytes(), name  # file for file


def test_adapt_several_domains_one_run_each_across_ranks(root):
    done = _ipl(root, "--json", "adapt", "-d", "disney", "-d", "ukiyo-e", "-d", "tolkien-elf", "--smoke", "--steps", "1", "--out", "many", ranks=2)
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)["runs"]
    assert [(r["domain"], r["rank"]) for r in runs] == [("disney", 0), ("ukiyo-e", 1), ("tolkien-elf", 0)]
    assert all(Path(root / r["generator"]).is_file() for r in runs)
    # One process: the same three runs, one after the other; a bad name is refused before any training.
    bad = _ipl(root, "adapt", "-d", "disney", "-d", "nosuch", "--smoke", "--out", "none")
    assert bad.returncode == 2 and "unknown domain 'nosuch'" in bad.stderr and not (root / "none").exists()


def test_progress_lines_name_their_rank(monkeypatch):
    import io

    from ipltool.progress import Reporter

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    stream = io.StringIO()
    with Reporter("photo", stream=stream) as reporter:  # a terminal or not: rank 1 never draws a bar
        reporter.add("stylize", 2)
        reporter.update("stylize", 2)
    assert stream.getvalue().startswith("[rank 1] stylize  photo 2/2")


def _photos(folder: Path, count: int) -> Path:
    import numpy as np
    from PIL import Image
    from skimage import data

    folder.mkdir()
    face = data.astronaut()
    for i in range(count):
        Image.fromarray(np.roll(face, 5 * i, axis=1)).save(folder / f"p{i:02d}.png")
    Image.new("RGB", (160, 160), (90, 90, 90)).save(folder / "zz-grey.png")  # no face: recorded, not fatal
    return folder


def test_stylize_under_torchrun_equals_one_process_file_for_file(root):
    photos = _photos(root / "photos-a", 5)
    args = ["stylize", str(photos), "--smoke", "-d", "disney", "--paste-back", "--save-latents", "--batch", "2"]
    one = _ipl(root, *args, "--out", "one-st")
    two = _ipl(root, "--json", *args, "--out", "two-st", ranks=2)
    assert one.returncode == two.returncode == 1  # the grey picture has no face
    summary = json.loads(two.stdout)  # rank 0's summary counts every rank's photos
    assert summary["counts"]["ok"] == 5 and summary["counts"]["no face"] == 1 and summary["photos"] == 6
    files = sorted(p.relative_to(root / "one-st").as_posix() for p in (root / "one-st").rglob("*") if p.is_file() and not p.name.startswith((".", "contact-sheet")))
    assert "pasted/disney/p04.png" in files and "latents/p00.pt" in files
    for name in files:
        if name.endswith(".pt"):
            import torch

            assert torch.equal(torch.load(root / "one-st" / name)["w_plus"], torch.load(root / "two-st" / name)["w_plus"]), name
        elif name != "manifest.jsonl":
            assert (root / "two-st" / name).read_bytes() == (root / "one-st" / name).read_bytes(), name
    lines = [json.loads(line) for line in (root / "two-st" / "manifest.jsonl").read_text().splitlines()]
    assert [r["name"] for r in lines] == [json.loads(line)["name"] for line in (root / "one-st" / "manifest.jsonl").read_text().splitlines()]
    assert not list((root / "two-st").glob("manifest.rank*"))  # merged by rank 0


def test_a_killed_torchrun_stylize_resumes_with_another_rank_count(root):
    import signal
    import time

    photos = _photos(root / "photos-b", 40)
    out = root / "killed"
    args = ["stylize", str(photos), "--smoke", "-d", "disney", "--batch", "1", "--out", str(out)]
    command = [TORCHRUN, "--standalone", "--nproc-per-node=2", "--no-python", "ipl", *args]
    process = subprocess.Popen(command, cwd=root, env=_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    part = out / "manifest.rank1.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if part.is_file() and len(part.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # every rank at once, mid-run
    process.wait()
    parts = sorted(out.glob("manifest.rank*.jsonl"))
    assert parts, "the run ended before it could be killed"
    finished = {json.loads(line)["input"] for p in parts for line in p.read_text().splitlines() if line.strip().endswith("}")}
    assert 3 <= len(finished) < 41
    stamps = {p: p.stat().st_mtime_ns for p in (out / "aligned").iterdir()}
    again = _ipl(root, "--json", *args, "--skip-existing", ranks=3)
    assert again.returncode in (0, 1), again.stderr  # 1 when zz-grey (no face) is among the photos this run did
    summary = json.loads(again.stdout)
    assert summary["skipped"] >= len(finished) and summary["processed"] + summary["skipped"] == 41
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items() if path.stem in {Path(i).stem for i in finished})  # not redone
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 41 and not list(out.glob("manifest.rank*"))


def test_a_failing_rank_names_what_it_held(monkeypatch, capsys, tmp_path):
    from ipltool.invert.inputs import Photo
    from ipltool.invert.pipeline import stylize_photos
    from ipltool.invert.stylize import StylizeOptions

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    photos = [Photo(tmp_path / f"p{i}.png", f"p{i}") for i in range(5)]
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(OSError):  # the output folder cannot be made: fails before any collective call
        stylize_photos(photos, blocked, None, [], StylizeOptions(batch=2), "cpu", detector=None)
    err = capsys.readouterr().err
    assert "rank 1 of 2 failed" in err and "photos 5..5 of 5" in err and "p4.png" in err


def test_videos_under_torchrun_are_split_and_reported_once(root):
    from test_video_stylize import moving_face  # the synthetic moving-face clip of the video tests

    from ipltool.video import probe, write_video

    clips = root / "clips"
    clips.mkdir()
    for name in ("a", "b"):
        write_video(clips / f"{name}.mp4", moving_face(6), 6.0)
    done = _ipl(root, "--json", "stylize", str(clips / "a.mp4"), str(clips / "b.mp4"), "--smoke", "-d", "disney", "--out", "vids", ranks=2)
    assert done.returncode == 0, done.stderr
    videos = json.loads(done.stdout)["videos"]
    assert [v["name"] for v in videos] == ["a", "b"] and {v["status"] for v in videos} == {"ok"}
    for name in ("a", "b"):
        assert probe(root / "vids" / name / "disney.mp4").frames == 6
