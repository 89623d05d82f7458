"""`ipltool.video`: decode, probe and encode through imageio-ffmpeg (MP4, WebM, GIF, folders of frames)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from PIL import Image

imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="imageio-ffmpeg is not installed")

from ipltool import video  # noqa: E402
from ipltool.errors import UsageError  # noqa: E402


def _frames(count: int = 12, size: tuple[int, int] = (48, 32)) -> list[Image.Image]:
    """A bright square moving over a dark background: frames that differ from each other."""
    frames = []
    for k in range(count):
        a = np.full((size[1], size[0], 3), 30, np.uint8)
        a[8:20, 2 + 2 * k : 14 + 2 * k] = (230, 200, 40)
        frames.append(Image.fromarray(a))
    return frames


@pytest.fixture(scope="module")
def tone(tmp_path_factory):
    """A 2 s AAC tone, made with the ffmpeg binary that imageio-ffmpeg ships."""
    path = tmp_path_factory.mktemp("audio") / "tone.m4a"
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac", str(path)],
        check=True,
    )
    return path


def test_is_video_by_suffix():
    assert video.is_video("a/clip.MP4") and video.is_video("x.webm") and video.is_video("x.mov")
    assert not video.is_video("photo.jpg") and not video.is_video("walk.gif")


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".mkv", ".webm"])
def test_round_trip_keeps_frames_fps_duration_and_size(tmp_path, suffix):
    frames = _frames(12)
    path = video.write_video(tmp_path / f"clip{suffix}", frames, fps=12)
    info = video.probe(path)
    assert info.fps == pytest.approx(12) and info.size == (48, 32) and not info.audio
    assert info.frames == 12 and info.duration == pytest.approx(1.0, abs=0.05)
    assert video.count_frames(path) == 12
    back = list(video.read_frames(path))
    assert len(back) == 12 and all(f.mode == "RGB" and f.size == (48, 32) for f in back)
    # Lossy, but the same pictures: the moving square is where it was.
    error = np.abs(np.asarray(back[5], np.float32) - np.asarray(frames[5], np.float32)).mean()
    assert error < 12


def test_odd_sizes_are_padded_to_even(tmp_path):
    path = video.write_video(tmp_path / "odd.mp4", _frames(4, (33, 21)), fps=8)
    assert video.probe(path).size == (34, 22)


def test_gif_loops_at_the_frame_rate(tmp_path):
    path = video.write_video(tmp_path / "walk.gif", _frames(6), fps=10)
    with Image.open(path) as gif:
        assert gif.n_frames == 6 and gif.info["loop"] == 0 and gif.info["duration"] == 100


def test_audio_is_copied_and_the_video_keeps_its_length(tmp_path, tone):
    assert video.audio_codec(tone) == "aac"
    path = video.write_video(tmp_path / "with-audio.mp4", _frames(12), fps=12, audio_from=tone)
    info = video.probe(path)
    assert info.audio and info.audio_codec == "aac"
    assert video.count_frames(path) == 12 and info.duration == pytest.approx(1.0, abs=0.1)  # cut to the shorter stream
    # From a video with audio to another container: re-encoded where the codec does not fit (AAC -> Opus in WebM).
    again = video.write_video(tmp_path / "again.webm", _frames(12), fps=12, audio_from=path)
    assert video.probe(again).audio_codec == "opus"
    # A source without audio gives a video without audio.
    quiet = video.write_video(tmp_path / "quiet.mp4", _frames(4), fps=12)
    silent = video.write_video(tmp_path / "silent.mp4", _frames(4), fps=12, audio_from=quiet)
    assert not video.probe(silent).audio and video.audio_codec(silent) is None


def test_folder_of_frames(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for k, frame in enumerate(_frames(5)):
        frame.save(folder / f"f{k:03d}.png")
    info = video.probe(folder, fps=5)
    assert (info.frames, info.fps, info.duration, info.size) == (5, 5.0, 1.0, (48, 32))
    assert video.probe(folder).fps == video.FOLDER_FPS
    back = list(video.read_frames(folder))
    assert np.array_equal(np.asarray(back[3]), np.asarray(_frames(5)[3]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no"):
        video.probe(tmp_path / "empty")


def test_corrupt_and_missing_videos_are_one_line_errors(tmp_path):
    good = video.write_video(tmp_path / "good.mp4", _frames(12), fps=12)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[:1500])
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    for path in (cut, text):
        for read in (video.probe, video.count_frames, lambda p: list(video.read_frames(p))):
            with pytest.raises(UsageError) as caught:
                read(path)
            assert str(path) in caught.value.message and "\n" not in caught.value.message and caught.value.hint
    with pytest.raises(UsageError, match="no such video"):
        video.probe(tmp_path / "missing.mp4")


def test_bad_requests_are_refused(tmp_path):
    with pytest.raises(UsageError, match="write .mp4"):
        video.write_video(tmp_path / "x.avi", _frames(2), fps=10)
    with pytest.raises(UsageError, match="positive"):
        video.write_video(tmp_path / "x.mp4", _frames(2), fps=0)
    with pytest.raises(UsageError, match="no frames"):
        video.write_video(tmp_path / "x.mp4", [], fps=10)
    with pytest.raises(UsageError, match="different sizes"):
        video.write_video(tmp_path / "x.mp4", [*_frames(2), *_frames(2, (64, 64))], fps=10)
    assert list(tmp_path.iterdir()) == []  # nothing left behind, not even a temporary file


def test_an_interrupted_write_leaves_the_old_file(tmp_path):
    path = video.write_video(tmp_path / "clip.mp4", _frames(6), fps=6)
    before = path.read_bytes()

    def failing():
        yield from _frames(3)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        video.write_video(path, failing(), fps=6)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]
