"""The video path of `ipl stylize`: smoothed landmark tracks, warm-started inversion, resume by frame."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("dlib", reason="the align extra (dlib-bin) is not installed")
skdata = pytest.importorskip("skimage.data", reason="scikit-image (dev extra) ships the test photo")
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="imageio-ffmpeg is not installed")

from ipltool import video  # noqa: E402
from ipltool.interrupt import StopRequest  # noqa: E402
from ipltool.invert import video as vs  # noqa: E402
from ipltool.invert.smoothing import smooth_track, track_pieces  # noqa: E402

FRAMES, FPS, SIDE = 12, 12.0, 192


def moving_face(count: int = FRAMES) -> list[Image.Image]:
    """The astronaut's face drifting right and down and turning a little, frame by frame."""
    photo = Image.fromarray(skdata.astronaut())
    frames = []
    for t in range(count):
        moved = photo.rotate(0.8 * t, resample=Image.Resampling.BICUBIC, center=(220, 121), translate=(1.5 * t, 0.5 * t))
        frames.append(moved.crop((124, 41, 124 + SIDE, 41 + SIDE)))
    return frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """The moving face as an H.264 MP4 at 12 fps with a 2 s AAC tone (cut to the video's 1 s)."""
    folder = tmp_path_factory.mktemp("clip")
    tone = folder / "tone.m4a"
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac", str(tone)],
        check=True,
    )
    return video.write_video(folder / "clip.mp4", moving_face(), FPS, audio_from=tone)


@pytest.fixture(scope="module")
def detector():
    from ipltool.invert.landmarks import FaceDetector

    return FaceDetector().load()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(tiny random ReStyle inverter, [tiny random 'disney' target]) as `--smoke` builds them."""
    from ipltool.invert.pipeline import load_inverter
    from ipltool.invert.targets import load_targets, plan_targets

    device = torch.device("cpu")
    inverter = load_inverter("restyle-e4e", None, True, {}, device)
    targets = load_targets(plan_targets([], ["disney"], tmp_path_factory.mktemp("runs"), True), device, inverter.decoder)
    return inverter, targets


# ----------------------------------------------------------------------------
# Smoothing


def test_smoothing_follows_steady_motion_exactly_and_removes_noise():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 100, (68, 2))
    truth = [base + (2.0 * t, -1.0 * t) for t in range(20)]
    assert max(np.abs(s - t).max() for s, t in zip(smooth_track(truth, 2.0), truth)) < 1e-9  # also at both ends
    noisy = [t + rng.normal(0, 1, t.shape) for t in truth]
    noisy[7] = noisy[8] = None
    smoothed = smooth_track(noisy, 2.0)
    assert smoothed[7] is None and smoothed[8] is None  # a faceless frame stays faceless
    error = lambda track: np.mean([np.abs(p - t).mean() for p, t in zip(track, truth) if p is not None])  # noqa: E731
    assert error(smoothed) < 0.6 * error(noisy)
    assert smooth_track(noisy, 0)[3] is not noisy[3] and np.array_equal(smooth_track(noisy, 0)[3], noisy[3])


def test_tracks_split_at_long_gaps_and_jumps():
    face = np.random.default_rng(1).uniform(0, 100, (68, 2))
    track = [face, face, None, face, None, None, None, face, face + 500]
    assert track_pieces(track, max_gap=2).tolist() == [0, 0, -1, 0, -1, -1, -1, 1, 2]
    # Smoothing never mixes two pieces: the jumped face keeps its place.
    assert np.allclose(smooth_track(track, 3.0, max_gap=2)[8], face + 500)


def test_restyle_warm_start_refines_the_given_code(models):
    inverter, _ = models
    x = torch.rand(1, 3, inverter.input_size, inverter.input_size) * 2 - 1
    cold = inverter.invert(x)
    assert torch.equal(inverter.invert(x, init=None), cold)  # the default path is unchanged
    warm = inverter.invert(x, init=cold, steps=1)
    expected = cold + inverter.encoder(torch.cat([x, inverter.pool(inverter.decode(cold))], 1))
    assert torch.allclose(warm, expected, atol=1e-6)
    _, codes = inverter.invert(x, return_steps=True, init=cold, steps=2)
    assert len(codes) == 2


# ----------------------------------------------------------------------------
# Pass 1 on the synthetic clip


def test_face_found_in_every_frame_and_smoothing_lowers_jitter(clip, detector):
    frames = list(video.read_frames(clip))
    assert len(frames) == FRAMES
    track = vs.detect_track(frames, detector)
    assert all(face is not None for face in track)
    raw = vs.crop_jitter(list(vs.aligned_crops(frames, vs.smoothed_landmarks(track, 0), 128)))
    smooth = vs.crop_jitter(list(vs.aligned_crops(frames, vs.smoothed_landmarks(track, 2.0), 128)))
    assert smooth < 0.85 * raw, (raw, smooth)


# ----------------------------------------------------------------------------
# The whole video


def _run(items, out, models, detector, **kwargs):
    inverter, targets = models
    return vs.stylize_videos(items, out, inverter, targets, vs.VideoOptions(batch=4), torch.device("cpu"), detector, **kwargs)


def test_video_out_has_the_frames_rate_duration_and_audio_of_the_source(clip, models, detector, tmp_path):
    out = tmp_path / "out"
    seen = []
    (result,) = _run(vs.video_inputs([clip], []), out, models, detector, on_progress=lambda done, total, **f: seen.append((done, total, f["phase"])))
    assert result.status == "ok" and result.frames == FRAMES and result.faces == FRAMES and result.done == FRAMES
    assert result.no_face == [] and result.settings["warm_steps"] == 2
    written = out / result.outputs["disney"]
    assert written == out / "clip" / "disney.mp4"
    info = video.probe(written)
    assert info.fps == pytest.approx(FPS) and info.size == (SIDE, SIDE) and info.audio
    assert video.count_frames(written) == FRAMES and info.duration == pytest.approx(FRAMES / FPS, abs=0.1)
    manifest = json.loads((out / "clip" / "manifest.json").read_text())
    assert manifest["frames"] == FRAMES and manifest["faces"] == FRAMES and manifest["seconds_per_frame"] > 0
    assert manifest["outputs"] == {"disney": "clip/disney.mp4"}
    assert (FRAMES, FRAMES, "stylize") in seen and any(phase == "detect" for *_, phase in seen)
    # The face changed, the corners of the picture did not (much: the source is lossy).
    first = np.asarray(next(video.read_frames(written)), np.float32)
    source = np.asarray(next(video.read_frames(clip)), np.float32)
    assert np.abs(first - source)[60:130, 60:130].mean() > 10 and np.abs(first - source)[:20, :20].mean() < 4


def test_a_frame_without_a_face_keeps_the_original_picture(models, detector, tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    frames = moving_face(5)
    frames[2] = Image.new("RGB", (SIDE, SIDE), (90, 140, 200))  # sky: no face
    for k, frame in enumerate(frames):
        frame.save(folder / f"{k:04d}.png")
    out = tmp_path / "out"
    (result,) = _run(vs.video_inputs([], [folder], fps=5), out, models, detector)
    assert result.status == "ok" and result.no_face == [2] and result.faces == 4 and result.fps == 5
    kept = Image.open(out / "shots" / "frames" / "disney" / "000002.png")
    assert np.array_equal(np.asarray(kept), np.asarray(frames[2]))
    changed = Image.open(out / "shots" / "frames" / "disney" / "000001.png")
    assert not np.array_equal(np.asarray(changed), np.asarray(frames[1]))
    assert video.count_frames(out / result.outputs["disney"]) == 5


def test_resume_by_frame_after_a_stop(clip, models, detector, tmp_path):
    out = tmp_path / "out"
    stop = StopRequest()

    def stop_after_first_group(done, total, **fields):
        if fields["phase"] == "stylize" and done >= 4:
            stop.requested = True

    (first,) = _run(vs.video_inputs([clip], []), out, models, detector, on_progress=stop_after_first_group, stop=stop)
    assert first.status == "stopped" and first.done == 4 and not first.outputs
    assert not (out / "clip" / "disney.mp4").exists()
    frames = out / "clip" / "frames" / "disney"
    stamps = {p.name: p.stat().st_mtime_ns for p in frames.glob("*.png")}
    assert len(stamps) == 4

    (second,) = _run(vs.video_inputs([clip], []), out, models, detector, skip_existing=True)
    assert second.status == "ok" and second.skipped == 4 and second.done == FRAMES - 4
    assert {name: (frames / name).stat().st_mtime_ns for name in stamps} == stamps  # not redone
    assert video.count_frames(out / "clip" / "disney.mp4") == FRAMES


def test_unreadable_video_is_recorded_and_the_run_goes_on(clip, models, detector, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(clip.read_bytes()[:1000])
    results = _run(vs.video_inputs([broken], []), tmp_path / "out", models, detector)
    assert results[0].status == "error" and "cannot read video" in results[0].error
    assert json.loads((tmp_path / "out" / "broken" / "manifest.json").read_text())["status"] == "error"


# ----------------------------------------------------------------------------
# The command


def test_cli_mixed_photos_and_a_video(run_cli, clip, tmp_path):
    photo = tmp_path / "face.jpg"
    Image.fromarray(skdata.astronaut()).save(photo)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("--json", "stylize", str(photo), str(clip), "-d", "disney", "--smoke", "--no-smooth", "--out", str(out))
    assert code == 0, stderr
    summary = json.loads(stdout)  # one document for both
    assert summary["counts"]["ok"] == 1
    (clip_summary,) = summary["videos"]
    assert clip_summary["frames"] == FRAMES and clip_summary["faces"] == FRAMES and clip_summary["settings"]["smooth"] == 0
    assert (out / "stylized" / "disney" / "face.png").is_file() and (out / "clip" / "disney.mp4").is_file()

    code, stdout, stderr = run_cli("stylize", str(clip), "-d", "disney", "--smoke", "--out", str(out), "--skip-existing")
    assert code == 0, stderr
    assert "clip/disney.mp4" in stdout


def test_cli_refuses_flags_that_do_not_apply(run_cli, clip, tmp_path):
    code, _, stderr = run_cli("stylize", str(clip), "--smoke", "--no-align", "--out", str(tmp_path / "out"))
    assert code == 2 and "--no-align" in stderr
    code, _, stderr = run_cli("stylize", str(clip), "--smoke", "--fps", "10", "--out", str(tmp_path / "out"))
    assert code == 2 and "--frames-folder" in stderr
    code, _, stderr = run_cli("stylize", str(tmp_path / "missing.mp4"), "--smoke", "--out", str(tmp_path / "out"))
    assert code == 2 and "no such video" in stderr
