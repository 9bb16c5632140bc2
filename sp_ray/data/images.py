"""Image decoding: any file PIL reads -> RGB uint8 as displayed (EXIF orientation applied).

One rule decides which image files sp-ray skips rather than fails on, in every reader (the
training and evaluation datasets, ``sp-ray evaluate --onnx``, ``sp-ray propose``, the DenseCL
images): ``load_image_rgb`` and ``displayed_size`` raise ``UnusableImageError``, whose ``reason`` is
the key the caller counts under, when a file is missing or does not decode (``UNREADABLE``: a
truncated JPEG, a text file named .png) or holds more pixels than the limit (``TOO_LARGE``). PIL's
decompression-bomb guard is the same limit seen from PIL: its error becomes ``TOO_LARGE`` and its
warning is not raised, since the limit (``export.geometry.MAX_IMAGE_PIXELS`` by default, PIL's own
threshold) is checked on the header before any pixel is decoded.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from export.geometry import MAX_IMAGE_PIXELS

# Orientations 5..8 swap width and height (the image is transposed or rotated by 90 degrees).
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Skip reasons: the ``reason`` of an `UnusableImageError`, counted under these names by every reader.
UNREADABLE = "missing or unreadable image file"
TOO_LARGE = "image larger than max_image_pixels"

# warnings.catch_warnings swaps the process-wide filter list; reader threads (propose decodes in a
# pool) must not interleave their swaps, or a filter is restored wrongly. Only the header is read
# under the lock: decoding runs in parallel.
_OPEN_LOCK = threading.Lock()


class UnusableImageError(OSError):
    """An image file that readers skip and count instead of failing on.

    Attributes:
        path: the file.
        reason: ``UNREADABLE`` or ``TOO_LARGE``, the key the caller counts the skip under.
    """

    def __init__(self, path: str | Path, reason: str, message: str) -> None:
        super().__init__(message)
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[Path, str, str]]:
        # Crosses process boundaries (DataLoader workers, Ray actors) with all three arguments.
        return type(self), (self.path, self.reason, str(self))


def _too_large(path: Path, height: int, width: int, max_pixels: int) -> UnusableImageError:
    return UnusableImageError(
        path, TOO_LARGE,
        f"image {path} is {height}x{width} (HxW), {height * width:,} pixels, more than max_image_pixels = "
        f"{max_pixels:,}; downscale it, or raise the limit (data.max_image_pixels) if the machine has the memory",
    )  # fmt: skip


def _pil_refused(path: Path, err: Exception, max_pixels: int) -> UnusableImageError:
    # PIL refuses images above twice its MAX_IMAGE_PIXELS; below our limit only if the limit was raised.
    pil_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    hint = "; to read images this large raise PIL.Image.MAX_IMAGE_PIXELS too" if max_pixels >= pil_limit else ""
    return UnusableImageError(
        path, TOO_LARGE,
        f"image {path} is larger than max_image_pixels = {max_pixels:,} (PIL: {err}); downscale it{hint}",
    )  # fmt: skip


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open an image (header only) and apply the pixel limit; raises `UnusableImageError`."""
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            # The limit below decides; PIL's warning for the same images would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise _pil_refused(path, err, max_pixels) from err
    except (OSError, ValueError, SyntaxError) as err:
        raise UnusableImageError(path, UNREADABLE, f"cannot read image {path}: {err}") from err
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise _too_large(path, height, width, max_pixels)
    return image


def load_image_rgb(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image file to RGB uint8 in display orientation.

    Grayscale, palette, RGBA (alpha dropped), CMYK and YCbCr go through PIL's conversion.
    16-bit images (modes ``I;16*`` and ``I``) are scaled by 255/65535 rather than clipped, so a
    full-range 16-bit image stays full range. Float images (mode ``F``) have no defined range and
    are min-max scaled to 0..255. The EXIF orientation is applied, so annotation coordinates refer
    to the image as a viewer displays it.

    Args:
        path: the image file.
        max_pixels: images with more pixels (H x W) are refused before decoding.

    Returns:
        uint8 array [H, W, 3].

    Raises:
        UnusableImageError (an OSError): the file is missing or PIL cannot decode it (reason
            ``UNREADABLE``), or it is larger than ``max_pixels`` (``TOO_LARGE``); the message names the file.
    """
    path = Path(path)
    image = _open(path, max_pixels)
    try:
        with image:
            return to_rgb_uint8(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as err:  # raised by a few formats while decoding frames
        raise _pil_refused(path, err, max_pixels) from err
    except (OSError, ValueError, SyntaxError) as err:
        raise UnusableImageError(path, UNREADABLE, f"cannot decode image {path}: {err}") from err


def displayed_size(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Size of an image as displayed, read from the file header without decoding the pixels.

    PNG files keep EXIF either before or after the pixel data; only the former is visible from the
    header, so a PNG whose orientation tag sits after the pixels is reported as stored (decoding it
    later with `load_image_rgb` gives the true displayed size).

    Args:
        path: the image file.
        max_pixels: images with more pixels (H x W) are refused.

    Returns:
        (H, W) after applying the EXIF orientation.

    Raises:
        UnusableImageError (an OSError): the file is missing, its header is not an image PIL reads
            (reason ``UNREADABLE``), or it is larger than ``max_pixels`` (``TOO_LARGE``).
    """
    path = Path(path)
    image = _open(path, max_pixels)
    try:
        with image:
            width, height = image.size
            if image.format == "PNG" and "exif" not in image.info:
                # PngImageFile.getexif() decodes the whole image to look for a late eXIf chunk.
                orientation = 1
            else:
                orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, ValueError, SyntaxError) as err:
        raise UnusableImageError(path, UNREADABLE, f"cannot read image header of {path}: {err}") from err
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return width, height
    return height, width


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] RGB of a decoded PIL image of any mode (16-bit gray scaled, float gray stretched, CMYK
    and palettes converted): the one conversion of every sp-ray reader, so training, evaluation and serving see
    the same pixels."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        gray = np.rint(np.clip(values, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        values = np.asarray(image).astype(np.float64)
        low, high = float(values.min()), float(values.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        gray = np.rint((values - low) * scale).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)


def list_image_files(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (recursively), sorted, hidden files and folders excluded.

    Args:
        root: a folder.

    Returns:
        Paths whose suffix (any case) is one of ``IMAGE_EXTENSIONS``.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: no image file was found.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder; pass --images DIR")
    files = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return files
