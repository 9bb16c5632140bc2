"""What the benchmark scripts share: the commit they ran at, and writing STEM.json and STEM.md."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The short hash of the checkout's HEAD ("unknown" outside a git checkout)."""
    found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def uncommitted_changes() -> bool:
    """Whether tracked files differ from HEAD (the figures then come from code no commit holds)."""
    found = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    return bool(found.stdout.strip())


def write_results(stems: Sequence[str | Path | None], result: dict[str, Any], table: str) -> None:
    """Write ``result`` to STEM.json and ``table`` to STEM.md for every stem given (None is skipped)."""
    for stem in (Path(s) for s in stems if s):
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        stem.with_suffix(".md").write_text(table)
        print(f"written: {stem.with_suffix('.json')}, {stem.with_suffix('.md')}")
