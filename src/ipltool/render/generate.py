"""The `ipl generate` pipeline as a library call: generators and seeds (or saved codes) in, pictures out.

A **column** is one generator to render: an adapted generator, a style strength of one
(`render.blend`), a blend, or a source generator. A **row** is one latent: a seed (mapped
and truncated by the column's source generator, `render.latents`, as `ipl eval` does) or a
saved W+ code (`ipl stylize --save-latents`). Every picture uses the generators' constant
noise, so a seed renders the same face in every command and on every run.

Outputs are added, never overwritten: a picture whose file exists with other content is
written as `seed0042-2.png`; one with the same content is left as it is ("unchanged").
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ipltool.atomic import atomic_write_bytes
from ipltool.errors import CheckpointError, NonFiniteError, UsageError
from ipltool.images import png_bytes, to_pil
from ipltool.interrupt import StopRequest
from ipltool.models.stylegan2 import Generator, load_generator, load_source_generator
from ipltool.precision import FP32, Precision
from ipltool.render.blend import blend_label, mixed_generator, strength_label
from ipltool.render.generators import GeneratorRef, unique_label
from ipltool.render.latents import seed_w, seed_z, slerp, truncation_centre, walk_times

#: Largest tile of a grid or video frame (a 1024 px generator is shown at half size).
MAX_TILE = 512
#: Smallest tile: tiny test generators are enlarged so that labels fit.
MIN_TILE = 128


# ----------------------------------------------------------------------------
# Columns: the generators of a call


@dataclass
class Column:
    """One generator to render, with the source generator that maps and truncates its seeds."""

    label: str
    generator: Generator
    source: Generator
    source_name: str
    origin: str = ""


class Loader:
    """Loads each generator file and each source generator once, on one device."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._files: dict[tuple[Path, int], Generator] = {}
        self._sources: dict[str, Generator] = {}

    def source(self, name: str) -> Generator:
        """The source generator `name` (registry name, "tiny" or a .pt path)."""
        if name not in self._sources:
            self._sources[name] = load_source_generator(name, device=self.device)
        return self._sources[name]

    def generator(self, ref: GeneratorRef) -> Generator:
        """The generator `ref` names (a registry generator is its own source)."""
        if ref.is_source:
            return self.source(ref.source)
        key = (ref.path, ref.path.stat().st_mtime_ns)  # a file replaced on disk is read again
        if key not in self._files:
            self._files[key] = load_generator(ref.path).to(self.device).eval().requires_grad_(False)
        return self._files[key]

    def source_of(self, ref: GeneratorRef, needed_by: str | None) -> tuple[Generator, str]:
        """(source generator, its name) of `ref`, checked to share its W+ space.

        A file whose source is unknown maps its seeds with its own mapping network (adaptation
        never changes it, so the faces are the same), unless `needed_by` (a flag) needs
        the source's weights.

        Raises:
            UsageError: the source is unknown and `needed_by` needs it.
            CheckpointError: the source renders another W+ space than the generator.
        """
        generator = self.generator(ref)
        if ref.source is None:
            if needed_by:
                raise UsageError(
                    f"{ref.origin}: its source generator is unknown (a file outside any run folder), and {needed_by} needs it",
                    hint="name it with --source-generator (a registry name such as stylegan2-ffhq-1024, or a .pt file)",
                )
            return generator, ref.label
        source = self.source(ref.source)
        if (source.n_latent, source.style_dim) != (generator.n_latent, generator.style_dim):
            raise CheckpointError(
                f"{ref.origin} takes W+ codes of {generator.n_latent}x{generator.style_dim}, its source generator "
                f"{ref.source!r} makes {source.n_latent}x{source.style_dim}",
                hint="pass the source it was adapted from with --source-generator",
            )
        return source, ref.source


def build_columns(
    refs: Sequence[GeneratorRef],
    loader: Loader,
    strengths: Sequence[float] = (1.0,),
    blend: Sequence[tuple[GeneratorRef, float]] = (),
    with_source: bool = False,
) -> list[Column]:
    """The columns of a call: the source generators (`with_source`) first, then each generator
    at each strength, then the blend (at each strength).

    Args:
        refs: the `-g` generators.
        loader: loads them on its device.
        strengths: `--strength` values (1: the generator as trained).
        blend: `--blend` (generator, weight) pairs; empty: no blend column.
        with_source: add a column per distinct source generator ("source").

    Raises:
        UsageError: nothing to render, or a source needed but unknown.
        CheckpointError: generators that cannot be mixed (other sources or architectures).
    """
    if not refs and not blend:
        raise UsageError("no generator to render", hint="name one with -g: a domain, a run folder, a .pt file or a registry generator")
    need = "--strength" if any(alpha != 1 for alpha in strengths) else ("--source" if with_source else None)
    taken: set[str] = {ref.label for ref in refs}
    columns: list[Column] = []
    for ref in refs:
        target = loader.generator(ref)
        source, source_name = loader.source_of(ref, None if ref.is_source else need)
        if ref.is_source:
            columns.append(Column(ref.label, target, source, source_name, ref.origin))
            continue
        for alpha in strengths:
            label = ref.label if alpha == 1 else unique_label(strength_label(ref.label, alpha), taken)
            generator = target if alpha == 1 else mixed_generator(source, [(target, alpha)], [ref.origin])
            columns.append(Column(label, generator, source, source_name, ref.origin))
    if blend:
        columns += _blend_columns(blend, loader, strengths, taken)
    if with_source:
        sources: dict[str, Generator] = {}
        for column in columns:
            sources.setdefault(column.source_name, column.source)
        names = list(sources)
        heads = [Column("source" if len(names) == 1 else unique_label(f"source-{name}", taken), sources[name], sources[name], name, name) for name in names]
        columns = heads + columns
    return columns


def _blend_columns(blend: Sequence[tuple[GeneratorRef, float]], loader: Loader, strengths: Sequence[float], taken: set[str]) -> list[Column]:
    refs = [ref for ref, _ in blend]
    generators = [loader.generator(ref) for ref in refs]
    names = [ref.origin for ref in refs]
    known = [ref for ref in refs if ref.source is not None]
    total = sum(weight for _, weight in blend)
    needs_source = abs(total - 1) > 1e-9 or any(alpha != 1 for alpha in strengths)
    if known:
        source, source_name = loader.source_of(known[0], None)
    elif needs_source:
        raise UsageError(
            f"the blend's weights sum to {total:g} (or a --strength is set), which mixes in the source generator, "
            "and none of its generators knows its source",
            hint="name it with --source-generator, or give weights that sum to 1",
        )
    else:
        source, source_name = generators[0], refs[0].label  # its mapping network is the source's
    pairs = [(ref.label, weight) for ref, weight in blend]
    columns = []
    for alpha in strengths:
        terms = [(generator, weight * alpha) for generator, (_, weight) in zip(generators, blend)]
        mixed = mixed_generator(source if known else None, terms, names)
        label = unique_label(strength_label(blend_label(pairs), alpha), taken)
        columns.append(Column(label, mixed, source, source_name, " + ".join(names)))
    return columns


# ----------------------------------------------------------------------------
# Rows: the latents of a call


@dataclass(frozen=True)
class Row:
    """One latent: a seed, or a saved W+ code (n_latent, style_dim). `name` is its file stem."""

    name: str
    seed: int | None = None
    code: torch.Tensor | None = None


def seed_rows(seeds: Sequence[int]) -> list[Row]:
    """A row per seed, named `seed0042`."""
    return [Row(f"seed{seed:04d}", seed=seed) for seed in seeds]


def latent_rows(paths: Sequence[Path]) -> list[Row]:
    """A row per face of `ipl stylize --save-latents` files (`{"w_plus": (faces, n_latent, D)}`) or folders of them.

    Raises:
        UsageError: a missing path, a folder without .pt files, or a file without W+ codes.
    """
    from ipltool import checkpoints

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("*.pt"))
            if not found:
                raise UsageError(f"no .pt files in {path}", hint="pass the latents/ folder of `ipl stylize --save-latents`")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"no such latents file or folder: {path}")
    rows, taken = [], set()
    for path in files:
        data = checkpoints.read(path, "latents file")
        codes = data.get("w_plus") if isinstance(data, dict) else None
        if not isinstance(codes, torch.Tensor) or codes.dim() not in (2, 3) or not codes.is_floating_point():
            raise UsageError(f"{path} holds no W+ codes (expected a 'w_plus' tensor of faces x layers x 512)", hint="make them with `ipl stylize --save-latents`")
        codes = codes.float()[None] if codes.dim() == 2 else codes.float()
        if not torch.isfinite(codes).all():
            raise UsageError(f"{path}: its W+ codes hold NaN or infinite values")
        for i, code in enumerate(codes):
            name = path.stem if len(codes) == 1 else f"{path.stem}-face{i + 1}"
            rows.append(Row(unique_label(name, taken), code=code))
    return rows


# ----------------------------------------------------------------------------
# Rendering


@dataclass
class RenderOptions:
    """How seeds become pictures: truncation ψ towards the centre of `centre_seed`, batch size, precision."""

    truncation: float = 0.7
    centre_seed: int = 0
    batch: int = 8
    precision: Precision = FP32


class Renderer:
    """Renders rows through columns; caches each source's truncation centre."""

    def __init__(self, columns: Sequence[Column], options: RenderOptions):
        self.columns = list(columns)
        self.options = options
        self._centres: dict[int, torch.Tensor] = {}

    def centre(self, source: Generator) -> torch.Tensor:
        """The truncation centre of `source` (computed once)."""
        key = id(source)
        if key not in self._centres:
            self._centres[key] = truncation_centre(source, self.options.centre_seed)
        return self._centres[key]

    def codes(self, source: Generator, rows: Sequence[Row]) -> torch.Tensor:
        """The W (B, D) or W+ (B, n_latent, D) codes of `rows` for columns of `source`."""
        if all(row.code is not None for row in rows):
            return torch.stack([row.code for row in rows]).to(source.device)
        if any(row.code is not None for row in rows):
            raise ValueError("one batch mixes seeds and saved codes")
        z = seed_z([row.seed for row in rows], source.style_dim)
        return seed_w(source, z, self.centre(source), self.options.truncation)

    @torch.no_grad()
    def render_codes(self, column: Column, codes: torch.Tensor) -> torch.Tensor:
        """`codes` through `column`'s generator with its constant noise: (B, 3, H, W) float32 on the CPU.

        Raises:
            NonFiniteError: the generator renders NaN or infinite pixels.
        """
        with self.options.precision.autocast():
            images, _ = column.generator([codes.to(column.generator.device)], input_is_latent=True, randomize_noise=False)
        images = images.float().cpu()
        if not torch.isfinite(images).all():
            raise NonFiniteError(
                f"{column.label} ({column.origin}) renders NaN or infinite pixels",
                hint="its weights are broken, or --strength is too far outside 0..1; try --precision fp32",
            )
        return images

    def render(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        """{column label: (len(rows), 3, H, W) images in [-1, 1]} for one batch of rows."""
        codes: dict[int, torch.Tensor] = {}
        out = {}
        for column in self.columns:
            key = id(column.source)
            if key not in codes:
                codes[key] = self.codes(column.source, rows)
            out[column.label] = self.render_codes(column, codes[key])
        return out


def tile_size(columns: Sequence[Column]) -> int:
    """Tile edge of grids and video frames: the largest generator's size, within MIN_TILE..MAX_TILE."""
    return max(MIN_TILE, min(MAX_TILE, max(column.generator.size for column in columns)))


# ----------------------------------------------------------------------------
# Files


def add_file(path: Path, data: bytes) -> tuple[Path, str]:
    """Write `data` to `path`, or beside it: never over a different file.

    Returns:
        (the path written or matched, "written" | "unchanged"): an existing file with the
        same bytes is left alone; one with other bytes keeps its name and `data` goes to
        `stem-2.suffix` (the first free or identical one).
    """
    candidate, counter = path, 2
    while candidate.exists():
        if candidate.is_file() and candidate.read_bytes() == data:
            return candidate, "unchanged"
        candidate = path.with_name(f"{path.stem}-{counter}{path.suffix}")
        counter += 1
    candidate.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(candidate, data)
    return candidate, "written"


def free_path(path: Path) -> Path:
    """`path`, or `stem-2.suffix`, `stem-3.suffix`... if it is taken: a new file never replaces an old one."""
    candidate, counter = path, 2
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{counter}{path.suffix}")
        counter += 1
    return candidate


@dataclass
class GenerateResult:
    """What a generate call wrote: a record per picture, the grid, the video; `stopped` by a stop request."""

    columns: list[str]
    rows: int
    written: list[dict] = field(default_factory=list)
    grid: Path | None = None
    video: Path | None = None
    frames: int = 0
    seconds: float = 0.0
    stopped: bool = False

    def as_dict(self) -> dict:
        """The JSON summary of `ipl generate --json`."""
        return {
            "columns": self.columns,
            "rows": self.rows,
            "pictures": self.written,
            "grid": str(self.grid) if self.grid else None,
            "video": str(self.video) if self.video else None,
            "frames": self.frames,
            "seconds": round(self.seconds, 3),
            "stopped": self.stopped,
        }


def generate_pictures(
    columns: Sequence[Column],
    rows: Sequence[Row],
    out: Path,
    options: RenderOptions,
    grid: bool = False,
    pictures: bool = True,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    stop: StopRequest | None = None,
) -> GenerateResult:
    """Render every row through every column into `out/<column>/<row>.png`, and the comparison grid.

    Args:
        columns: from `build_columns`.
        rows: `seed_rows` or `latent_rows`.
        out: the output folder.
        options: truncation, centre seed, batch, precision.
        grid: also write `out/grid.png`: a row per latent, a column per generator, with headers.
        pictures: write the single pictures (False: the grid only).
        on_progress: `on_progress(rows done, rows)` after each batch.
        stop: when requested between batches, the call returns with what is written and `stopped` set.
    """
    from ipltool.distributed import all_gather, block, world

    result = GenerateResult([c.label for c in columns], len(rows))
    renderer = Renderer(columns, options)
    start = time.perf_counter()
    grid_rows: list[list[Image.Image]] = []
    done = 0
    lo, hi = block(len(rows), options.batch)  # under torchrun: this rank's whole batches of rows
    all_rows, rows = rows, rows[lo:hi]
    for first in range(0, len(rows), options.batch):
        batch = rows[first : first + options.batch]
        images = renderer.render(batch)
        for i, row in enumerate(batch):
            line = []
            for column in columns:
                picture = to_pil(images[column.label][i])
                line.append(picture)
                if pictures:
                    path, status = add_file(out / column.label / f"{row.name}.png", png_bytes(picture))
                    result.written.append({"column": column.label, "row": row.name, "seed": row.seed, "path": str(path), "status": status})
            if grid:
                grid_rows.append(line)
        done += len(batch)
        on_progress(done, len(rows))
        if stop is not None and stop.requested and done < len(rows):
            result.stopped = True
            break
    w = world()
    if w.distributed:  # rank 0 reports (and draws the grid of) every rank's rows, in the order given
        parts = all_gather((result.written, [[png_bytes(p) for p in line] for line in grid_rows], rows[: len(grid_rows)], result.stopped))
        order = {row.name: i for i, row in enumerate(all_rows)}
        result.written = sorted((r for part in parts for r in part[0]), key=lambda r: order[r["row"]])
        lines = sorted(((row, line) for part in parts for row, line in zip(part[2], part[1])), key=lambda pair: order[pair[0].name])
        grid_rows = [[Image.open(io.BytesIO(data)) for data in line] for _, line in lines]
        rows = [row for row, _ in lines]
        result.stopped = any(part[3] for part in parts)
    if grid and grid_rows and w.main:
        from ipltool.figures import grid_figure

        figure = grid_figure(grid_rows, tile_size(columns), row_labels=[row.name for row in rows[: len(grid_rows)]], column_labels=result.columns)
        result.grid, _ = add_file(out / "grid.png", png_bytes(figure))
    result.seconds = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------
# Interpolation videos


@dataclass
class WalkOptions:
    """A latent walk: key seeds, frames per segment, frame rate, loop back to the start, Z or W."""

    keys: list[int]
    frames: int = 60
    fps: float = 30.0
    loop: bool = False
    space: str = "z"  # "z": slerp between z codes; "w": lerp between truncated w codes


def check_walk(walk: WalkOptions) -> None:
    """Refuse walks that cannot be made, in the words of `ipl generate`'s flags.

    Raises:
        UsageError: fewer than two keys, frames or fps out of range, an unknown space.
    """
    if len(walk.keys) < 2:
        raise UsageError(f"--interpolate needs at least two seeds, e.g. 0,3,7 (got {','.join(map(str, walk.keys))})")
    if not 1 <= walk.frames <= 10_000:
        raise UsageError(f"--frames must be between 1 and 10000 (got {walk.frames})")
    if not 0 < walk.fps <= 240:
        raise UsageError(f"--fps must be between 0 and 240 (got {walk.fps:g})")
    if walk.space not in ("z", "w"):
        raise UsageError(f"--space must be z (slerp) or w (lerp), not {walk.space!r}")


def walk_codes(renderer: Renderer, source: Generator, walk: WalkOptions) -> torch.Tensor:
    """The w codes (frames, style_dim) of the walk for columns of `source`."""
    z = seed_z(walk.keys, source.style_dim)
    times = walk_times(len(walk.keys), walk.frames, walk.loop)
    if walk.space == "z":
        path = torch.stack([slerp(z[k], z[(k + 1) % len(z)], t) for k, t in times])
        return seed_w(source, path, renderer.centre(source), renderer.options.truncation)
    w = seed_w(source, z, renderer.centre(source), renderer.options.truncation)
    return torch.stack([(1 - t) * w[k] + t * w[(k + 1) % len(w)] for k, t in times])


def walk_frames(columns: Sequence[Column], walk: WalkOptions, options: RenderOptions, on_frame: Callable[[int, int], None], stop: StopRequest | None) -> Iterator[Image.Image]:
    """The frames of the walk: every column side by side under its label.

    Raises:
        Interrupted: a stop request (the video is then not written).
    """
    from ipltool.errors import Interrupted
    from ipltool.figures import grid_figure

    renderer = Renderer(columns, options)
    codes: dict[int, torch.Tensor] = {}
    for column in columns:
        if id(column.source) not in codes:
            codes[id(column.source)] = walk_codes(renderer, column.source, walk)
    total = len(next(iter(codes.values())))
    tile = tile_size(columns)
    labels = [column.label for column in columns]
    for first in range(0, total, options.batch):
        images = {c.label: renderer.render_codes(c, codes[id(c.source)][first : first + options.batch]) for c in columns}
        for i in range(len(images[labels[0]])):
            yield grid_figure([[to_pil(images[label][i]) for label in labels]], tile, column_labels=labels)
            on_frame(first + i + 1, total)
        if stop is not None and stop.requested:
            raise Interrupted(f"stopped after {first + len(images[labels[0]])} of {total} frames; no video written", hint="run the same command again")


def interpolation_video(
    columns: Sequence[Column],
    walk: WalkOptions,
    path: Path,
    options: RenderOptions,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    stop: StopRequest | None = None,
) -> GenerateResult:
    """Write the latent walk through `walk.keys` as a video at `path` (any suffix `video.write_video` writes), beside any file already there.

    Raises:
        UsageError: a bad walk, or a suffix `video.write_video` does not write (refused before any frame).
        Interrupted: stopped before the end (nothing written).
    """
    from ipltool import video

    check_walk(walk)
    result = GenerateResult([c.label for c in columns], len(walk.keys))
    start = time.perf_counter()
    target = free_path(path)
    count = 0

    def counted(done: int, total: int) -> None:
        nonlocal count
        count = done
        on_progress(done, total)

    video.write_video(target, walk_frames(columns, walk, options, counted, stop), walk.fps)
    result.video, result.frames, result.seconds = target, count, time.perf_counter() - start
    return result


def plan_columns(
    generators: Sequence[str],
    runs_root: Path,
    device: torch.device | str = "cpu",
    strengths: Sequence[float] = (1.0,),
    blend: Sequence[tuple[str, float]] = (),
    with_source: bool = False,
    source_generator: str | None = None,
) -> list[Column]:
    """Resolve and load the generators of `-g` and `--blend` and build the columns (see `build_columns`).

    Args:
        generators: `-g` values: domains, run folders, .pt files or registry generators.
        runs_root: where domain names find their newest finished run.
        device: where the generators go.
        strengths: `--strength` values.
        blend: `--blend` (name, weight) pairs (names as in `generators`).
        with_source: a column per source generator.
        source_generator: `--source-generator`, the source of files outside run folders.

    Raises:
        UsageError, CheckpointError: as `resolve_generator` and `build_columns`.
    """
    from ipltool.render.generators import resolve_generator, resolve_generators

    refs = resolve_generators(list(generators), runs_root, source_generator)
    blend_refs = [(resolve_generator(name, runs_root, source_generator), weight) for name, weight in blend]
    return build_columns(refs, Loader(device), strengths, blend_refs, with_source)
