"""The image list of an unlabeled-image command: a folder (searched recursively) or the ``images`` of a COCO json.

``sp-ray propose`` proposes pseudo masks on it and ``sp-ray analyze-kernels`` averages kernel masks over it;
the file names are what ``annotations.json`` records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sp_ray.data.images import list_image_files


def list_images(images: str | Path, image_root: str | Path | None = None) -> list[dict[str, Any]]:
    """The images to propose on: a folder (searched recursively) or the ``images`` of a COCO json.

    Args:
        images: a folder of image files (as ``sp_ray.data.images.list_image_files`` finds them), or a
            COCO json whose ``images`` entries (id, file_name, optionally height and width) are used and
            whose annotations, if any, are ignored.
        image_root: folder the json's file names are relative to; default the json's folder. Not used
            for a folder input.

    Returns:
        [{"id", "file_name", "path", "height", "width"}], in folder order (sorted relative paths, ids
        1..n) or json order (the json's ids); height/width are the json's values or None.

    Raises:
        FileNotFoundError: ``images`` does not exist.
        ValueError: no images found, or the json is not a COCO-style image list.
    """
    source = Path(images)
    if source.is_dir():
        files = sorted(path.relative_to(source).as_posix() for path in list_image_files(source))
        return [
            {"id": index + 1, "file_name": name, "path": str(source / name), "height": None, "width": None}
            for index, name in enumerate(files)
        ]
    if not source.is_file():
        raise FileNotFoundError(f"--images {source} does not exist; pass an image folder or a COCO json")
    root = Path(image_root) if image_root is not None else source.parent
    return _read_image_list(source, root)


def _read_image_list(path: Path, root: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is neither an image folder nor a valid JSON file ({err})") from err
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a COCO json with a non-empty 'images' list")
    items, seen = [], set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or "id" not in entry:
            raise ValueError(f"{path}: images[{index}] needs an 'id' and a string 'file_name'")
        if not isinstance(entry["id"], int) or isinstance(entry["id"], bool) or entry["id"] in seen:
            raise ValueError(f"{path}: images[{index}].id = {entry['id']!r} is not a unique integer")
        seen.add(entry["id"])
        height, width = entry.get("height"), entry.get("width")
        sizes = (height, width)
        if any(size is not None for size in sizes) and not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(
                f"{path}: images[{index}] has height={height!r}, width={width!r}; expected positive ints"
            )
        file_name = entry["file_name"]
        items.append(
            {
                "id": entry["id"],
                "file_name": file_name,
                "path": str(root / file_name),
                "height": height,
                "width": width,
            }
        )
    return items
