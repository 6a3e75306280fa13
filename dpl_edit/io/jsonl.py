"""Reading JSONL lists (benchmark scenes, batch jobs), whose errors name the 1-based line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpl_edit.errors import DplError


def jsonl_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """The non-blank lines of a UTF-8 text file with their 1-based numbers; `what` names the
    file in errors ("scene list", "job file")."""
    if not path.is_file():
        raise DplError(f"{what} {path} not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DplError(f"{what} {path} is not UTF-8 text") from None
    return [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]


def parse_line(line: str) -> Any:
    """One line's JSON value; invalid JSON is a user error saying where the parser stopped."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DplError(f"bad JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise DplError("bad JSON (nested too deeply)") from None


def excerpt(value: Any, limit: int = 60) -> str:
    """A JSON value as text, cut short: an error line stays one short line whatever a file
    holds."""
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
