"""Reading pictures from disk and turning tensors back into pictures.

One place decides which files count as images, how they are opened (EXIF orientation
applied, any mode converted to RGB) and how generator output becomes a PNG.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ipltool.errors import UsageError

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def find_images(path: str | Path) -> list[Path]:
    """The image files under a folder (recursive, sorted), or the file itself.

    Raises:
        UsageError: the path does not exist or holds no image file.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UsageError(f"no such file or folder: {path}")
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise UsageError(f"no images in {path}", hint=f"put {', '.join(IMAGE_SUFFIXES)} files there")
    return found


#: Largest picture accepted, in pixels (about 16k x 11k). Pillow's own default warns at
#: 89 Mpx and fails at twice that; a decompression bomb must fail, never just warn.
MAX_PIXELS = 178_956_970


class UnreadableImage(UsageError):
    """A file that is missing, not an image, damaged, or too large to decode safely."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB.

    16-bit and 32-bit greyscale are scaled to 8 bits (Pillow's own conversion clips them
    to white); transparent pictures are composited on white, so hidden colour under a
    transparent background never shows; CMYK, palette and the rest convert as Pillow does.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image upright (EXIF orientation applied) as 8-bit RGB (see `to_rgb`).

    Raises:
        UnreadableImage: the file is missing, is not a readable image, is truncated, or
            has more than `MAX_PIXELS` pixels.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise UnreadableImage(f"{path}: {image.width}x{image.height} is larger than {MAX_PIXELS:,} pixels (decompression-bomb limit)")
                image.load()  # decode now, so a damaged file fails here and not later
                return to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise UnreadableImage(f"no such image: {path}") from None
    except IsADirectoryError:
        raise UnreadableImage(f"{path} is a folder, not an image") from None
    except UnidentifiedImageError:
        raise UnreadableImage(f"{path} is not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UnreadableImage(f"{path}: refused as a decompression bomb ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        # Truncated or corrupt data surfaces as OSError/SyntaxError from the decoders.
        raise UnreadableImage(f"cannot read image {path}: {err}") from None


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB picture as a (3, H, W) float tensor in [-1, 1], the generator's range."""
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(image).float() / 127.5 - 1


def to_pil(image: torch.Tensor) -> Image.Image:
    """One (3, H, W) tensor in [-1, 1] as an 8-bit RGB picture (values outside are clipped)."""
    import torch

    array = image.detach().float().cpu().add(1).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).contiguous().numpy())


def png_bytes(image: Image.Image) -> bytes:
    """`image` encoded as PNG (the grids themselves are laid out by `ipltool.figures`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
