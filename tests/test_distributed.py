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
