"""`ipl stylize` end to end: real dlib alignment, tiny random encoders and generators."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("dlib", reason="the align extra (dlib-bin) is not installed")
skdata = pytest.importorskip("skimage.data", reason="scikit-image (dev extra) ships the test photo")

from ipltool.invert import stylize as stylize_module  # noqa: E402
from ipltool.models.stylegan2 import TINY_CONFIG, GeneratorConfig, build_generator, generator_checkpoint  # noqa: E402
from ipltool.train.run import RunDir  # noqa: E402

TINY = TINY_CONFIG.size


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())


@pytest.fixture
def photos(tmp_path, astronaut):
    """A folder with one good face photo, an RGBA face, a corrupt JPEG, a text file named .png and a faceless picture."""
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    astronaut.save(folder / "astronaut.jpg", quality=95)
    rgba = astronaut.convert("RGBA")
    rgba.putalpha(Image.new("L", astronaut.size, 255))
    rgba.save(folder / "more" / "rgba.png")
    good = io.BytesIO()
    astronaut.save(good, format="JPEG")
    (folder / "corrupt.jpg").write_bytes(good.getvalue()[:3000])
    (folder / "notes.png").write_text("this is not a picture\n")
    ramp = np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (200, 1))
    Image.fromarray(np.stack([ramp] * 3, -1)).save(folder / "sky.png")
    return folder


def _manifest(out) -> dict[str, dict]:
    lines = (out / "manifest.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {r["name"]: r for r in records}


def test_smoke_run_over_a_mixed_folder(run_cli, photos, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("stylize", str(photos), "--domain", "disney", "--smoke", "--out", str(out))
    assert code == 1, stderr  # some photos failed, so the exit code says so
    records = _manifest(out)
    assert {name: r["status"] for name, r in records.items()} == {
        "astronaut": "ok",
        "more/rgba": "ok",
        "corrupt": "unreadable",
        "notes": "unreadable",
        "sky": "no face",
    }
    ok = records["astronaut"]
    # dlib also reports a weak second "face" (a patch on the suit); the largest is the real one.
    assert ok["faces"] == 2 and len(ok["outputs"]) == 1 and ok["error"] is None
    assert ok["outputs"][0]["rect"] == [175, 76, 265, 166]
    face = ok["outputs"][0]
    assert set(face["stylized"]) == {"disney"}
    for rel in (face["aligned"], face["reconstruction"], face["stylized"]["disney"]):
        assert Image.open(out / rel).size == (TINY, TINY)  # the generator's size
    assert (out / "stylized" / "disney" / "more" / "rgba.png").is_file()
    assert records["notes"]["error"] and records["corrupt"]["error"]
    assert "no face" in records["sky"]["error"]
    assert (out / "contact-sheet-001.png").is_file()
    assert "unreadable" in stdout and "no face" in stdout
    # The inputs are untouched and nothing was written beside them.
    assert sorted(p.name for p in photos.rglob("*")) == sorted(["more", "astronaut.jpg", "rgba.png", "corrupt.jpg", "notes.png", "sky.png"])


def test_all_good_exit_zero_with_json_summary(run_cli, photos, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = run_cli("--json", "stylize", str(photos / "astronaut.jpg"), "--smoke", "--out", str(out), "--save-latents")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["counts"]["ok"] == 1 and summary["faces"] == 1
    latents = torch.load(out / "latents" / "astronaut.pt", weights_only=True)
    assert latents["w_plus"].shape == (1, TINY_CONFIG.n_latent, TINY_CONFIG.style_dim)
    assert latents["encoder"] == "e4e"


def test_skip_existing_continues_and_redoes_missing_outputs(run_cli, photos, tmp_path):
    out = tmp_path / "out"
    args = ("stylize", str(photos), "--smoke", "--out", str(out), "--json")
    run_cli(*args)
    first = _manifest(out)
    (out / first["astronaut"]["outputs"][0]["reconstruction"]).unlink()
    code, stdout, _ = run_cli(*args, "--skip-existing")
    summary = json.loads(stdout)
    assert summary["skipped"] == 4 and summary["processed"] == 1  # only the photo with a lost file
    again = _manifest(out)
    assert set(again) == set(first)
    assert (out / again["astronaut"]["outputs"][0]["reconstruction"]).is_file()
    # Without --skip-existing everything runs again.
    code, stdout, _ = run_cli(*args)
    assert json.loads(stdout)["processed"] == 5


def test_paste_back_keeps_the_photo_size(run_cli, photos, astronaut, tmp_path):
    out = tmp_path / "out"
    code, _, stderr = run_cli("stylize", str(photos / "astronaut.jpg"), "-d", "disney", "--smoke", "--paste-back", "--out", str(out))
    assert code == 0, stderr
    record = _manifest(out)["astronaut"]
    pasted = Image.open(out / record["pasted"]["disney"])
    assert record["pasted"]["disney"].endswith(".jpg")
    assert pasted.size == astronaut.size
    diff = np.abs(np.asarray(pasted, np.int16) - np.asarray(astronaut, np.int16)).mean(-1)
    rect = record["outputs"][0]["rect"]  # the face changed, the corners did not
    assert diff[rect[1] : rect[3], rect[0] : rect[2]].mean() > 10
    assert diff[:40, :40].mean() < 3 and diff[-40:, -40:].mean() < 3


def test_every_face_with_faces_all(run_cli, astronaut, tmp_path):
    two = Image.new("RGB", (900, 520), (128, 128, 128))
    two.paste(astronaut, (0, 0))
    two.paste(astronaut.resize((380, 380)), (515, 70))
    folder = tmp_path / "group"
    folder.mkdir()
    two.save(folder / "two.png")
    out = tmp_path / "out"
    code, _, stderr = run_cli("stylize", str(folder), "--smoke", "--faces", "all", "--out", str(out))
    assert code == 0, stderr
    record = _manifest(out)["two"]
    n = record["faces"]
    assert n >= 2 and [f["face"] for f in record["outputs"]] == list(range(1, n + 1))
    for k in range(1, n + 1):
        assert (out / "aligned" / f"two-face{k}.png").is_file()
    areas = [(r[2] - r[0]) * (r[3] - r[1]) for r in (f["rect"] for f in record["outputs"])]
    assert areas == sorted(areas, reverse=True)  # largest first
    first = record["outputs"][0]["rect"]
    code, _, _ = run_cli("stylize", str(folder), "--smoke", "--out", str(tmp_path / "one"))
    assert _manifest(tmp_path / "one")["two"]["outputs"][0]["rect"] == first
    # A score threshold drops the weak hits on the suit patches: the two real faces remain.
    code, _, _ = run_cli("stylize", str(folder), "--smoke", "--faces", "all", "--min-score", "0.5", "--out", str(tmp_path / "strict"))
    strict = _manifest(tmp_path / "strict")["two"]
    assert strict["faces"] == 2 and all(f["score"] >= 0.5 for f in strict["outputs"])


def test_generators_from_files_and_domain_runs(run_cli, photos, tmp_path):
    tiny_file = tmp_path / "mine.pt"
    torch.save(generator_checkpoint(build_generator(TINY_CONFIG, seed=7)), tiny_file)
    run = RunDir.create(tmp_path / "runs", "werewolf", {"name": "werewolf", "run": {"stage": "adapt", "smoke": True}})
    torch.save(generator_checkpoint(build_generator(TINY_CONFIG, seed=8)), run.generator_path)
    out = tmp_path / "out"
    code, _, stderr = run_cli(
        "stylize", str(photos / "astronaut.jpg"), "--smoke", "-g", str(tiny_file), "-d", "werewolf",
        "--runs", str(tmp_path / "runs"), "--out", str(out),
    )
    assert code == 0, stderr
    stylized = _manifest(out)["astronaut"]["outputs"][0]["stylized"]
    assert set(stylized) == {"mine", "werewolf"}
    a, b = (np.asarray(Image.open(out / stylized[k])) for k in ("mine", "werewolf"))
    assert np.abs(a.astype(int) - b).mean() > 1  # two different generators rendered


def test_refusals(run_cli, photos, tmp_path):
    code, _, err = run_cli("stylize", str(photos), "--smoke", "--out", str(photos / "out"))
    assert code == 2 and "inside the input folder" in err
    code, _, err = run_cli("stylize", str(tmp_path / "nope"), "--smoke")
    assert code == 2 and "no such file" in err
    code, _, err = run_cli("stylize", str(photos), "--smoke", "--encoder", "nope", "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown encoder" in err
    code, _, err = run_cli("stylize", str(photos), "--smoke", "-d", "disney", "--runs", str(tmp_path), "--faces", "some")
    assert code == 2 and "--faces" in err
    code, _, err = run_cli("stylize", str(photos), "--domain", "disney", "--out", str(tmp_path / "o"), "--runs", str(tmp_path / "none"))
    assert code == 2 and "no finished `ipl adapt` run" in err
    wide = tmp_path / "wide.pt"
    torch.save(generator_checkpoint(build_generator(GeneratorConfig(64, 64, 2, 1, 32), seed=1)), wide)
    code, _, err = run_cli("stylize", str(photos), "--smoke", "-g", str(wide), "--out", str(tmp_path / "o"))
    assert code == 2 and "W+ codes" in err
    code, _, err = run_cli("stylize", str(photos), "--out", str(tmp_path / "o"))
    assert code == 2 and "ipl fetch" in err  # offline, and the e4e weights are not in the cache


def test_no_align_takes_square_crops(run_cli, astronaut, tmp_path):
    folder = tmp_path / "crops"
    folder.mkdir()
    astronaut.crop((120, 20, 300, 200)).save(folder / "face.png")
    astronaut.crop((0, 0, 300, 200)).save(folder / "wide.png")
    out = tmp_path / "out"
    code, _, _ = run_cli("stylize", str(folder), "--smoke", "--no-align", "--out", str(out))
    assert code == 1
    records = _manifest(out)
    assert records["face"]["status"] == "ok"
    assert records["wide"]["status"] == "error" and "square" in records["wide"]["error"]


def test_interrupt_keeps_finished_photos(run_cli, photos, tmp_path, monkeypatch):
    """A stop request after the first group ends the run with 130; --skip-existing finishes it."""
    from ipltool.commands import stylize as command

    class StopAfterFirst:
        def __enter__(self):
            class Request:
                signal_name = "SIGINT"

                @property
                def requested(self):
                    return True

            return Request()

        def __exit__(self, *exc):
            return False

    original = command.graceful_stop
    monkeypatch.setattr(command, "graceful_stop", StopAfterFirst)
    out = tmp_path / "out"
    code, _, err = run_cli("stylize", str(photos), "--smoke", "--batch", "2", "--out", str(out))
    assert code == 130 and "--skip-existing" in err
    done = _manifest(out)
    assert 0 < len(done) < 5
    monkeypatch.setattr(command, "graceful_stop", original)
    code, stdout, _ = run_cli("--json", "stylize", str(photos), "--smoke", "--batch", "2", "--out", str(out), "--skip-existing")
    summary = json.loads(stdout)
    assert summary["skipped"] == len(done) and summary["processed"] == 5 - len(done)
    assert len(_manifest(out)) == 5


def test_a_failing_model_call_fails_only_its_group(run_cli, photos, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = stylize_module.Stylizer._run_models

    def flaky(self, faces):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(self, faces)

    monkeypatch.setattr(stylize_module.Stylizer, "_run_models", flaky)
    out = tmp_path / "out"
    code, _, _ = run_cli("stylize", str(photos / "astronaut.jpg"), str(photos / "more"), "--smoke", "--batch", "1", "--out", str(out))
    assert code == 1
    statuses = {name: r["status"] for name, r in _manifest(out).items()}
    assert statuses == {"astronaut": "error", "rgba": "ok"}


def test_restyle_encoders_and_quirk_flags(run_cli, photos, tmp_path):
    face = str(photos / "astronaut.jpg")
    for encoder in ("restyle-e4e", "restyle-psp", "psp"):
        extra = ["--restyle-steps", "2", "--restyle-extra-pass"] if encoder.startswith("restyle") else []
        code, _, stderr = run_cli("stylize", face, "--smoke", "--encoder", encoder, *extra, "--out", str(tmp_path / encoder), "--save-latents")
        assert code == 0, stderr
        assert torch.load(tmp_path / encoder / "latents" / "astronaut.pt", weights_only=True)["encoder"] == encoder
    code, _, err = run_cli("stylize", face, "--smoke", "--restyle-steps", "3", "--out", str(tmp_path / "x"))
    assert code == 2 and "restyle" in err
    code, _, err = run_cli("stylize", face, "--smoke", "--restyle-extra-pass", "--out", str(tmp_path / "x"))
    assert code == 2 and "restyle" in err
    # --minmax stretches every rendered picture to the full range.
    code, _, _ = run_cli("stylize", face, "--smoke", "--minmax", "--out", str(tmp_path / "mm"))
    picture = np.asarray(Image.open(tmp_path / "mm" / "reconstruction" / "astronaut.png"))
    assert code == 0 and picture.min() == 0 and picture.max() == 255


def test_the_stylize_pipeline_is_a_library_call(tmp_path):
    # What `ipl stylize` runs, callable from Python (scripts, the web UI) without the CLI.
    import numpy as np
    import torch
    from PIL import Image

    from ipltool import registry
    from ipltool.interrupt import StopRequest
    from ipltool.invert.inputs import collect_photos
    from ipltool.invert.pipeline import stylize_photos
    from ipltool.invert.stylize import StylizeOptions
    from ipltool.invert.targets import Target
    from ipltool.models.stylegan2 import TINY_CONFIG, build_generator, load_source_generator

    photos = tmp_path / "faces"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(photos / f"face{i}.png")
    source = load_source_generator("tiny")
    inverter = registry.load("encoders", "e4e").tiny(source, seed=0, input_size=64)
    adapted = Target("adapted", build_generator(TINY_CONFIG, seed=5).eval(), "test")
    progress, stop = [], StopRequest()

    def on_progress(done, total, **counts):
        progress.append((done, total, counts["ok"]))
        stop.requested = True  # stop after the first group

    options = StylizeOptions(align=False, batch=2)
    result = stylize_photos(collect_photos([str(photos)]), tmp_path / "out", inverter, [adapted], options, torch.device("cpu"), on_progress=on_progress, stop=stop)
    assert progress == [(2, 3, 2)] and result.stopped and result.failed == 0
    assert sorted(p.name for p in (tmp_path / "out" / "stylized" / "adapted").iterdir()) == ["face0.png", "face1.png"]

    again = stylize_photos(collect_photos([str(photos)]), tmp_path / "out", inverter, [adapted], options, torch.device("cpu"), skip_existing=True)
    assert len(again.kept) == 2 and again.todo == 1 and not again.stopped and again.stylizer.counts["ok"] == 1
