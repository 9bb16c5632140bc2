"""Image decoding: any file PIL reads -> RGB uint8 as displayed (EXIF orientation applied)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

# Orientations 5..8 swap width and height (the image is transposed or rotated by 90 degrees).
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def load_image_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB uint8 in display orientation.

    Grayscale, palette, RGBA (alpha dropped), CMYK and YCbCr go through PIL's conversion.
    16-bit images (modes ``I;16*`` and ``I``) are scaled by 255/65535 rather than clipped, so a
    full-range 16-bit image stays full range. Float images (mode ``F``) have no defined range and
    are min-max scaled to 0..255. The EXIF orientation is applied, so annotation coordinates refer
    to the image as a viewer displays it.

    Args:
        path: the image file.

    Returns:
        uint8 array [H, W, 3].

    Raises:
        OSError: the file is missing or PIL cannot decode it (the message names the file).
    """
    path = Path(path)
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
    except (OSError, ValueError, SyntaxError) as err:
        raise OSError(f"cannot decode image {path}: {err}") from err
    return _to_rgb_uint8(image)


def displayed_size(path: str | Path) -> tuple[int, int]:
    """Size of an image as displayed, read from the file header without decoding the pixels.

    PNG files keep EXIF either before or after the pixel data; only the former is visible from the
    header, so a PNG whose orientation tag sits after the pixels is reported as stored (decoding it
    later with `load_image_rgb` gives the true displayed size).

    Args:
        path: the image file.

    Returns:
        (H, W) after applying the EXIF orientation.

    Raises:
        OSError: the file is missing or its header is not an image PIL reads.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.format == "PNG" and "exif" not in image.info:
                # PngImageFile.getexif() decodes the whole image to look for a late eXIf chunk.
                orientation = 1
            else:
                orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, ValueError, SyntaxError) as err:
        raise OSError(f"cannot read image header of {path}: {err}") from err
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return width, height
    return height, width


def _to_rgb_uint8(image: Image.Image) -> np.ndarray:
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


def link_images(annotations: str | Path, images: str | Path, folder: str | Path) -> Path:
    """A folder of symlinks to the images of a COCO json (``sp-ray ssl`` reads a folder, not a json).

    Args:
        annotations: the COCO json whose ``images`` are linked (its annotations are not read).
        images: the folder its ``file_name`` entries are relative to.
        folder: where the links go (created; existing links are kept).

    Returns:
        ``folder``.
    """
    from sp_ray.data.coco import read_coco_json

    folder, images = Path(folder), Path(images)
    folder.mkdir(parents=True, exist_ok=True)
    for image in read_coco_json(annotations)["images"]:
        link = folder / image["file_name"]
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((images / image["file_name"]).resolve())
    return folder
