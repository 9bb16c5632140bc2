"""What ``sp-ray predict --source SRC`` names: an image file, a folder (recursive), a glob, a text file
listing paths, or a video file, resolved into a list of inputs (plain Python, no Ray, no torch).

Every input gets an id (1..n in the order below), a ``file_name`` relative to the source's root and an
absolute ``path``. The order is fixed by the source alone (sorted file names for a folder and a glob,
the file's order for a list), so a rerun cuts the same shards and gives the same ids.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from sp_ray.data.images import IMAGE_EXTENSIONS, list_image_files
from sp_ray.errors import UserError

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
LIST_EXTENSIONS = (".txt", ".lst", ".list")
_GLOB_CHARS = ("*", "?", "[")


@dataclass(frozen=True)
class Source:
    """The resolved ``--source``.

    Attributes:
        kind: "images" or "video".
        root: absolute folder the ``file_name`` of every input is relative to.
        images: one dict per image input, {"id", "file_name", "path"} (kind "images"; a path that a
            list names but that does not exist is kept: it is skipped and counted when read).
        video: absolute path of the video file (kind "video"), else None.
    """

    kind: str
    root: Path
    images: list[dict[str, object]]
    video: Path | None = None


def resolve_source(source: str) -> Source:
    """Resolve ``--source`` into its inputs.

    Args:
        source: an image file, a folder (searched recursively for ``IMAGE_EXTENSIONS``, hidden files
            excluded), a glob (``**`` recursive), a text file (``LIST_EXTENSIONS``) with one path per line
            (relative to the list's folder; blank lines and ``#`` comments ignored), or a video file
            (``VIDEO_EXTENSIONS``).

    Returns:
        The ``Source``.

    Raises:
        UserError: the source does not exist, matches no image, is an empty list, or is a file of
            another kind; the message names it and says what is accepted.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        try:
            files = list_image_files(path)
        except ValueError:
            raise UserError(f"--source {source}: the folder holds no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                            "pass a folder of images, a glob, a list file or a video") from None
        root = _absolute(path)
        return Source("images", root, _entries([_absolute(p) for p in files], root))
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in VIDEO_EXTENSIONS:
            resolved = _absolute(path)
            return Source("video", resolved.parent, [], video=resolved)
        if suffix in IMAGE_EXTENSIONS:
            resolved = _absolute(path)
            return Source("images", resolved.parent, _entries([resolved], resolved.parent))
        if suffix in LIST_EXTENSIONS:
            return _from_list(path, source)
        raise UserError(
            f"--source {source}: not an image ({', '.join(IMAGE_EXTENSIONS)}), a video ({', '.join(VIDEO_EXTENSIONS)}) "
            f"or a list of paths ({', '.join(LIST_EXTENSIONS)}), by its extension; pass one of those or a folder"
        )
    if any(char in source for char in _GLOB_CHARS):
        matches = sorted({_absolute(Path(p)) for p in glob.glob(os.path.expanduser(source), recursive=True)
                          if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_EXTENSIONS})
        if not matches:
            raise UserError(f"--source {source}: the glob matches no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                            "check the pattern (quote it so that the shell does not expand it)")
        return Source("images", _common_root(matches), _entries(matches, _common_root(matches)))
    raise UserError(f"--source {source} does not exist; pass an image, a folder, a glob, a list file or a video")


def _from_list(path: Path, source: str) -> Source:
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--source {source}: a list file must be text with one path per line") from None
    base = _absolute(path).parent
    files = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        candidate = Path(entry).expanduser()
        files.append(_absolute(candidate if candidate.is_absolute() else base / candidate))
    if not files:
        raise UserError(f"--source {source}: the list names no files; write one image path per line")
    return Source("images", _common_root(files), _entries(files, _common_root(files)))


def _absolute(path: Path) -> Path:
    # Not resolve(): a folder of symlinks keeps its own paths, relative to the folder.
    return Path(os.path.abspath(path))


def _common_root(paths: list[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def _entries(paths: list[Path], root: Path) -> list[dict[str, object]]:
    """Input dicts; ``overlay`` names the drawn image under DIR/overlays: the file name with a .png suffix,
    or the whole file name + .png where different files would share the first (a.jpg and a.png)."""
    names = [p.relative_to(root).as_posix() for p in paths]
    candidates = [Path(name).with_suffix(".png").as_posix() for name in names]
    sharing: dict[str, set[str]] = {}
    for name, candidate in zip(names, candidates, strict=True):
        sharing.setdefault(candidate, set()).add(name)
    return [{"id": index + 1, "file_name": name, "path": str(p),
             "overlay": candidate if len(sharing[candidate]) == 1 else f"{name}.png"}
            for index, (p, name, candidate) in enumerate(zip(paths, names, candidates, strict=True))]
