"""File names made from user-given ids (scene ids, job ids)."""

from __future__ import annotations

import hashlib
import re

MAX_STEM = 100
"""Longest name an id keeps as it is: file systems take 255 bytes, and a folder's files add
their own names to it."""


def safe_stem(name: str) -> str:
    """A file name for an id: the id itself when safe, else a cleaned id plus its hash.

    The hash keeps two ids apart that clean to the same text ("a/b" and "a:b"); an id that is
    itself such a name ("a_b-" and a hash) can still meet one, which is why a job file checks
    its ids' names for collisions (`dpl_edit.batch.jobs.read_jobs`)."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if clean == name and not name.startswith(".") and len(name) <= MAX_STEM:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{clean.lstrip('.')[:MAX_STEM]}-{digest}"
