"""Video in and out, in one place: decode frames, probe, encode H.264 MP4 (with audio), VP9 WebM or GIF.

Encoding and decoding go through imageio-ffmpeg, whose wheel ships an ffmpeg binary, so
no system ffmpeg is needed (or used). GIFs are written by Pillow. A folder of pictures
counts as a video whose frames are its images in name order. Every video is written to a
temporary name beside the target and renamed when complete: an interrupted encode never
leaves a half file under the name asked for.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ipltool.atomic import fsync_dir, temp_name
from ipltool.errors import UsageError, first_line

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
#: Suffixes `write_video` writes: ffmpeg container (the temporary name has no telling suffix), video codec.
_FORMATS = {
    ".mp4": ("mp4", "libx264"),
    ".m4v": ("mp4", "libx264"),
    ".mov": ("mov", "libx264"),
    ".mkv": ("matroska", "libx264"),
    ".webm": ("webm", "libvpx-vp9"),
}
#: Audio codecs each container takes as they are; other audio is re-encoded (AAC, or Opus for WebM).
_AUDIO_COPY = {
    "mp4": ("aac", "mp3", "alac"),
    "mov": ("aac", "mp3", "alac", "pcm_s16le"),
    "matroska": None,  # Matroska takes any codec
    "webm": ("opus", "vorbis"),
}
#: Frame rate of a folder of frames unless given.
FOLDER_FPS = 30.0
_HINT = "is it a complete video file? `ffprobe FILE` (or another player) shows whether it plays"


@dataclass(frozen=True)
class VideoInfo:
    """What a video holds.

    Attributes:
        fps: frames per second.
        size: (width, height) of a frame.
        frames: number of frames. For a file this is an estimate, round(duration x fps),
            from the container's header (exact for constant-rate video, which is what
            cameras and ffmpeg write; `count_frames` decodes to count). Exact for a folder.
            None when the container gives no duration.
        duration: seconds (None when the container does not say).
        audio: the file has an audio track.
        audio_codec: its codec as ffmpeg names it ("aac", "opus", ...), else None.
    """

    fps: float
    size: tuple[int, int]
    frames: int | None
    duration: float | None
    audio: bool
    audio_codec: str | None = None


def is_video(path: str | os.PathLike) -> bool:
    """True for a file name whose suffix is a video container's (`VIDEO_SUFFIXES`; the file need not exist)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def folder_frames(folder: str | os.PathLike) -> list[Path]:
    """The pictures of a folder of frames, sorted by name (recursively, as `images.find_images` finds them).

    Raises:
        UsageError: the folder holds no picture.
    """
    from ipltool.images import find_images

    frames = sorted(find_images(folder), key=lambda p: Path(p).relative_to(folder).as_posix())
    if not frames:
        raise UsageError(f"no frames in {folder}", hint="a folder of frames holds pictures (.png, .jpg) named in frame order")
    return frames


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
        raise UsageError(f"cannot read video {path}: {_reason(err)}", hint=_HINT) from None
    if not meta.get("size"):
        reader.close()
        raise UsageError(f"cannot read video {path}: no video stream", hint=_HINT)
    return reader, meta


def _reason(err: BaseException) -> str:
    """The telling line of an ffmpeg failure (imageio-ffmpeg puts its own words first, ffmpeg's log after)."""
    text = str(err)
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and ("Invalid data" in line or "moov atom" in line or "No such" in line or "Error" in line):
            return line[:200]
    return first_line(err) if text.strip() else "no video stream"


def probe(path: str | os.PathLike, fps: float | None = None) -> VideoInfo:
    """The `VideoInfo` of a video file or a folder of frames, without decoding the frames.

    Args:
        path: a video file, or a folder of pictures.
        fps: frame rate of a folder (default `FOLDER_FPS`); ignored for a file, which says its own.

    Raises:
        UsageError: a missing or unreadable video, or a folder without pictures.
    """
    path = Path(path)
    if path.is_dir():
        frames = folder_frames(path)
        from ipltool.images import load_rgb

        size = load_rgb(frames[0]).size  # EXIF-rotated, as `read_frames` yields it
        rate = float(fps or FOLDER_FPS)
        return VideoInfo(rate, size, len(frames), len(frames) / rate, False)
    reader, meta = _reader(path)
    reader.close()
    rate = float(meta.get("fps") or 0) or FOLDER_FPS
    duration = meta.get("duration")
    duration = float(duration) if duration else None
    count = round(duration * rate) if duration else None
    named = re.match(r"[A-Za-z0-9_]+", str(meta.get("audio_codec") or ""))  # imageio-ffmpeg may keep a trailing comma
    codec = named.group(0) if named else None
    return VideoInfo(rate, tuple(meta["size"]), count, duration, bool(codec), codec)


def count_frames(path: str | os.PathLike) -> int:
    """The exact number of frames of a video file (decodes it all: seconds for a long video) or a folder.

    Raises:
        UsageError: a missing or unreadable video.
    """
    import imageio_ffmpeg

    path = Path(path)
    if path.is_dir():
        return len(folder_frames(path))
    if not path.is_file():
        raise UsageError(f"no such video: {path}")
    try:
        frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except (OSError, RuntimeError) as err:
        raise UsageError(f"cannot read video {path}: {_reason(err)}", hint=_HINT) from None
    return int(frames)


def read_frames(path: str | os.PathLike) -> Iterator[Image.Image]:
    """The frames of a video file or a folder of pictures, as RGB pictures, in order (streamed).

    Raises:
        UsageError: a missing or unreadable video (also when it breaks off mid-stream),
            or an unreadable picture in a folder.
    """
    path = Path(path)
    if path.is_dir():
        from ipltool.images import load_rgb

        for frame in folder_frames(path):
            yield load_rgb(frame)
        return
    reader, meta = _reader(path)
    width, height = meta["size"]
    try:
        for data in reader:
            yield Image.frombuffer("RGB", (width, height), data, "raw", "RGB", 0, 1).copy()
    except (OSError, RuntimeError) as err:
        raise UsageError(f"cannot read video {path}: {_reason(err)}", hint=_HINT) from None
    finally:
        reader.close()


def _even(frame: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """`frame` as an RGB array of `size` (yuv420p needs even sides: an odd side gets one white pixel row or column)."""
    frame = frame.convert("RGB")
    if frame.size != size:
        canvas = Image.new("RGB", size, (255, 255, 255))
        canvas.paste(frame, (0, 0))
        frame = canvas
    return np.ascontiguousarray(np.asarray(frame))


def write_video(
    path: str | os.PathLike,
    frames: Iterable[Image.Image],
    fps: float,
    audio_from: str | os.PathLike | None = None,
    count: int | None = None,
) -> Path:
    """Encode `frames` (all of one size) at `fps` into `path`.

    .mp4/.m4v/.mov/.mkv get H.264 (libx264, yuv420p; an odd width or height is padded by
    one white pixel), .webm gets VP9, .gif is written by Pillow (looping forever).

    Args:
        path: the video to write (replaced only when the encode completes; its folder is made).
        frames: the pictures, streamed (a generator is fine; if it raises, nothing is written).
        fps: frame rate.
        audio_from: a video whose audio track is put in (copied when the container takes its
            codec, else re-encoded); ignored for GIF, for a folder, and when it has no audio.
        count: the number of frames, when `frames` has no length (a generator): the audio is
            then cut to the video's duration. Without either, a longer audio track plays on
            over the last frame.

    Returns:
        `path`.

    Raises:
        UsageError: an unsupported suffix, no frames, frames of different sizes, or a
            failed encode.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix != ".gif" and suffix not in _FORMATS:
        raise UsageError(f"cannot write {path}: write .mp4, .m4v, .mov, .mkv, .webm or .gif")
    if not fps > 0:
        raise UsageError(f"the frame rate must be positive (got {fps})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        if suffix == ".gif":
            _write_gif(tmp, frames, fps)
        else:
            if count is None and hasattr(frames, "__len__"):
                count = len(frames)
            _write_ffmpeg(tmp, frames, fps, *_FORMATS[suffix], audio_from, count)
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
    # GIF stores delays in hundredths of a second (Pillow rounds the milliseconds); loop=0 repeats forever.
    pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=round(1000 / fps), loop=0, optimize=False)


def audio_codec(path: str | os.PathLike) -> str | None:
    """The codec of the first audio track of any media file (a video, or audio only), or None.

    Reads the stream list ffmpeg prints for `-i FILE` (the binary of imageio-ffmpeg).

    Raises:
        UsageError: a missing file.
    """
    import subprocess

    import imageio_ffmpeg

    if not Path(path).is_file():
        raise UsageError(f"no such file: {path}")
    # Without an output ffmpeg exits 1 after listing the streams; the listing is what is wanted.
    done = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", os.fspath(path)], check=False, capture_output=True, text=True, errors="replace")
    found = re.search(r"Stream #\S+.*?: Audio: ([A-Za-z0-9_]+)", done.stderr)
    return found.group(1) if found else None


def _audio_args(container: str, audio_from: str | os.PathLike | None) -> tuple[str | None, str | None]:
    """(audio file, audio codec) for `write_frames`: (None, None) when there is no audio to put in."""
    if audio_from is None or Path(audio_from).is_dir():
        return None, None
    codec = audio_codec(audio_from)
    if codec is None:
        return None, None
    takes = _AUDIO_COPY[container]
    if takes is None or codec in takes:
        return str(audio_from), "copy"
    return str(audio_from), "libopus" if container == "webm" else "aac"


def _write_ffmpeg(tmp: Path, frames: Iterable[Image.Image], fps: float, container: str, codec: str, audio_from, count: int | None) -> None:
    import imageio_ffmpeg

    audio, audio_codec = _audio_args(container, audio_from)
    output = ["-f", container]
    if audio and count:
        # Cut the audio at the video's end. (`-shortest` would be simpler, but it can drop the
        # last video frames when the audio ends a little early, as AAC priming makes it.)
        output += ["-t", f"{count / fps:.6f}"]
    if codec == "libvpx-vp9":
        output += ["-b:v", "0", "-crf", "32", "-row-mt", "1"]  # constant quality; -b:v 0 turns the bitrate cap off
    writer = None
    size = None
    try:
        for frame in frames:
            even = (frame.width + frame.width % 2, frame.height + frame.height % 2)
            if writer is None:
                size = even
                writer = imageio_ffmpeg.write_frames(
                    str(tmp), size, fps=fps, codec=codec, pix_fmt_out="yuv420p",
                    quality=7 if codec == "libx264" else None, macro_block_size=2,
                    output_params=output, audio_path=audio, audio_codec=audio_codec, ffmpeg_log_level="error",
                )
                writer.send(None)  # start ffmpeg
            elif even != size:
                raise UsageError(f"frames of different sizes: {frame.size} after {size}", hint="resize the frames to one size first")
            writer.send(_even(frame, size))
        if writer is None:
            raise UsageError("no frames to write")
        writer.close()  # waits for ffmpeg: a failed encode raises here
    except (OSError, RuntimeError) as err:
        raise UsageError(f"cannot encode {container} video: {_reason(err)}") from None
    finally:
        if writer is not None:
            writer.close()
