"""The pictures made for people: adapt sample grids and stylize contact sheets (layout, labels, no empty cells)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ipltool.figures import BACKGROUND, GAP, MARGIN, fit_tile, font, grid_figure, grid_layout, label_width, shorten, text_size
from ipltool.images import to_pil


def _has_ink(image: Image.Image, box: tuple[int, int, int, int]) -> bool:
    """True when the region holds dark pixels (text), not only background or light grey."""
    return bool((np.asarray(image.crop(box).convert("L")) < 110).any())


def _is_background(image: Image.Image, box: tuple[int, int, int, int]) -> bool:
    return bool((np.asarray(image.crop(box).convert("RGB")) == BACKGROUND).all())


def test_long_labels_are_shortened_in_the_middle_to_fit():
    size = text_size(128)
    name = "holiday/a_very_long_photo_name_from_the_beach_trip_2026-face2"
    short = shorten(name, 150, size)
    assert "…" in short and short.startswith("holiday") and short.endswith("face2")
    assert font(size).getlength(short) <= 150
    assert shorten("source", 150, size) == "source"


def test_small_tiles_are_enlarged_with_nearest_neighbour_and_large_ones_shrunk():
    small = Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3))
    big = fit_tile(small, 64)
    assert big.size == (64, 64)
    assert np.array_equal(np.asarray(big)[::4, ::4], np.asarray(small))  # every source pixel a 4x4 block
    assert fit_tile(Image.new("RGB", (300, 200)), 64).size == (64, 64)


@pytest.mark.parametrize(("n", "columns"), [(1, 1), (4, 4), (8, 8), (9, 5), (17, 6), (35, 7)])
def test_samples_wrap_into_even_blocks_of_at_most_eight(n, columns):
    from ipltool.train.samples import sample_columns

    assert sample_columns(n) == columns


def _grid(stage2_models, n: int, tile: int = 64):
    from ipltool.train.samples import SampleGrid

    source = stage2_models[0]
    z = torch.randn(n, source.style_dim, generator=torch.Generator().manual_seed(3))
    return SampleGrid(source, z, 0.7, seed=2, tile=tile, title="disney · ipl"), source


def test_adapt_sample_grid_has_labelled_source_and_adapted_rows(stage2_models, tmp_path):
    grid, source = _grid(stage2_models, 4)
    path = grid.write(tmp_path / "step-000007.png", source, step=7)
    layout = grid_layout(2, 4, 64, ["source", "adapted"], caption="disney · ipl · step 7", group=2)
    with Image.open(path) as image:
        image = image.convert("RGB")
    # A column per sample, 64 px each, plus the label column and margins.
    assert image.size == layout.size
    assert image.width == 2 * MARGIN + label_width(["source", "adapted"], 64) + 4 * 64 + 3 * GAP
    for c in range(4):
        for r, images in enumerate([grid.source_images, grid.render(source)]):
            x, y = layout.tile_box(r, c)
            tile = image.crop((x, y, x + 64, y + 64))
            # The 32 px render enlarged 2x with nearest neighbour, unchanged otherwise.
            assert np.array_equal(np.asarray(tile), np.asarray(to_pil(images[c]).resize((64, 64), Image.Resampling.NEAREST)))
            assert max(high for _, high in tile.getextrema()) > 0  # never a black cell
    for r in range(2):  # "source" and "adapted" written left of their rows
        _, y = layout.tile_box(r, 0)
        assert _has_ink(image, (0, y, layout.tile_box(r, 0)[0], y + 64))
    assert _has_ink(image, (0, 0, image.width, layout.caption_height))  # the caption strip


def test_many_samples_fill_every_cell_and_a_short_last_block_is_narrower(stage2_models, tmp_path):
    grid, source = _grid(stage2_models, 35, tile=32)
    with Image.open(grid.write(tmp_path / "g.png", source, step=1)) as image:
        image = image.convert("RGB")
    layout = grid_layout(10, 7, 32, ["source", "adapted"] * 5, caption="disney · ipl · step 1", group=2)
    assert image.size == layout.size  # 35 samples: 5 blocks of 7
    for r in range(10):
        for c in range(7):
            x, y = layout.tile_box(r, c)
            assert not _is_background(image, (x, y, x + 32, y + 32)), (r, c)
    grid, source = _grid(stage2_models, 9, tile=32)
    with Image.open(grid.write(tmp_path / "h.png", source)) as image:
        image = image.convert("RGB")
    layout = grid_layout(4, 5, 32, ["source", "adapted"] * 2, caption="disney · ipl", group=2)
    assert image.size == layout.size  # 9 samples: 5 + 4
    for r in (2, 3):  # the missing 10th sample is left out (background), not drawn black
        x, y = layout.tile_box(r, 4)
        assert _is_background(image, (x, y, x + 32, y + 32))


def test_grid_figure_checks_its_labels():
    with pytest.raises(ValueError, match="row labels"):
        grid_figure([[Image.new("RGB", (8, 8))]], 16, row_labels=["a", "b"])
    with pytest.raises(ValueError, match="at least one row"):
        grid_figure([], 16)


def test_contact_sheet_has_column_headers_and_a_name_on_each_row(tmp_path):
    from ipltool.invert.outputs import SHEET_THUMB, ContactSheet, Layout

    headers = ["aligned", "reconstruction", "disney", "pixar"]
    names = ["astronaut-face1", "trips/a_very_long_photo_name_from_the_beach_holiday_of_2026"]
    sheet = ContactSheet(Layout(tmp_path), headers=headers)
    rng = np.random.default_rng(0)
    for name in names:
        sheet.add(name, [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in headers])
    sheet.flush()
    assert sheet.written == ["contact-sheet-001.png"]
    with Image.open(tmp_path / "contact-sheet-001.png") as image:
        image = image.convert("RGB")
    layout = grid_layout(2, 4, SHEET_THUMB, names, headers)
    assert image.size == layout.size and layout.header_height > 0
    x0, y0 = layout.tile_box(0, 0)
    for c in range(4):  # a header above every column
        x, _ = layout.tile_box(0, c)
        assert _has_ink(image, (x, 0, x + SHEET_THUMB, y0))
    for r in range(2):  # a name left of every row, the long one shortened to the label column
        _, y = layout.tile_box(r, 0)
        assert _has_ink(image, (0, y, x0, y + SHEET_THUMB))
        assert not _is_background(image, (x0, y, x0 + SHEET_THUMB, y + SHEET_THUMB))
    assert layout.label_width <= 1.5 * SHEET_THUMB + text_size(SHEET_THUMB)
