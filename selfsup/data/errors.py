"""The data layer's errors (their own module so that datasets.py and images.py share them)."""

from __future__ import annotations

import os


class DatasetError(ValueError):
    """A dataset that cannot be used as asked: missing, empty, malformed."""


class CorruptImageError(DatasetError):
    """An image file that cannot be decoded. `path` names it, `reason` says why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot decode image {self.path}: {reason}")


class ImageTooLargeError(CorruptImageError):
    """An image above the pixel limit, refused from its header (nothing was decoded)."""

    def __init__(self, path: str | os.PathLike, width: int, height: int, limit: int) -> None:
        self.width, self.height, self.limit = width, height, limit
        super().__init__(path, f"{width} x {height} = {width * height:,} pixels is over the "
                               f"limit of {limit:,}")
