"""How an image file becomes pixels: one policy for the portable and the DALI loaders.

- Transparency (RGBA, LA, PA, palette or grey/RGB PNGs with a tRNS colour) is composited over
  one background, BACKGROUND = white. Why white: it is what browsers and image viewers show
  behind transparent pixels, so the network sees what the user saw; and the images that carry
  alpha in practice (product shots, logos, icons) were made to sit on white. Dropping alpha
  instead (Pillow's convert("RGB"), DALI's decoder) shows whatever colour the transparent
  pixels happen to store, often black or garbage: a silent mis-decode.
- The EXIF (or XMP) orientation is applied (Pillow's exif_transpose), as every viewer does.
- Grey and colour files mix freely: grey is replicated to RGB, colour converted to grey
  (ITU-R 601-2 luma, Pillow's "L") for in_chans=1; 16-bit grey is scaled to 8 bits.
- Images above a pixel limit (`max_pixels`: the loader's argument, else SELFSUP_MAX_PIXELS,
  else DEFAULT_MAX_PIXELS, where Pillow itself refuses an image; 0 = no limit) are refused
  from the header, before any pixel is decoded, with ImageTooLargeError. selfsup switches
  Pillow's own check off (Image.MAX_IMAGE_PIXELS = None, process-wide, on first use): it
  warns once per file from inside Image.open (DecompressionBombWarning), where no thread-safe
  filter can reach it; the loader reports refused files in one line per epoch instead.
- Truncated or corrupt files raise CorruptImageError naming the file. Pillow's
  ImageFile.LOAD_TRUNCATED_IMAGES stays off: with it, a truncated file decodes as grey padding.

DALI (`probe`): most files (plain RGB or grey JPEG/PNG/BMP/WebP without orientation) go to
DALI's decoder as they are, which decodes them as Pillow does. The few that need the policy
(alpha or transparency, palette, orientation, 16-bit, CMYK, ...) are decoded here and handed to
DALI as binary PNM (PPM/PGM: a header and the raw bytes, no compression), which its decoder
reads back exactly: the same pixels on both loaders (tests/test_images.py).
"""

from __future__ import annotations

import io
import os

import numpy as np

from .errors import CorruptImageError, ImageTooLargeError

BACKGROUND = (255, 255, 255)  # white: see the module docstring
DEFAULT_MAX_PIXELS = 2 * 89_478_485  # where Pillow raises DecompressionBombError (~179 MP)
MAX_PIXELS_ENV = "SELFSUP_MAX_PIXELS"
# Modes DALI's decoder turns into the same RGB / grey as Pillow without help.
PLAIN_MODES = ("RGB", "L")
ORIENTATION = 0x0112
_pillow_ready = False


def _pillow():
    """Pillow's Image module with its per-file bomb warning off (we check the size ourselves)."""
    global _pillow_ready
    from PIL import Image

    if not _pillow_ready:
        Image.MAX_IMAGE_PIXELS = None
        _pillow_ready = True
    return Image


def resolve_max_pixels(max_pixels: int | None = None) -> int:
    """The pixel limit in force: the argument, else $SELFSUP_MAX_PIXELS, else the default.

    0 means no limit."""
    if max_pixels is None:
        env = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if env:
            try:
                max_pixels = int(float(env))
            except ValueError:
                raise ValueError(f"{MAX_PIXELS_ENV} must be a number of pixels (0: no limit), "
                                 f"got {env!r}") from None
        else:
            max_pixels = DEFAULT_MAX_PIXELS
    if not isinstance(max_pixels, (int, np.integer)) or max_pixels < 0:
        raise ValueError(f"max_pixels must be an int >= 0 (0: no limit), got {max_pixels!r}")
    return int(max_pixels)


def _check_size(path, im, max_pixels: int) -> None:
    if max_pixels and im.width * im.height > max_pixels:
        raise ImageTooLargeError(path, im.width, im.height, max_pixels)


def needs_alpha(im) -> bool:
    """Whether the image carries transparency to composite (an alpha band or a tRNS colour)."""
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def to_mode(im, mode: str):
    """A decoded Pillow image -> `mode` ("RGB" or "L") under the policy: orientation applied,
    transparency composited over BACKGROUND, 16-bit grey scaled to 8 bits."""
    from PIL import ImageOps

    Image = _pillow()
    im = ImageOps.exif_transpose(im)
    if needs_alpha(im):
        rgba = im.convert("RGBA")  # palette / tRNS transparency becomes a real alpha band
        bg = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        im = Image.alpha_composite(bg, rgba).convert("RGB")
    elif im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (PNG, TIFF): Pillow's convert("L") clips at 255; scale the range instead
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), "L")
    return im if im.mode == mode else im.convert(mode)


def open_image(path, mode: str = "RGB", data: bytes | None = None, *,
               max_pixels: int | None = None):
    """Fully decode one image (from `data` if given) to a Pillow image in `mode` ("RGB"/"L").

    Raises FileNotFoundError, ImageTooLargeError (over the pixel limit, checked from the
    header) or CorruptImageError, each naming `path`."""
    Image = _pillow()
    from PIL import UnidentifiedImageError

    limit = resolve_max_pixels(max_pixels)
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            _check_size(path, im, limit)
            im.load()  # force the full decode so truncated files fail here, not later
            return to_mode(im, mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except CorruptImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise CorruptImageError(path, str(e) or type(e).__name__) from None


def decode_image(path, mode: str = "RGB", *, max_pixels: int | None = None) -> np.ndarray:
    """uint8 (H, W, 3) for "RGB" or (H, W) for "L", under the policy above."""
    return np.asarray(open_image(path, mode, max_pixels=max_pixels), dtype=np.uint8)


def _orientation_unknown(im, raw: bytes) -> bool:
    """Whether the file may carry an orientation other than 1, judged from its header."""
    Image = _pillow()
    if im.format == "PNG" and "exif" not in im.info and b"eXIf" in raw:
        return True  # an eXIf chunk after the pixel data: only a full decode reads it
    # the base method reads what the header parse found (EXIF, XMP); PNG's override decodes
    return Image.Image.getexif(im).get(ORIENTATION, 1) != 1


def pnm_bytes(im) -> np.ndarray:
    """A decoded "RGB" or "L" image as binary PPM / PGM bytes (DALI decodes them exactly)."""
    buf = io.BytesIO()
    im.save(buf, "PPM")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def probe(path: str, mode: str, max_pixels: int | None = None
          ) -> tuple[np.ndarray, tuple[int, int]]:
    """(bytes for DALI's decoder, (h, w) of the decoded image) for one file, checked cheaply.

    Pillow reads the header: an unknown format or an image over the pixel limit is refused
    here; a JPEG without its end marker or a PNG without IEND is fully decoded to confirm it is
    whole; files that need the policy (see the module docstring) are decoded here and returned
    as PNM. Raises CorruptImageError (or ImageTooLargeError) naming `path`."""
    Image = _pillow()
    from PIL import UnidentifiedImageError

    limit = resolve_max_pixels(max_pixels)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except OSError as e:
        raise CorruptImageError(path, str(e)) from None
    raw = data.tobytes()
    try:
        with Image.open(io.BytesIO(raw)) as im:
            _check_size(path, im, limit)
            w, h, fmt = im.width, im.height, im.format
            special = im.mode not in PLAIN_MODES or needs_alpha(im) or \
                _orientation_unknown(im, raw)
    except CorruptImageError:
        raise
    except UnidentifiedImageError:
        raise CorruptImageError(path, "not an image format Pillow recognizes") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on garbage
        raise CorruptImageError(path, str(e) or type(e).__name__) from None
    if special:
        im = open_image(path, mode, data=raw, max_pixels=limit)
        return pnm_bytes(im), (im.height, im.width)
    tail = raw[-512:]
    if (fmt == "JPEG" and b"\xff\xd9" not in tail) or (fmt == "PNG" and b"IEND" not in tail):
        open_image(path, mode, data=raw, max_pixels=limit)  # truncated? a full decode decides
    return data, (h, w)
