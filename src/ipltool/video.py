"""Video in and out, in one place: decode frames, probe, encode H.264 MP4 (with audio) or GIF.

Encoding and decoding go through imageio-ffmpeg, whose wheel ships an ffmpeg binary, so
no system ffmpeg is needed (or used). GIFs are written by Pillow. A folder of pictures
counts as a video whose frames are its images in name order. Every video is written to a
temporary name beside the target and renamed when complete: an interrupted encode never
leaves a half file under the name asked for.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ipltool.atomic import fsync_dir, temp_name
from ipltool.errors import UsageError, first_line

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
#: Containers ffmpeg is told to write (the temporary name has no telling suffix).
_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
#: Frame rate of a folder of frames unless given.
FOLDER_FPS = 30.0


@dataclass(frozen=True)
class VideoInfo:
    """What a video holds.

    Attributes:
        fps: frames per second.
        size: (width, height) of a frame.
        frames: number of frames (ffmpeg's estimate from duration x fps for a file; exact for a folder).
        duration: seconds (None when the container does not say).
        audio: the file has an audio track.
    """

    fps: float
    size: tuple[int, int]
    frames: int | None
    duration: float | None
    audio: bool


def is_video(path: str | os.PathLike) -> bool:
    """True for a file whose suffix is a video container's."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _folder_frames(folder: Path) -> list[Path]:
    from ipltool.images import find_images

    return sorted(find_images(folder), key=lambda p: p.name)


def _reader(path: Path):
    """imageio-ffmpeg's frame generator of `path` and its meta data (read from the first item)."""
    import imageio_ffmpeg

    if not path.is_file():
        raise UsageError(f"no such video: {path}")
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
    except (OSError, RuntimeError, StopIteration) as err:
        reader.close()
        raise UsageError(f"cannot read video {path}: {first_line(str(err)) or 'no video stream'}", hint="is it a complete video file?") from None
    return reader, meta


def probe(path: str | os.PathLike, fps: float | None = None) -> VideoInfo:
    """The `VideoInfo` of a video file or a folder of frames (`fps` sets a folder's rate).

    Raises:
        UsageError: a missing or unreadable video, or a folder without pictures.
    """
    path = Path(path)
    if path.is_dir():
        frames = _folder_frames(path)
        with Image.open(frames[0]) as first:
            size = first.size
        rate = fps or FOLDER_FPS
        return VideoInfo(rate, size, len(frames), len(frames) / rate, False)
    reader, meta = _reader(path)
    reader.close()
    rate = float(meta.get("fps") or 0) or FOLDER_FPS
    duration = meta.get("duration")
    duration = float(duration) if duration else None
    count = round(duration * rate) if duration else None
    return VideoInfo(rate, tuple(meta["size"]), count, duration, bool(meta.get("audio_codec")))


def read_frames(path: str | os.PathLike) -> Iterator[Image.Image]:
    """The frames of a video file or a folder of pictures, as RGB pictures, in order.

    Raises:
        UsageError: a missing or unreadable video (also when it breaks off mid-stream).
    """
    path = Path(path)
    if path.is_dir():
        from ipltool.images import load_rgb

        for frame in _folder_frames(path):
            yield load_rgb(frame)
        return
    reader, meta = _reader(path)
    width, height = meta["size"]
    try:
        for data in reader:
            yield Image.frombuffer("RGB", (width, height), data, "raw", "RGB", 0, 1).copy()
    except (OSError, RuntimeError) as err:
        raise UsageError(f"cannot read video {path}: {first_line(str(err))}", hint="is it a complete video file?") from None
    finally:
        reader.close()


def _even(frame: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """`frame` as an RGB array of `size` (H.264 with yuv420p needs even sides: padded with white)."""
    frame = frame.convert("RGB")
    if frame.size != size:
        canvas = Image.new("RGB", size, (255, 255, 255))
        canvas.paste(frame, (0, 0))
        frame = canvas
    return np.ascontiguousarray(np.asarray(frame))


def write_video(path: str | os.PathLike, frames: Iterable[Image.Image], fps: float, audio_from: str | os.PathLike | None = None) -> Path:
    """Encode `frames` (all of one size) at `fps` into `path`: .mp4/.m4v/.mov/.mkv as H.264, .gif by Pillow.

    Args:
        path: the video to write (replaced only when the encode completes).
        frames: the pictures, streamed (a generator is fine; it may raise to abort).
        fps: frame rate.
        audio_from: a video whose audio track is copied in (ignored for GIF, and when it has none).

    Returns:
        `path`.

    Raises:
        UsageError: an unsupported suffix, no frames, or frames of different sizes.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix != ".gif" and suffix not in _FORMATS:
        raise UsageError(f"cannot write {path}: write .mp4, .mov, .mkv or .gif")
    if not fps > 0:
        raise UsageError(f"the frame rate must be positive (got {fps})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        if suffix == ".gif":
            _write_gif(tmp, frames, fps)
        else:
            _write_h264(tmp, frames, fps, _FORMATS[suffix], audio_from)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def _write_gif(tmp: Path, frames: Iterable[Image.Image], fps: float) -> None:
    pictures = [frame.convert("RGB") for frame in frames]
    if not pictures:
        raise UsageError("no frames to write")
    # GIF stores delays in hundredths of a second; loop=0 repeats forever.
    pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=round(1000 / fps), loop=0, optimize=False)


def _write_h264(tmp: Path, frames: Iterable[Image.Image], fps: float, container: str, audio_from: str | os.PathLike | None) -> None:
    import imageio_ffmpeg

    writer = None
    size = None
    audio = None
    if audio_from is not None and not Path(audio_from).is_dir() and probe(audio_from).audio:
        audio = str(audio_from)
    try:
        for frame in frames:
            if writer is None:
                size = (frame.width + frame.width % 2, frame.height + frame.height % 2)
                writer = imageio_ffmpeg.write_frames(
                    str(tmp), size, fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=7, macro_block_size=2,
                    output_params=["-f", container, *(["-shortest"] if audio else [])], audio_path=audio, audio_codec="aac" if audio else None,
                )
                writer.send(None)  # start ffmpeg
            elif (frame.width + frame.width % 2, frame.height + frame.height % 2) != size:
                raise UsageError(f"frames of different sizes: {frame.size} after {size}")
            writer.send(_even(frame, size))
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise UsageError("no frames to write")
