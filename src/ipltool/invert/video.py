"""The video path of `ipl stylize`: frames -> tracked, smoothed landmarks -> warm-started inversion -> video.

Each video gets its own folder `--out DIR/<name>/`:

    landmarks.json          pass 1: per frame the tracked face's raw 68 landmarks (or null), its
                            rectangle and score; reused by a `--skip-existing` run of the same video
    frames/<label>/NNNNNN.png   pass 2: every finished frame, the stylized face pasted back
    <label>.mp4             the video of each target (`reconstruction.mp4` when there is none),
                            at the source frame rate, with the source's audio track
    manifest.json           frames, faces found, smoothing, timing, outputs

Pass 1 decodes the video and detects the face of every frame, following one face (the
one overlapping the previous frame's most, else the largest). The landmark tracks are
smoothed over time (`invert.smoothing.smooth_track`) before pass 2 aligns each frame, so
the crop does not jitter. A ReStyle encoder starts each frame from the previous frame's
code (`warm_steps` passes instead of its full count). Frames without a face keep the
original picture. Frames are written one by one, so Ctrl-C and `--skip-existing` resume
by frame; the videos are encoded when every frame exists.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ipltool import video as video_io
from ipltool.atomic import atomic_write_bytes, atomic_write_text, sweep_stale_temps
from ipltool.errors import NonFiniteError, UsageError
from ipltool.images import to_tensor
from ipltool.interrupt import StopRequest
from ipltool.invert.align import align_face, paste_back
from ipltool.invert.smoothing import DEFAULT_MAX_GAP, DEFAULT_SIGMA, smooth_track
from ipltool.invert.stylize import render_codes
from ipltool.invert.targets import Target
from ipltool.outdir import exclusive, write_failures
from ipltool.precision import FP32, Precision

LANDMARKS_NAME = "landmarks.json"
MANIFEST_NAME = "manifest.json"
#: Output names a video's folder may not take (the photo layout's folders).
RESERVED = ("aligned", "reconstruction", "stylized", "pasted", "latents")
THEN = "then run the same command with --skip-existing to continue (finished frames are kept)"


@dataclass(frozen=True)
class VideoInput:
    """One input video: a file, or a folder of frames played at `fps`; `name` is its output folder."""

    path: Path
    name: str
    fps: float | None = None  # folders only (None: `video.FOLDER_FPS`)


@dataclass
class VideoOptions:
    """How a video is stylized."""

    smooth: float = DEFAULT_SIGMA  # temporal Gaussian sigma in frames; 0 turns smoothing off
    max_gap: int = DEFAULT_MAX_GAP  # faceless frames bridged by the smoothing
    warm_steps: int = 2  # ReStyle passes of a frame started from the previous frame's code; 0: cold starts
    paste_mask: str = "square"
    batch: int = 4  # frames per generator call
    precision: Precision = FP32
    suffix: str = ".mp4"  # of the videos written (see `video.write_video`)


@dataclass
class VideoResult:
    """What became of one video; `to_dict()` is its summary (and most of its manifest)."""

    input: str
    name: str
    folder: Path
    status: str = "ok"  # ok, stopped, error
    frames: int = 0
    faces: int = 0  # frames with a face
    no_face: list[int] = field(default_factory=list)  # frame numbers (from 0) without one: kept as they were
    done: int = 0  # frames stylized by this call
    skipped: int = 0  # frames kept from an earlier call (--skip-existing)
    fps: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)  # detect, stylize, encode, total
    outputs: dict[str, str] = field(default_factory=dict)  # label -> video, relative to --out
    settings: dict = field(default_factory=dict)  # encoder, smoothing, warm start
    error: str | None = None

    @property
    def seconds_per_frame(self) -> float | None:
        """Pass-2 seconds per stylized frame (None when no frame was stylized)."""
        return round(self.seconds.get("stylize", 0.0) / self.done, 4) if self.done else None

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        data = asdict(self)
        data["folder"] = str(self.folder)
        data["seconds_per_frame"] = self.seconds_per_frame
        return data


# ----------------------------------------------------------------------------
# Inputs


def split_inputs(specs: list[str]) -> tuple[list[str], list[Path]]:
    """Split command-line inputs into photo specs and video files (a name with a video suffix, `video.is_video`).

    A folder or a glob stays a photo spec: folders are searched for pictures only.
    """
    photos, videos = [], []
    for spec in specs:
        path = Path(os.path.expanduser(spec))
        if video_io.is_video(path) and not path.is_dir() and not any(ch in spec for ch in "*?["):
            videos.append(path)
        else:
            photos.append(spec)
    return photos, videos


def check_video_flags(videos: list[VideoInput], no_align: bool, faces: str, fps: float | None, folders: list[Path]) -> None:
    """Refuse `ipl stylize` flags that do not apply to videos, in the words of its flags.

    Raises:
        UsageError: one line naming the flag.
    """
    if fps is not None and not folders:
        raise UsageError("--fps sets the frame rate of --frames-folder; a video file keeps its own")
    if videos and no_align:
        raise UsageError("--no-align does not apply to videos: each frame is detected and aligned", hint="stylize the videos in a separate command")
    if videos and faces == "all":
        raise UsageError("--faces all does not apply to videos: they follow one face", hint="stylize the videos in a separate command")


def video_inputs(files: list[Path], folders: list[Path], fps: float | None = None) -> list[VideoInput]:
    """The videos of a run with unique output names: video files, then folders of frames.

    Args:
        files: video files (see `video.is_video`).
        folders: folders of frames, played at `fps` (default `video.FOLDER_FPS`).

    Raises:
        UsageError: a missing file or folder.
    """
    for path in files:
        if not path.is_file():
            raise UsageError(f"no such video: {path}")
    for path in folders:
        if not path.is_dir():
            raise UsageError(f"no such folder of frames: {path}", hint="--frames-folder takes a folder of pictures in name order")
    taken: set[str] = set()
    inputs = []
    for path, rate in [(p, None) for p in files] + [(p, fps) for p in folders]:
        stem = path.stem if path.is_file() else path.resolve().name
        name = f"{stem}-video" if stem.lower() in RESERVED else stem
        unique, counter = name, 2
        while unique.lower() in taken:  # clip.mp4 from two folders
            unique, counter = f"{name}-{counter}", counter + 1
        taken.add(unique.lower())
        inputs.append(VideoInput(path, unique, rate))
    return inputs


def check_video_output(out: Path, videos: list[VideoInput]) -> None:
    """Refuse an output folder inside a folder of frames, or one that holds an input video.

    Raises:
        UsageError: one line naming the input.
    """
    where = out.resolve()
    for item in videos:
        source = item.path.resolve()
        if item.path.is_dir() and (where == source or source in where.parents):
            raise UsageError(f"--out {out} is inside the folder of frames {item.path}", hint="choose an output folder outside the inputs")
        if where in source.parents:
            raise UsageError(f"--out {out} contains the input {item.path}", hint="choose an output folder that holds no input")


# ----------------------------------------------------------------------------
# Pass 1: landmark tracks


def _overlap(a, b) -> float:
    """Intersection over union of two (left, top, right, bottom) rectangles."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def detect_track(frames, detector, on_frame: Callable[[int, int], None] = lambda done, faces: None, stop: StopRequest | None = None) -> list[dict | None]:
    """Detect one face per frame, following it from frame to frame.

    The face chosen is the one overlapping the previous frame's face most (intersection over
    union at least 0.3), else the largest; so a larger passer-by does not steal the track.

    Args:
        frames: the pictures (an iterator is fine).
        detector: a `FaceDetector`.
        on_frame: `on_frame(frames done, frames with a face)` after each frame.
        stop: a stop request ends the pass early (the track is then incomplete).

    Returns:
        Per frame, None or {"landmarks": (68, 2) list, "rect": [l, t, r, b], "score": float, "found": faces seen}.
    """
    track: list[dict | None] = []
    previous = None
    for frame in frames:
        found = detector.detect(np.asarray(frame.convert("RGB")))
        face = None
        if found:
            face = found[0]
            if previous is not None:
                best = max(found, key=lambda f: _overlap(f.rect, previous))
                if _overlap(best.rect, previous) >= 0.3:
                    face = best
        previous = face.rect if face is not None else previous
        track.append(None if face is None else {"landmarks": face.landmarks.tolist(), "rect": [int(v) for v in face.rect], "score": round(float(face.score), 4), "found": len(found)})
        on_frame(len(track), sum(item is not None for item in track))
        if stop is not None and stop.requested:
            break
    return track


def _source_key(path: Path) -> dict:
    """What identifies a version of an input: a changed video (or folder) detects again."""
    if path.is_dir():
        frames = video_io.folder_frames(path)
        return {"frames": [p.relative_to(path).as_posix() for p in frames], "mtime_ns": max(p.stat().st_mtime_ns for p in frames)}
    info = path.stat()
    return {"bytes": info.st_size, "mtime_ns": info.st_mtime_ns}


def landmark_track(item: VideoInput, folder: Path, detector, reuse: bool, on_frame=lambda done, faces: None, stop: StopRequest | None = None) -> list[dict | None] | None:
    """Pass 1 of a video: its raw face track, from `landmarks.json` when `reuse` and still valid, else detected (and saved).

    Returns:
        The track (see `detect_track`), or None when a stop request cut the pass short.
    """
    cache = folder / LANDMARKS_NAME
    key = {"source": _source_key(item.path), "min_score": detector.min_score, "upsample": detector.upsample}
    if reuse and cache.is_file():
        try:
            saved = json.loads(cache.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            saved = None
        if isinstance(saved, dict) and saved.get("key") == key and isinstance(saved.get("track"), list):
            return saved["track"]
    track = detect_track(video_io.read_frames(item.path), detector, on_frame, stop)
    if stop is not None and stop.requested:
        return None
    atomic_write_text(cache, json.dumps({"key": key, "track": track}))
    return track


def smoothed_landmarks(track: list[dict | None], sigma: float, max_gap: int = DEFAULT_MAX_GAP) -> list[np.ndarray | None]:
    """The (68, 2) landmarks per frame after temporal smoothing (`sigma` 0: as detected), None where no face."""
    raw = [None if item is None else np.asarray(item["landmarks"], dtype=np.float64) for item in track]
    return smooth_track(raw, sigma, max_gap)


def aligned_crops(frames, landmarks: list[np.ndarray | None], size: int) -> Iterator[Image.Image | None]:
    """The aligned face of each frame at `size` px (None where there is no face)."""
    for frame, points in zip(frames, landmarks):
        yield None if points is None else align_face(frame, points, output_size=size).image


def crop_jitter(crops: list[Image.Image | None]) -> float:
    """Mean absolute change of the aligned crop between consecutive frames, in grey levels (0..255).

    Only pairs of neighbouring frames that both have a face count; nan when there is no pair.
    A still face gives 0; landmark noise shows up as a shaking, hence changing, crop.
    """
    changes = [
        float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())
        for a, b in itertools.pairwise(crops)
        if a is not None and b is not None
    ]
    return float(np.mean(changes)) if changes else float("nan")


# ----------------------------------------------------------------------------
# Pass 2: stylized frames


def _frame_path(folder: Path, label: str, index: int) -> Path:
    return folder / "frames" / label / f"{index:06d}.png"


def _save_png(path: Path, image: Image.Image) -> None:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # frames are temporary: speed over size
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


class _FrameStylizer:
    """Inverts, renders and pastes back groups of frames, carrying the code of the last frame for warm starts."""

    def __init__(self, inverter, generators: dict[str, torch.nn.Module], options: VideoOptions, device):
        self.inverter, self.generators, self.options, self.device = inverter, generators, options, device
        self.warm = bool(getattr(inverter, "warm_start", False)) and options.warm_steps > 0
        self.last: tuple[int, torch.Tensor] | None = None  # (frame index, W+ code)

    def _invert(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """W+ codes of encoder inputs `x`; a single frame `index` right after the last one starts from its code."""
        warm = self.warm and index is not None and self.last is not None and self.last[0] == index - 1
        with self.options.precision.autocast():
            code = self.inverter.invert(x, init=self.last[1], steps=self.options.warm_steps) if warm else self.inverter.invert(x)
        code = code.float()
        if index is not None:
            self.last = (index, code)
        return code

    @torch.no_grad()
    def run(self, group: list[tuple[int, Image.Image, np.ndarray | None]]) -> dict[str, list[Image.Image]]:
        """The finished pictures of every label for `group` (index, frame, landmarks), in order."""
        faces = [(k, align_face(frame, points, output_size=self.inverter.input_size)) for k, (_, frame, points) in enumerate(group) if points is not None]
        out = {label: [frame for _, frame, _ in group] for label in self.generators}
        if not faces:
            self.last = None
            return out
        if self.warm:  # each frame starts from the one before: one at a time
            codes = torch.cat([self._invert(to_tensor(aligned.image)[None].to(self.device), group[k][0]) for k, aligned in faces])
            if faces[-1][0] != len(group) - 1:
                self.last = None  # the group ends without a face: the next frame starts cold
        else:
            x = torch.stack([to_tensor(aligned.image) for _, aligned in faces]).to(self.device)
            codes = torch.cat([self._invert(chunk) for chunk in x.split(self.options.batch)])
        if not torch.isfinite(codes).all():
            raise NonFiniteError(f"the {self.inverter.name} encoder made a W+ code with NaN or infinite values", hint="check its weights")
        for label, generator in self.generators.items():
            rendered = render_codes(generator, codes, self.options.batch, self.options.precision)
            if not torch.isfinite(rendered).all():
                raise NonFiniteError(f"generator {label!r} rendered NaN or infinite pixels", hint="check its weights")
            for row, (k, aligned) in enumerate(faces):
                out[label][k] = paste_back(group[k][1], rendered[row], aligned.quad_src, mask=self.options.paste_mask)
        return out


def _write_group(folder: Path, group: list, pictures: dict[str, list[Image.Image]]) -> None:
    """Save the finished frames of `group` (index, frame, landmarks) for every label."""
    for label, images in pictures.items():
        for (index, _, _), image in zip(group, images):
            _save_png(_frame_path(folder, label, index), image)


# ----------------------------------------------------------------------------
# One video, several videos


def stylize_video(
    item: VideoInput,
    out: Path,
    inverter,
    targets: list[Target],
    options: VideoOptions,
    device,
    detector,
    skip_existing: bool = False,
    on_progress: Callable[..., None] = lambda done, total, **fields: None,
    stop: StopRequest | None = None,
) -> VideoResult:
    """Stylize one video into `out/<item.name>/` (see the module docstring for the files).

    Args:
        item: the video (`video_inputs`).
        out: the output folder of the run.
        inverter: the encoder; one with `warm_start` refines each frame from the previous code.
        targets: the adapted generators; none renders the reconstruction only.
        options: smoothing, warm start, paste mask, batch, precision, video suffix.
        detector: a `FaceDetector`.
        skip_existing: reuse the saved landmarks and keep finished frames.
        on_progress: `on_progress(done, total, video=..., phase=..., faces=...)` after each frame.
        stop: a stop request ends the call after the current frames (status "stopped").

    Raises:
        UsageError: an unreadable video.
        NonFiniteError: a model made NaN or infinite values.
    """
    start = time.perf_counter()
    folder = out / item.name
    folder.mkdir(parents=True, exist_ok=True)
    info = video_io.probe(item.path, fps=item.fps)
    result = VideoResult(str(item.path), item.name, folder, fps=info.fps, frames=info.frames or 0)
    generators = {t.label: t.generator for t in targets} or {"reconstruction": inverter.decoder}
    warm = options.warm_steps if getattr(inverter, "warm_start", False) else 0
    result.settings = {"encoder": inverter.name, "smooth": options.smooth, "warm_steps": warm, "precision": options.precision.name, "paste_mask": options.paste_mask}

    # Pass 1: detection (cached), then smoothing.
    def detected(done: int, faces: int) -> None:
        on_progress(done, info.frames, video=item.name, phase="detect", faces=faces)

    track = landmark_track(item, folder, detector, skip_existing, detected, stop)
    result.seconds["detect"] = round(time.perf_counter() - start, 3)
    if track is None:
        return _finish(result, "stopped", start)
    result.frames, result.faces = len(track), sum(face is not None for face in track)
    result.no_face = [index for index, face in enumerate(track) if face is None]
    landmarks = smoothed_landmarks(track, options.smooth, options.max_gap)

    # Pass 2: the frames not finished before, in groups of `options.batch`.
    begin = time.perf_counter()
    stylizer = _FrameStylizer(inverter, generators, options, device)
    group: list[tuple[int, Image.Image, np.ndarray | None]] = []
    frames = zip(range(result.frames), video_io.read_frames(item.path), landmarks)
    for index, frame, points in frames:
        if skip_existing and all(_frame_path(folder, label, index).is_file() for label in generators):
            result.skipped += 1
            continue
        group.append((index, frame, points))
        if len(group) < options.batch and index + 1 < result.frames:
            continue
        _write_group(folder, group, stylizer.run(group))
        result.done += len(group)
        on_progress(result.done + result.skipped, result.frames, video=item.name, phase="stylize", faces=result.faces)
        group = []
        if stop is not None and stop.requested:
            break
    if group:  # the last frames, after skipped ones
        _write_group(folder, group, stylizer.run(group))
        result.done += len(group)
    result.seconds["stylize"] = round(time.perf_counter() - begin, 3)
    if stop is not None and stop.requested and result.done + result.skipped < result.frames:
        return _finish(result, "stopped", start)

    # Encode each label's frames at the source rate, with its audio.
    begin = time.perf_counter()
    audio = item.path if item.path.is_file() else None
    for label in generators:
        frames = (Image.open(_frame_path(folder, label, i)).convert("RGB") for i in range(result.frames))
        path = video_io.write_video(folder / f"{label}{options.suffix}", frames, info.fps, audio_from=audio, count=result.frames)
        result.outputs[label] = path.relative_to(out).as_posix()
    result.seconds["encode"] = round(time.perf_counter() - begin, 3)
    return _finish(result, "ok", start)


def _finish(result: VideoResult, status: str, start: float) -> VideoResult:
    """Set the status and total time, and write the video's manifest."""
    result.status = status
    result.seconds["total"] = round(time.perf_counter() - start, 3)
    atomic_write_text(result.folder / MANIFEST_NAME, json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def stylize_videos(
    videos: list[VideoInput],
    out: Path,
    inverter,
    targets: list[Target],
    options: VideoOptions,
    device,
    detector,
    skip_existing: bool = False,
    on_progress: Callable[..., None] = lambda done, total, **fields: None,
    stop: StopRequest | None = None,
) -> list[VideoResult]:
    """`stylize_video` for each video under one lock of `out`; an unreadable video is recorded and the run goes on.

    Returns:
        One `VideoResult` per video started (the run ends early on a stop request).

    Raises:
        UsageError: another stylize holds `out`, or it cannot be written.
    """
    from ipltool.distributed import all_gather, shard, world

    results = []
    everyone, videos = videos, shard(videos)  # under torchrun: every size-th video (each has its own folder)
    with exclusive(out, "stylize", "--out"), write_failures(out, "--out", THEN):
        if world().main:
            sweep_stale_temps(out)
        for item in videos:
            try:
                results.append(stylize_video(item, out, inverter, targets, options, device, detector, skip_existing, on_progress, stop))
            except UsageError as err:
                failed = VideoResult(str(item.path), item.name, out / item.name, error=err.message)
                failed.folder.mkdir(parents=True, exist_ok=True)
                results.append(_finish(failed, "error", time.perf_counter()))
            if stop is not None and stop.requested:
                break
    if world().distributed:  # every rank reports every video, in the order given
        order = {str(item.path): i for i, item in enumerate(everyone)}
        results = sorted((r for part in all_gather(results) for r in part), key=lambda r: order.get(r.input, len(order)))
    return results
