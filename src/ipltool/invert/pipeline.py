"""The `ipl stylize` pipeline as a library call: photos in, stylized faces and a manifest out.

`ipl stylize` checks its flags, loads the encoder, the targets and the face detector,
and renders the `StylizeResult`; scripts and the web UI call `stylize_photos` with the
same objects. One call per output folder at a time (an exclusive lock on it); a photo
that fails is recorded in the manifest and the run goes on.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ipltool import console
from ipltool.atomic import sweep_stale_temps
from ipltool.distributed import all_gather, barrier, block, report_failure, world
from ipltool.errors import UsageError, did_you_mean
from ipltool.interrupt import StopRequest
from ipltool.invert.inputs import Photo
from ipltool.invert.outputs import ERROR, FINAL, OK, Layout, Manifest, is_done
from ipltool.invert.stylize import StylizeOptions, Stylizer, groups
from ipltool.invert.targets import Target
from ipltool.outdir import exclusive, write_failures

THEN = "then run the same command with --skip-existing to continue (the manifest lists the finished photos)"
#: Encoder input size of the tiny random encoders of `--smoke`.
SMOKE_INPUT_SIZE = 64


def check_face_flags(faces: str, paste_mask: str, no_align: bool, paste_back: bool, landmarks: Path | None) -> None:
    """Refuse face options that do not go together, in the words of `ipl stylize`'s flags.

    Raises:
        UsageError: one line naming the flags.
    """
    if faces not in ("largest", "all"):
        raise UsageError(f"--faces must be largest or all, not {faces!r}{did_you_mean(faces, ('largest', 'all'))}")
    if paste_mask not in ("square", "ellipse"):
        raise UsageError(f"--paste-mask must be square or ellipse, not {paste_mask!r}{did_you_mean(paste_mask, ('square', 'ellipse'))}")
    if no_align and (paste_back or faces == "all" or landmarks):
        raise UsageError("--no-align takes the whole image as the face; drop --paste-back, --faces all and --landmarks")


def encoder_options(encoder: str, restyle_steps: int | None, restyle_extra_pass: bool) -> dict:
    """The options of the ReStyle encoders, refused for the others.

    Raises:
        UsageError: a ReStyle option for another encoder.
    """
    options: dict = {}
    if restyle_steps is not None:
        if not encoder.startswith("restyle"):
            raise UsageError(f"--restyle-steps applies to the restyle-* encoders, not {encoder!r}")
        options["restyle_steps"] = restyle_steps
    if restyle_extra_pass:
        if not encoder.startswith("restyle"):
            raise UsageError(f"--restyle-extra-pass applies to the restyle-* encoders, not {encoder!r}")
        options["extra_pass"] = True
    return options


def load_inverter(name: str, weights: Path | None, smoke: bool, options: dict, device):
    """The encoder plugin `name`, loaded from `weights` (default: its registry file) or tiny with `smoke`.

    Raises:
        UsageError: no weights file, and no default one.
        PluginError: the plugin lacks `tiny()` for `smoke`.
    """
    from ipltool import hub, registry
    from ipltool.models.stylegan2 import load_source_generator

    plugin = registry.load("encoders", name)  # checked against registry.EncoderLoader
    if smoke:
        tiny = registry.optional_method("encoders", name, plugin, "tiny", "--smoke")
        source = load_source_generator("tiny", device=device)
        return tiny(source, seed=0, input_size=SMOKE_INPUT_SIZE, device=device, **options)
    if weights is None:
        default = getattr(plugin, "default_weights", None)
        if not default:
            raise UsageError(f"encoder {name!r} has no default weights", hint="pass its checkpoint with --weights FILE")
        weights = hub.ensure(default)
    elif not weights.is_file():
        raise UsageError(f"no such encoder checkpoint: {weights}")
    return plugin.load(weights, device=device, **options)


@dataclass
class StylizeResult:
    """What a stylize call did: the stylizer (its counts and faces), what was kept, the contact sheets."""

    stylizer: Stylizer
    kept: list[dict]  # manifest records of photos done by an earlier run (--skip-existing)
    total: int  # photos asked for
    todo: int  # photos this call set out to process
    seconds: float
    layout: Layout
    sheets: list[str]
    stopped: bool  # a stop request ended the run between groups

    @property
    def failed(self) -> int:
        """Photos that did not end "ok" (no face, unreadable, error)."""
        return sum(n for status, n in self.stylizer.counts.items() if status != OK)


def status_counts(stylizer: Stylizer) -> dict[str, int]:
    """Photos per status, in the summary's order: the fields of a progress update."""
    return {status: stylizer.counts[status] for status in (*FINAL, ERROR)}


def stylize_photos(
    photos: list[Photo],
    out: Path,
    inverter,
    targets: list[Target],
    options: StylizeOptions,
    device,
    detector=None,
    skip_existing: bool = False,
    on_progress: Callable[..., None] = lambda done, total, **counts: None,
    stop: StopRequest | None = None,
) -> StylizeResult:
    """Align, invert and render every photo into `out`, batch by batch, writing the manifest as it goes.

    Args:
        photos: the photos (`invert.inputs.collect_photos`).
        out: the output folder (checked by the caller with `invert.inputs.check_output_dir`).
        inverter: the encoder (an `ipltool.encoders` plugin's inverter).
        targets: the adapted generators (`invert.targets.load_targets`); none writes
            aligned faces and reconstructions only.
        options: faces, alignment, paste-back, latents, batch, precision.
        detector: the face detector (None with `options.align` off).
        skip_existing: keep the photos an earlier run's manifest lists as done.
        on_progress: `on_progress(done, total, **status_counts)` after each group.
        stop: when requested between groups, the call returns with `stopped` set.

    Raises:
        UsageError: another stylize holds `out`, or it cannot be written (the message
            says how to continue).
    """
    w = world()
    everyone = photos
    if w.distributed:
        # Each rank takes a contiguous run of whole groups of the photos in the order given (the
        # command line's, folders sorted by name): the same share after a restart, and the same
        # groups as one process, so every output file is the same file.
        lo, hi = block(len(photos), options.batch, w)
        photos = photos[lo:hi]
    try:
        return _stylize_share(photos, everyone, out, inverter, targets, options, device, detector, skip_existing, on_progress, stop)
    except BaseException:
        held = f"photos {lo + 1}..{hi} of {len(everyone)} ({photos[0].path} .. {photos[-1].path})" if w.distributed and photos else "no photos"
        report_failure(held)
        raise


def _stylize_share(photos, everyone, out, inverter, targets, options, device, detector, skip_existing, on_progress, stop) -> StylizeResult:
    """`stylize_photos` for this rank's `photos` (all of them outside torchrun)."""
    w = world()
    with exclusive(out, "stylize", "--out"), write_failures(out, "--out", THEN):
        if w.main:
            sweep_stale_temps(out)  # temporary files of a run that was killed mid-write
        layout = Layout(out)
        labels = [t.label for t in targets]
        earlier = Manifest(layout).read() if skip_existing else {}
        barrier()  # every rank has read the earlier manifest and parts before any rank starts its own part
        kept, todo = [], []
        for photo in photos:
            record = earlier.get(str(photo.path))
            if is_done(record, layout, labels, options.paste_back, options.save_latents):
                kept.append(record)
            else:
                todo.append(photo)
        stylizer = Stylizer(inverter, targets, layout, options, device, detector)
        stylizer.manifest.start(kept)
        if kept:
            console.info(f"--skip-existing: {len(kept)} of {len(photos)} photos already done")
        start = time.perf_counter()
        stopped = False
        done = 0
        for group in groups(todo, stylizer.prepare, options.batch):
            stylizer.process(group)
            done += len(group)
            on_progress(done, len(todo), **status_counts(stylizer))
            if stop is not None and stop.requested:
                stopped = True
                break
        sheets = stylizer.finish()
        result = StylizeResult(stylizer, kept, len(photos), len(todo), time.perf_counter() - start, layout, sheets, stopped)
        if w.distributed:
            _merge_ranks(result, everyone)
    return result


def _merge_ranks(result: StylizeResult, photos: list[Photo]) -> None:
    """After every rank's share: rank 0 merges the manifest parts; every rank's result counts for the whole run."""
    parts = all_gather((dict(result.stylizer.counts), result.stylizer.faces_done, result.kept, result.total, result.todo, result.sheets, result.stopped, result.seconds))
    if world().main:
        result.stylizer.manifest.merge_parts([str(photo.path) for photo in photos])
    barrier()  # the merged manifest exists before any rank reports
    result.stylizer.counts = Counter()
    for counts, *_ in parts:
        result.stylizer.counts.update(counts)
    result.stylizer.faces_done = sum(part[1] for part in parts)
    result.kept = [record for part in parts for record in part[2]]
    result.total, result.todo = sum(part[3] for part in parts), sum(part[4] for part in parts)
    result.sheets = [sheet for part in parts for sheet in part[5]]
    result.stopped = any(part[6] for part in parts)
    result.seconds = max(part[7] for part in parts)  # the run took as long as its slowest rank
