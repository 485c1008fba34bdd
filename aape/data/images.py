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


def open_image(path: Path | str) -> Image.Image:
    """Decode an image fully (so truncated files fail here, not later) and return it as RGB."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableImageError(path, "file does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImageError(path, f"{type(exc).__name__}: {exc}") from None
