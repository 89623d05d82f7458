"""FFHQ face alignment and its inverse, the paste-back (docs/inversion.md §2-3).

`align_face` reproduces the alignment of the FFHQ dataset script and of the pSp / e4e /
ReStyle `align_faces` scripts step for step (their encoders expect exactly that crop).
It records `quad_src`, the face square in the photo's pixel-index coordinates, from
which `paste_back` maps a stylized picture of any size back into the photo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from ipltool.errors import UsageError, unknown_name

PRESETS = {"encoder": (256, 256), "ffhq": (1024, 4096)}  # name -> (output_size, transform_size)
DEFAULT_PRESET = "encoder"
PASTE_MASKS = ("square", "ellipse")


def alignment_sizes(size: int | str = DEFAULT_PRESET) -> tuple[int, int]:
    """(output_size, transform_size) for a preset name or a size in pixels.

    Args:
        size: `"encoder"` (256, 256: what pSp, e4e and ReStyle were trained on),
            `"ffhq"` (1024 from a 4096 transform: the dataset itself), or a number of
            pixels N (also as a string), which gives (N, N). A number never selects the
            4096 supersampling; only the name `ffhq` does.

    Raises:
        UnknownNameError: not a preset name nor a number.
        UsageError: a number below 1.
    """
    if isinstance(size, str):
        if size in PRESETS:
            return PRESETS[size]
        if not size.strip().isdigit():
            raise unknown_name("alignment preset", size, PRESETS, hint="or a size in pixels")
        size = int(size)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise UsageError(f"alignment size must be a positive number of pixels, got {size!r}")
    return int(size), int(size)


@dataclass
class AlignResult:
    """An aligned face and where it came from.

    Attributes:
        image: the aligned face, PIL RGB, `size` x `size`.
        size: its side in pixels.
        landmarks: (68, 2) float64 landmarks (x, y) in the photo.
        rect: the detector rectangle (left, top, right, bottom), if given.
        quad_src: (4, 2) float64 corners of the face square in the photo's pixel-index
            coordinates: upper-left, lower-left, lower-right, upper-right as seen in the
            aligned image. Aligned pixel (row i, col j) shows photo point
            `Q0 + (j+0.5)/size * (Q3-Q0) + (i+0.5)/size * (Q1-Q0)`.
    """

    image: Image.Image
    size: int
    landmarks: np.ndarray
    rect: tuple[int, int, int, int] | None
    quad_src: np.ndarray


def face_quad(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """The FFHQ face square of iBUG-68 landmarks (§2 steps 1-3).

    Args:
        landmarks: (68, 2) points (x, y).

    Returns:
        `(quad, qsize)`: the (4, 2) float64 corners (upper-left, lower-left, lower-right,
        upper-right) and the square's side.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"FFHQ alignment needs (68, 2) landmarks, got {lm.shape}")
    eye_left = lm[36:42].mean(axis=0)
    eye_right = lm[42:48].mean(axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg

    def rot(v):  # 90 degrees: (x, y) -> (-y, x)
        return np.array([-v[1], v[0]])

    x = eye_to_eye - rot(eye_to_mouth)
    x = x / np.hypot(*x) * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = rot(x)
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    return quad, float(np.hypot(*x) * 2)


def align_face(
    image: Image.Image,
    landmarks: np.ndarray,
    output_size: int = 256,
    transform_size: int | None = None,
    rect: tuple[int, int, int, int] | None = None,
) -> AlignResult:
    """Crop, rotate and scale a face the way FFHQ (and the FFHQ encoders) expect.

    Steps (numbered as in docs/inversion.md §2):
      1-3. The face square `quad` (side `qsize`) from the eye and mouth-corner landmarks.
      4. Shrink: if the face is 4x or more larger than the output, Lanczos-downscale
         the photo by the integer factor `floor(qsize / output_size / 2)`.
      5. Crop to the quad's bounding box plus a border of 10 % of the face.
      6. Pad: if the face reaches past the photo's edge, reflect-pad by 30 % of the face,
         and fade the padding into a blurred, then flat (median colour) version.
      7. Transform: sample the quad into a `transform_size` square (bilinear), then
         Lanczos-downscale to `output_size` if smaller.

    Args:
        image: the photo, PIL RGB (other modes are converted).
        landmarks: (68, 2) iBUG-68 points (x, y) in the photo.
        output_size: side of the aligned image.
        transform_size: side of the intermediate transform (>= output_size); defaults to
            `output_size`. See `PRESETS` and `alignment_sizes`.
        rect: the detector rectangle, stored in the result.

    Returns:
        An `AlignResult` (the aligned image plus `quad_src` for `paste_back`).
    """
    transform_size = output_size if transform_size is None else transform_size
    if transform_size < output_size:
        raise ValueError(f"transform_size ({transform_size}) must be >= output_size ({output_size})")
    if image.mode != "RGB":
        image = image.convert("RGB")
    lm = np.array(landmarks, dtype=np.float64)  # a copy, kept in the result

    # 1-3. Face square.
    quad, qsize = face_quad(lm)
    quad_src = quad.copy()
    img = image

    # 4. Shrink.
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        rsize = (int(np.rint(img.width / shrink)), int(np.rint(img.height / shrink)))
        img = img.resize(rsize, Image.Resampling.LANCZOS)
        quad /= shrink
        qsize /= shrink
        # The resize scales by W/W' (not exactly `shrink`) about pixel edges, not centres:
        # map the shrunk quad back through that, or the paste-back is (shrink-1)/2 px off.
        quad_src = (quad + 0.5) * (image.width / rsize[0], image.height / rsize[1]) - 0.5

    # 5. Crop.
    border = max(int(np.rint(qsize * 0.1)), 3)
    lo, hi = _bounds(quad)
    crop = (max(lo[0] - border, 0), max(lo[1] - border, 0), min(hi[0] + border, img.width), min(hi[1] + border, img.height))
    if crop[2] <= crop[0] or crop[3] <= crop[1]:
        raise ValueError("the face square lies entirely outside the image")
    if crop[2] - crop[0] < img.width or crop[3] - crop[1] < img.height:
        img = img.crop(crop)
        quad -= crop[0:2]

    # 6. Pad.
    lo, hi = _bounds(quad)
    pad = (max(border - lo[0], 0), max(border - lo[1], 0), max(hi[0] - img.width + border, 0), max(hi[1] - img.height + border, 0))
    if max(pad) > border - 4:
        pad = tuple(max(p, int(np.rint(qsize * 0.3))) for p in pad)
        img = _pad_and_fade(img, pad, blur=qsize * 0.02)
        quad += pad[0:2]

    # 7. Transform. PIL's QUAD data are in continuous coordinates (pixel centres at +0.5).
    data = tuple((quad + 0.5).flatten())
    img = img.transform((transform_size, transform_size), Image.Transform.QUAD, data, Image.Resampling.BILINEAR)
    if output_size < transform_size:
        img = img.resize((output_size, output_size), Image.Resampling.LANCZOS)
    return AlignResult(image=img, size=output_size, landmarks=lm, rect=rect, quad_src=quad_src)


def _bounds(quad: np.ndarray) -> tuple[list[int], list[int]]:
    """Integer bounding box of a quad: ([floor min x, floor min y], [ceil max x, ceil max y])."""
    return np.floor(quad.min(axis=0)).astype(int).tolist(), np.ceil(quad.max(axis=0)).astype(int).tolist()


def _pad_and_fade(img: Image.Image, pad: tuple[int, int, int, int], blur: float) -> Image.Image:
    """§2 step 6 after the pad sizes are known: reflect-pad, then blur and flatten the padding.

    Args:
        img: the cropped photo (RGB).
        pad: (left, top, right, bottom) in pixels.
        blur: Gaussian sigma in pixels.
    """
    left, top, right, bottom = pad
    a = np.pad(np.asarray(img, dtype=np.float32), ((top, bottom), (left, right), (0, 0)), mode="reflect")
    h, w, _ = a.shape
    # mask: 0 at the old image edge, 1 at the new outer edge, negative inside (float32 like the reference).
    x = np.arange(w, dtype=np.float32)
    y = np.arange(h, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero pad only happens for faces of a few pixels
        mask_x = 1.0 - np.minimum(x / left, (w - 1 - x) / right)
        mask_y = 1.0 - np.minimum(y / top, (h - 1 - y) / bottom)
    mask = np.maximum(mask_y[:, None], mask_x[None, :])[:, :, None]
    # img += (blurred - img) * clip(3 mask + 1); img += (median - img) * clip(mask); in place, same float32 arithmetic.
    change = gaussian_blur(a, blur)
    change -= a
    change *= np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    a += change
    np.subtract(np.median(a, axis=(0, 1)), a, out=change)
    change *= np.clip(mask, 0.0, 1.0)
    a += change
    np.rint(a, out=a)
    return Image.fromarray(np.clip(a, 0, 255, out=a).astype(np.uint8), "RGB")


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the two spatial axes, as `scipy.ndimage.gaussian_filter(a, [sigma, sigma, 0])`.

    Same kernel (radius `int(4 * sigma + 0.5)`, normalised), same 'reflect' boundary
    (half-sample symmetric: d c b a | a b c d | d c ...), rows first, and a float32
    result after each axis, as scipy does for float32 input (scipy is not a dependency).
    Each 1-D pass is an FFT product in float32, several times faster than a direct
    convolution with these wide kernels (or a float64 FFT); it agrees with scipy to about
    1e-4 grey levels.

    Args:
        a: (H, W, C) float32 array.
        sigma: standard deviation in pixels.

    Returns:
        (H, W, C) float32 array.
    """
    radius = int(4.0 * sigma + 0.5)
    if sigma <= 0 or radius == 0:
        return a.astype(np.float32, copy=True)
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 / sigma**2 * taps**2)
    kernel /= kernel.sum()
    out = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1)  # (C, H, W)
    for dim in (1, 2):  # rows (axis 0), then columns (axis 1), as scipy
        x = out.transpose(dim, 2)  # filter along the last dim
        n = x.shape[-1]
        if radius <= n:
            x = torch.cat([x[..., :radius].flip(-1), x, x[..., n - radius :].flip(-1)], dim=-1)
        else:  # the reflection repeats
            x = x[..., torch.from_numpy(_symmetric_index(n, radius))]
        size = _fft_length(n + 2 * radius)
        # Circular kernel centred on 0: output k + radius only reads inputs k .. k + 2 radius, no wrap-around.
        circular = torch.zeros(size, dtype=torch.float32)
        circular[: radius + 1] = torch.from_numpy(kernel[radius:])
        circular[size - radius :] = torch.from_numpy(kernel[:radius])
        spectrum = torch.fft.rfft(x, n=size)
        spectrum *= torch.fft.rfft(circular)
        out = torch.fft.irfft(spectrum, n=size)[..., radius : radius + n].transpose(dim, 2)
    return out.permute(1, 2, 0).contiguous().numpy()


def _symmetric_index(n: int, radius: int) -> np.ndarray:
    """Indices of `n` samples extended by `radius` on both sides, mirrored about the edges (scipy 'reflect')."""
    index = np.mod(np.arange(-radius, n + radius), 2 * n)
    return np.where(index >= n, 2 * n - 1 - index, index)


def _fft_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (FFT sizes that are fast)."""
    best = 1 << max(n - 1, 0).bit_length()
    p3 = 1
    while p3 < best:
        p35 = p3
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 5
        p3 *= 3
    return best


# ----------------------------------------------------------------------------
# Inverse map and paste-back (§3)


def face_coords(points: np.ndarray, quad_src: np.ndarray) -> np.ndarray:
    """Photo points in the face square's own coordinates (s, t).

    Args:
        points: (N, 2) pixel-index coordinates (x, y) in the photo.
        quad_src: (4, 2) `AlignResult.quad_src`.

    Returns:
        (N, 2) float64 (s, t): s runs along the aligned image's columns, t along its rows;
        the square is [0, 1]^2 and aligned pixel (i, j) of size S sits at
        ((j+0.5)/S, (i+0.5)/S).
    """
    q = np.asarray(quad_src, dtype=np.float64)
    d = np.asarray(points, dtype=np.float64).reshape(-1, 2) - q[0]
    ex, ey = q[3] - q[0], q[1] - q[0]
    return np.stack([d @ ex / (ex @ ex), d @ ey / (ey @ ey)], axis=1)


def paste_mask(s: np.ndarray, t: np.ndarray, mask: str = "square", margin: float = 0.02, feather: float = 0.10) -> np.ndarray:
    """The blending weight at face coordinates (s, t): 1 inside, 0 outside the face square.

    Args:
        s, t: arrays of face coordinates (see `face_coords`).
        mask: "square" (the square shrunk by `margin`, faded over `feather`) or
            "ellipse" (an ellipse around the face, faded over 15 % of its radius).
        margin, feather: fractions of the square's side (square mask only).

    Returns:
        float32 array of weights in [0, 1], shaped like `s`; 0 wherever (s, t) is outside [0, 1]^2.
    """
    if mask == "square":
        d = np.minimum(np.minimum(s, 1 - s), np.minimum(t, 1 - t))
        m = np.clip((d - margin) / feather, 0.0, 1.0)
    elif mask == "ellipse":
        r = np.hypot((s - 0.5) / 0.45, (t - 0.52) / 0.5)
        m = np.clip((1.0 - r) / 0.15, 0.0, 1.0)
    else:
        raise unknown_name("paste mask", mask, PASTE_MASKS, error=UsageError)
    inside = (s >= 0) & (s <= 1) & (t >= 0) & (t <= 1)
    return np.where(inside, m, 0.0).astype(np.float32)


def paste_back(
    original: Image.Image,
    stylized: Image.Image | torch.Tensor,
    quad_src: np.ndarray,
    mask: str = "square",
    margin: float = 0.02,
    feather: float = 0.10,
) -> Image.Image:
    """Put a (stylized) aligned face back where it came from in the photo.

    Steps:
      1. Only the quad's bounding box, clipped to the photo, is evaluated.
      2. Each of its pixels gets face coordinates (s, t) (`face_coords`) and a weight (`paste_mask`).
      3. The stylized image is sampled there (bilinear, `grid_sample` with
         align_corners=False, so any resolution maps onto the same square); if the face
         is less than half the stylized image's size in the photo, the stylized image is
         first downscaled with antialiasing to about the face's size.
      4. `weight * stylized + (1 - weight) * photo` in float, rounded to uint8.

    Args:
        original: the photo, PIL RGB (not modified).
        stylized: the aligned face, restyled: PIL image, or a (3, H, W) / (1, 3, H, W)
            tensor in [-1, 1] (generator output). Any size.
        quad_src: (4, 2) `AlignResult.quad_src` of the alignment that produced it.
        mask: "square" or "ellipse" (see `paste_mask`).
        margin, feather: square-mask shape, as fractions of the face square's side.

    Returns:
        A new PIL RGB image, the size of `original`; pixels with weight 0 (everything
        outside the face square) are exactly the photo's.
    """
    if mask not in PASTE_MASKS:
        raise unknown_name("paste mask", mask, PASTE_MASKS, error=UsageError)
    if not feather > 0 or not margin >= 0:
        raise UsageError(f"paste mask needs feather > 0 and margin >= 0, got feather={feather}, margin={margin}")
    photo = np.array(original.convert("RGB"))  # a copy: the input stays as it was
    height, width = photo.shape[:2]
    q = np.asarray(quad_src, dtype=np.float64)

    # 1. Bounding box of the quad, clipped to the photo.
    x0, y0 = np.maximum(np.floor(q.min(axis=0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(q.max(axis=0)).astype(int), (width - 1, height - 1))
    if x0 > x1 or y0 > y1:
        return Image.fromarray(photo)

    # 2. Face coordinates (separable: s = s0 + x * ds/dx + y * ds/dy) and weights.
    ex, ey = q[3] - q[0], q[1] - q[0]
    xs = np.arange(x0, x1 + 1, dtype=np.float64) - q[0, 0]
    ys = np.arange(y0, y1 + 1, dtype=np.float64) - q[0, 1]
    s = xs[None, :] * (ex[0] / (ex @ ex)) + ys[:, None] * (ex[1] / (ex @ ex))
    t = xs[None, :] * (ey[0] / (ey @ ey)) + ys[:, None] * (ey[1] / (ey @ ey))
    weight = paste_mask(s, t, mask, margin, feather)
    rows, cols = np.nonzero(weight.any(axis=1))[0], np.nonzero(weight.any(axis=0))[0]
    if rows.size == 0:
        return Image.fromarray(photo)
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1  # trim rows/columns the mask leaves alone
    s, t, weight = s[r0:r1, c0:c1], t[r0:r1, c0:c1], weight[r0:r1, c0:c1]

    # 3. Sample the stylized image.
    face = _as_float_image(stylized)  # (1, 3, Hs, Ws), 0..255
    side_x, side_y = float(np.hypot(*ex)), float(np.hypot(*ey))
    if side_x < face.shape[3] / 2 or side_y < face.shape[2] / 2:
        size = (max(int(round(side_y)), 1), max(int(round(side_x)), 1))
        face = F.interpolate(face, size=size, mode="bilinear", antialias=True, align_corners=False)
    grid = torch.from_numpy(np.stack([2 * s - 1, 2 * t - 1], axis=-1)).float()[None]
    warped = F.grid_sample(face, grid, mode="bilinear", padding_mode="border", align_corners=False)
    warped = warped[0].permute(1, 2, 0).numpy()

    # 4. Blend.
    region = photo[y0 + r0 : y0 + r1, x0 + c0 : x0 + c1].astype(np.float32)
    blended = region + weight[:, :, None] * (warped - region)
    photo[y0 + r0 : y0 + r1, x0 + c0 : x0 + c1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return Image.fromarray(photo)


def _as_float_image(picture: Image.Image | torch.Tensor) -> torch.Tensor:
    """A PIL image or a [-1, 1] (3, H, W) / (1, 3, H, W) tensor as a (1, 3, H, W) float32 CPU tensor in 0..255."""
    if isinstance(picture, Image.Image):
        array = np.asarray(picture.convert("RGB"), dtype=np.float32)
        return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()
    x = picture.detach().float().cpu()
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"stylized tensor must be (3, H, W) in [-1, 1], got {tuple(picture.shape)}")
    return ((x.clamp(-1, 1) + 1) * 127.5)[None]
