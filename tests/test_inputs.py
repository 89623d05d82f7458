"""Which photos `stylize` reads, how they are decoded, and the names their outputs get."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ipltool import images
from ipltool.errors import UsageError
from ipltool.images import UnreadableImage, load_rgb
from ipltool.invert.inputs import check_output_dir, collect_photos


def _save(path, mode="RGB", size=(8, 6), color=(200, 100, 50)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


# ----------------------------------------------------------------------------
# Decoding


def test_modes_become_rgb(tmp_path):
    grey = _save(tmp_path / "grey.png", "L", color=90)
    assert np.asarray(load_rgb(grey))[0, 0].tolist() == [90, 90, 90]

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk)  # pure red in CMYK
    red = np.asarray(load_rgb(cmyk))[0, 0]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.save(tmp_path / "p.png")
    assert np.asarray(load_rgb(tmp_path / "p.png"))[0, 0].tolist() == [10, 20, 30]


def test_transparent_pixels_are_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red, hidden where alpha is 0
    rgba[0, 0, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_rgb(tmp_path / "a.png"))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[1, 1].tolist() == [255, 255, 255]


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = np.asarray(load_rgb(tmp_path / "deep.png"))[0, :, 0]
    assert out.tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    picture = Image.new("RGB", (20, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    picture.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_rgb(tmp_path / "rot.jpg").size == (10, 20)


def test_damaged_and_fake_files_are_unreadable(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(good.getvalue()[:200])
    (tmp_path / "notes.png").write_text("not a picture")
    for name in ("cut.jpg", "notes.png", "missing.png"):
        with pytest.raises(UnreadableImage):
            load_rgb(tmp_path / name)


def test_decompression_bomb_limit(tmp_path, monkeypatch):
    _save(tmp_path / "big.png", size=(100, 100))
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 99)
    with pytest.raises(UnreadableImage, match="decompression-bomb"):
        load_rgb(tmp_path / "big.png")


# ----------------------------------------------------------------------------
# Collecting


def test_files_folders_globs_and_list_file(tmp_path, monkeypatch):
    a = _save(tmp_path / "in" / "a.jpg")
    b = _save(tmp_path / "in" / "deep" / "b.png")
    (tmp_path / "in" / "readme.txt").write_text("x")
    c = _save(tmp_path / "other" / "c.webp")
    listed = tmp_path / "lists" / "photos.txt"
    listed.parent.mkdir()
    listed.write_text("# my photos\n\n../other/c.webp\n../in/a.jpg\n../gone.jpg\n")

    photos = collect_photos([str(tmp_path / "in")], listed)
    assert [p.path for p in photos] == [a, b, c, tmp_path / "gone.jpg"]  # a listed twice: once
    assert [p.name for p in photos] == ["a", "deep/b", "c", "gone"]

    photos = collect_photos([str(tmp_path / "**" / "*.png")])
    assert [p.path for p in photos] == [b]
    assert photos[0].name == "in/deep/b"


def test_output_names_never_collide(tmp_path):
    x1 = _save(tmp_path / "one" / "x.jpg")
    x2 = _save(tmp_path / "two" / "x.jpg")
    x3 = _save(tmp_path / "one" / "x.png")
    names = [p.name for p in collect_photos([str(x1), str(x2), str(x3)])]
    assert len(set(names)) == 3
    assert names[0] == "x"


def test_bad_inputs_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        collect_photos([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images"):
        collect_photos([str(tmp_path / "empty")])
    with pytest.raises(UsageError, match="no image matches"):
        collect_photos([str(tmp_path / "*.jpg")])
    with pytest.raises(UsageError, match="no input"):
        collect_photos([])


def test_output_folder_must_not_sit_among_inputs(tmp_path):
    photo = _save(tmp_path / "in" / "a.jpg")
    photos = collect_photos([str(tmp_path / "in")])
    for bad in (tmp_path / "in", tmp_path / "in" / "out"):
        with pytest.raises(UsageError, match="inside the input folder"):
            check_output_dir(bad, photos, [str(tmp_path / "in")])
    with pytest.raises(UsageError, match="contains the input"):
        check_output_dir(tmp_path, collect_photos([str(photo)]), [str(photo)])
    check_output_dir(tmp_path / "out", photos, [str(tmp_path / "in")])
