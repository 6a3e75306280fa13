"""File names made from user-given ids (scene ids, job ids)."""

from __future__ import annotations

import hashlib
import re


def safe_stem(name: str) -> str:
    """A file name for an id: the id itself when safe, else a cleaned id plus its hash.

    The hash keeps two ids apart that clean to the same text ("a/b" and "a:b"), so no two
    scenes or jobs ever share a file."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if clean == name and not name.startswith("."):
        return name
    return f"{clean.lstrip('.')}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
