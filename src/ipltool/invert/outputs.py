"""Where `ipl stylize` writes, and the manifest that records every input.

Layout of `--out DIR`:

    manifest.jsonl                 one JSON line per input (status, faces, outputs, error)
    aligned/<name>.png             the aligned face at the generator's size
    reconstruction/<name>.png      the W+ code rendered by the source generator
    stylized/<label>/<name>.png    the same code through each adapted generator
    pasted/<label>/<name>.<ext>    (--paste-back) the photo with its faces replaced
    latents/<name>.pt              (--save-latents) {"w_plus": (faces, n_latent, 512), ...}
    contact-sheet-NNN.png          columns aligned | reconstruction | each stylized, a named row per face

With `--faces all`, face k (1 = largest) of a photo writes `<name>-face<k>.png`. Every file
is written to a temporary name and renamed, so an interrupted run leaves no half file,
and the manifest line of a photo is appended only after all its files exist.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ipltool.atomic import atomic_write_bytes, atomic_write_text
from ipltool.figures import fit_tile, grid_figure
from ipltool.images import png_bytes

MANIFEST_NAME = "manifest.jsonl"
SHEET_ROWS = 16
SHEET_THUMB = 128

#: Statuses of a manifest line. A re-run with --skip-existing skips the final ones
#: (a photo without a face will not grow one); `error` is tried again.
OK, NO_FACE, UNREADABLE, ERROR = "ok", "no face", "unreadable", "error"
FINAL = (OK, NO_FACE, UNREADABLE)


def encoded(image: Image.Image, suffix: str) -> bytes:
    """`image` encoded for `suffix`: JPEG at quality 95 for .jpg/.jpeg, PNG otherwise."""
    if suffix in (".jpg", ".jpeg"):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        return buffer.getvalue()
    return png_bytes(image)


@dataclass
class Layout:
    """Output paths under one `--out` folder."""

    root: Path

    def face_stem(self, name: str, face: int, all_faces: bool) -> str:
        """Output stem of face `face` (0 = largest) of the photo named `name`."""
        return f"{name}-face{face + 1}" if all_faces else name

    def aligned(self, stem: str) -> Path:
        return self.root / "aligned" / f"{stem}.png"

    def reconstruction(self, stem: str) -> Path:
        return self.root / "reconstruction" / f"{stem}.png"

    def stylized(self, label: str, stem: str) -> Path:
        return self.root / "stylized" / label / f"{stem}.png"

    def pasted(self, label: str, name: str, suffix: str) -> Path:
        keep = suffix.lower() if suffix.lower() in (".jpg", ".jpeg") else ".png"
        return self.root / "pasted" / label / f"{name}{keep}"

    def latents(self, name: str) -> Path:
        return self.root / "latents" / f"{name}.pt"

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_NAME

    def relative(self, path: Path) -> str:
        """`path` relative to the output folder, POSIX style (as the manifest stores it)."""
        return path.relative_to(self.root).as_posix()

    def write(self, path: Path, data: bytes) -> str:
        """Write `data` atomically (making folders) and return the manifest's relative path."""
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        return self.relative(path)


def record_outputs(record: dict) -> list[str]:
    """Every relative output path a manifest line names."""
    paths: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            paths.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for face in record.get("outputs", []):
        walk({k: v for k, v in face.items() if k not in ("face", "rect", "score")})
    walk(record.get("pasted", {}))
    if record.get("latents"):
        paths.append(record["latents"])
    return paths


class Manifest:
    """`manifest.jsonl`: read at start (for --skip-existing), appended one line per input.

    Under torchrun each rank appends to its own part, `manifest.rank<k>.jsonl`, and rank 0
    merges the parts into `manifest.jsonl` when all are done (`merge_parts`). Reading takes
    the parts a killed run left too, so a restart, with any number of ranks, skips what
    any rank finished.

    Args:
        layout: the output folder.
        part: this rank's part (None: `manifest.jsonl` itself).
    """

    def __init__(self, layout: Layout, part: int | None = None):
        self.layout = layout
        self.path = layout.manifest if part is None else layout.root / f"manifest.rank{part}.jsonl"

    def parts(self) -> list[Path]:
        """The rank parts present in the folder, by rank."""
        def rank(path: Path) -> int:
            digits = path.name[len("manifest.rank") : -len(".jsonl")]
            return int(digits) if digits.isdigit() else -1

        return sorted(self.layout.root.glob("manifest.rank*.jsonl"), key=rank)

    def read(self) -> dict[str, dict]:
        """Earlier lines by input path (the manifest, then any rank parts); the last line of an input wins, broken lines are dropped."""
        records: dict[str, dict] = {}
        for path in [self.layout.manifest, *self.parts()]:
            if not path.is_file():
                continue
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if isinstance(record, dict) and isinstance(record.get("input"), str):
                    records[record["input"]] = record
        return records

    def merge_parts(self, order: list[str]) -> None:
        """Rank 0, after every rank finished: the parts become `manifest.jsonl`, lines in `order` (input paths), and go away."""
        records = self.read()
        ranked = {path: i for i, path in enumerate(order)}
        lines = sorted(records.values(), key=lambda r: ranked.get(r["input"], len(ranked)))
        atomic_write_text(self.layout.manifest, "".join(json.dumps(r) + "\n" for r in lines))
        for part in self.parts():
            with contextlib.suppress(OSError):
                part.unlink()

    def start(self, kept: list[dict]) -> None:
        """Begin a run: the manifest holds exactly the `kept` lines (skipped inputs)."""
        self.layout.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict) -> None:
        """Add one input's line and flush it to disk; a failed write (disk full) leaves the file as it was.

        Raises:
            OSError: the line could not be written; the manifest keeps only whole lines.
        """
        data = (json.dumps(record) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as err:
                # Cut a partial line off: the next append would otherwise glue onto it.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                err.filename = err.filename or os.fspath(self.path)
                raise
        finally:
            os.close(fd)


def is_done(record: dict | None, layout: Layout, expected_labels: list[str], paste_back: bool, latents: bool) -> bool:
    """True when a --skip-existing run may skip the input this earlier line describes."""
    if record is None or record.get("status") not in FINAL:
        return False
    if record["status"] != OK:
        return True
    for face in record.get("outputs", []):
        if set(expected_labels) - set(face.get("stylized", {})):
            return False
    if paste_back and set(expected_labels) - set(record.get("pasted", {})):
        return False
    if latents and not record.get("latents"):
        return False
    return all((layout.root / rel).is_file() for rel in record_outputs(record))


@dataclass
class ContactSheet:
    """Pages of `SHEET_ROWS` faces, `SHEET_THUMB` px: a header band (aligned, reconstruction, each
    stylized label) and one row per face, headed by the face's output name.

    A page is written as soon as it is full (and the last one at the end), so memory stays
    flat over thousands of photos and an interrupted run keeps its finished pages.
    """

    layout: Layout
    headers: list[str]
    rows: list[list[Image.Image]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    page: int = 0
    written: list[str] = field(default_factory=list)
    prefix: str = "contact-sheet"  # `contact-sheet-rank<k>` under torchrun: ranks number their own pages

    def __post_init__(self) -> None:
        # Continue numbering after pages an earlier run wrote into the same folder.
        existing = sorted(self.layout.root.glob(f"{self.prefix}-*.png"))
        numbers = [int(p.stem.rsplit("-", 1)[1]) for p in existing if p.stem.rsplit("-", 1)[1].isdigit()]
        self.page = max(numbers, default=0)

    def add(self, name: str, images: list[Image.Image]) -> None:
        """One face's row: its output name (the relative name, `-face<k>` with --faces all) and `images` in header order."""
        self.rows.append([fit_tile(im, SHEET_THUMB) for im in images])  # thumbnails only: memory stays flat
        self.names.append(name)
        if len(self.rows) >= SHEET_ROWS:
            self.flush()

    def flush(self) -> None:
        """Write the pending rows as the next page."""
        if not self.rows:
            return
        sheet = grid_figure(self.rows, SHEET_THUMB, row_labels=self.names, column_labels=self.headers)
        self.page += 1
        path = self.layout.root / f"{self.prefix}-{self.page:03d}.png"
        self.written.append(self.layout.write(path, png_bytes(sheet)))
        self.rows, self.names = [], []
