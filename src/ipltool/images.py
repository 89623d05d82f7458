"""Reading pictures from disk and turning tensors back into pictures.

One place decides which files count as images, how they are opened (EXIF orientation
applied, any mode converted to RGB) and how generator output becomes a PNG.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ipltool.errors import UsageError

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


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image upright (EXIF orientation applied) as 8-bit RGB.

    Raises:
        UsageError: the file is missing or is not a readable image.
    """
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except FileNotFoundError:
        raise UsageError(f"no such image: {path}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UsageError(f"cannot read image {path}: {err}") from None


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB picture as a (3, H, W) float tensor in [-1, 1], the generator's range."""
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(image).float() / 127.5 - 1


def png_bytes(images: torch.Tensor, nrow: int) -> bytes:
    """A grid of (N, 3, H, W) images in [-1, 1] encoded as PNG (`nrow` images per row)."""
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    array = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
