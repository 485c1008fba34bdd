"""Opening image files with errors that name the file and say what to do."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from aape.errors import AAPEError

# the formats PIL decodes that datasets and users put images in
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def is_image_file(name: str) -> bool:
    """By name: an image suffix, any case; hidden files (e.g. macOS's ._photo.jpg) are not images."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


class DataError(AAPEError, ValueError):
    """Bad dataset input (file, split, class list); the message names the culprit."""


class UnreadableImageError(DataError):
    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"cannot read image {self.path}: {reason}. Fix or remove the file, or set "
            f"data.skip_unreadable: true to skip such images (they are listed in a skip report)."
        )


def open_image(path: Path | str, draft_size: int | None = None) -> Image.Image:
    """Decode an image fully (so truncated files fail here, not later) and return it as RGB.

    `draft_size`: a JPEG at least twice that size on both sides is decoded at 1/2, 1/4 or 1/8 scale
    (the largest that keeps both sides >= draft_size), which skips most of the inverse DCT work.
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableImageError(path, "file does not exist")
    try:
        with Image.open(path) as image:
            return load_rgb(image, draft_size)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImageError(path, f"{type(exc).__name__}: {exc}") from None


def load_rgb(image: Image.Image, draft_size: int | None = None) -> Image.Image:
    """Load an opened image as RGB, JPEGs at reduced scale when `draft_size` allows (see open_image)."""
    if draft_size and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    image.load()
    return image.convert("RGB")
