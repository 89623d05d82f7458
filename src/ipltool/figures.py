"""Pictures for people: tiles in a grid with row labels, column headers and a caption strip.

The `ipl adapt` sample grids, the `ipl stylize` contact sheets and the `ipl eval` report
grids are all laid out here, so they share one look: white background, square tiles of
one size, labels in Pillow's bundled scalable font (Aileron) sized to the tiles, long
labels shortened with an ellipsis in the middle (the end of a name usually tells two
apart), and no empty cells: a short row is simply narrower.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
CAPTION_BACKGROUND = (234, 236, 240)
INK = (30, 30, 30)
GAP = 4  # between neighbouring tiles
GROUP_GAP = 14  # between groups of rows (the source/adapted pairs of a sample grid)
MARGIN = 8  # around the whole figure
ELLIPSIS = "…"


@functools.cache
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at `size` px (needs Pillow >= 10.1)."""
    return ImageFont.load_default(size=size)


def text_size(tile: int) -> int:
    """Font size for labels next to `tile`-px tiles: about a tenth of a tile, 12 to 24 px."""
    return max(12, min(24, round(tile / 10)))


def shorten(text: str, width: float, size: int) -> str:
    """`text`, or its start and end joined by an ellipsis, so that it is at most `width` px wide at `size` px."""
    face = font(size)
    if face.getlength(text) <= width:
        return text
    keep = len(text) - 1
    while keep > 0:
        head = text[: (keep + 1) // 2]
        tail = text[len(text) - keep // 2 :] if keep // 2 else ""
        candidate = head + ELLIPSIS + tail
        if face.getlength(candidate) <= width:
            return candidate
        keep -= 1
    return ELLIPSIS


def fit_tile(image: Image.Image, tile: int) -> Image.Image:
    """`image` as an RGB `tile` x `tile` square.

    Shrinking uses Lanczos; enlarging (only tiny test generators are smaller than a tile)
    uses nearest neighbour, so their pixels stay visible instead of blurring into mush.
    """
    image = image.convert("RGB")
    if image.size == (tile, tile):
        return image
    enlarging = image.width < tile or image.height < tile
    return image.resize((tile, tile), Image.Resampling.NEAREST if enlarging else Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class GridLayout:
    """Where everything of a grid figure goes, in px; `tile_box(r, c)` is the top-left corner of a tile."""

    tile: int
    columns: int
    rows: int
    group: int  # rows per group, set apart by GROUP_GAP; 0: no groups
    label_width: int  # the row-label column, 0 without row labels
    header_height: int  # the column-header band, 0 without headers
    caption_height: int  # the caption strip, 0 without a caption

    @property
    def text(self) -> int:
        """Font size of every label of the figure."""
        return text_size(self.tile)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole figure."""
        width = 2 * MARGIN + self.label_width + self.columns * self.tile + (self.columns - 1) * GAP
        _, last = self.tile_box(self.rows - 1, 0)
        return width, last + self.tile + MARGIN

    def tile_box(self, row: int, column: int) -> tuple[int, int]:
        """Top-left corner of the tile in `row`, `column`."""
        x = MARGIN + self.label_width + column * (self.tile + GAP)
        y = self.caption_height + self.header_height + MARGIN + row * (self.tile + GAP)
        if self.group:
            y += (row // self.group) * (GROUP_GAP - GAP)
        return x, y


def label_width(labels: Sequence[str], tile: int) -> int:
    """Width of the row-label column for `labels`: the widest label plus padding, at most 1.5 tiles."""
    if not labels:
        return 0
    size = text_size(tile)
    widest = max(font(size).getlength(label) for label in labels)
    return int(min(widest, 1.5 * tile)) + size


def grid_layout(
    rows: int, columns: int, tile: int, row_labels: Sequence[str] = (), column_labels: Sequence[str] = (), caption: str = "", group: int = 0
) -> GridLayout:
    """The layout `grid_figure` draws for these arguments (tests use it to check a figure's geometry)."""
    size = text_size(tile)
    band = size + size // 2 + 6  # one line of text with some air above and below
    return GridLayout(
        tile=tile,
        columns=columns,
        rows=rows,
        group=group,
        label_width=label_width(row_labels, tile),
        header_height=band if column_labels else 0,
        caption_height=band + 4 if caption else 0,
    )


def grid_figure(
    rows: Sequence[Sequence[Image.Image]],
    tile: int,
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    caption: str = "",
    group: int = 0,
) -> Image.Image:
    """Tiles in rows, with labels: the layout of every picture ipltool makes for people.

    Args:
        rows: pictures per row, left to right; a shorter row ends early (no empty
            cells are drawn). Each picture is made a `tile`-px square (`fit_tile`).
        tile: edge of a tile in px.
        row_labels: one per row, left of the row (empty: no label column).
        column_labels: one per column, above the first row (empty: no header band).
        caption: one line in a grey strip at the top (empty: no strip).
        group: rows per group, groups set apart by a wider gap (2 keeps the
            source/adapted pairs of a sample grid together; 0: no groups).

    Returns:
        An RGB picture of size `grid_layout(...).size`.
    """
    if not rows:
        raise ValueError("a figure needs at least one row")
    if row_labels and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    columns = max((len(row) for row in rows), default=0)
    layout = grid_layout(len(rows), max(columns, len(column_labels), 1), tile, row_labels, column_labels, caption, group)
    figure = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(figure)
    face = font(layout.text)
    if caption:
        draw.rectangle((0, 0, layout.size[0] - 1, layout.caption_height - 1), fill=CAPTION_BACKGROUND)
        text = shorten(caption, layout.size[0] - 2 * MARGIN, layout.text)
        draw.text((MARGIN, layout.caption_height // 2), text, font=face, fill=INK, anchor="lm")
    for c, header in enumerate(column_labels):
        x, _ = layout.tile_box(0, c)
        y = layout.caption_height + MARGIN + layout.header_height // 2
        draw.text((x + tile // 2, y), shorten(header, tile, layout.text), font=face, fill=INK, anchor="mm")
    for r, row in enumerate(rows):
        _, y = layout.tile_box(r, 0)
        if row_labels:
            text = shorten(row_labels[r], layout.label_width - layout.text, layout.text)
            draw.text((MARGIN, y + tile // 2), text, font=face, fill=INK, anchor="lm")
        for c, picture in enumerate(row):
            figure.paste(fit_tile(picture, tile), layout.tile_box(r, c))
    return figure
