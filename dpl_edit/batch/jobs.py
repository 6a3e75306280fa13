"""The batch job file: one job a line (an image, its prompt, one inversion and its edits).

A line is parsed into a typed `Job`; options a line leaves out come from `JobDefaults` (the
command line's). Parsing checks what needs no model (JSON, keys and types, the image, duplicate
ids); `dpl_edit.batch.run.check_jobs` adds what needs the model's tokenizer and vocabulary. Every
error names the file and the 1-based line.

```json
{"id": "cat", "image": "img/cat.jpg", "prompt": "a cat and a dog", "words": ["cat", "dog"],
 "method": "dpl", "edits": [{"target": "a cat and a lion", "blend": ["dog", "lion"]},
                            {"target": "a big cat and a dog", "mode": "refine"}]}
```
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dpl_edit.engine.settings import (
    METHODS,
    MODES,
    TARGET_TOKENS,
    EditSettings,
    InversionSettings,
    TargetTokens,
)
from dpl_edit.errors import DplError
from dpl_edit.io.images import read_image
from dpl_edit.io.jsonl import excerpt, jsonl_lines, parse_line
from dpl_edit.io.names import safe_stem

Window = float | dict[str, float]
"""A P2P step fraction, or per-word fractions with the rest under "default_" (as `edit` takes)."""

_JOB_KEYS = {"id", "image", "prompt", "words", "method", "edits"}
_EDIT_KEYS = {"target", "mode", "reweight", "blend", "cross_steps", "self_steps", "target_tokens"}
_DEFAULT_WORD = "default"
"""The job file's key for the fraction of the words a `cross_steps` object does not name."""


@dataclass(frozen=True)
class EditJob:
    """One Prompt-to-Prompt edit of a job's inversion (the arguments of `edit`)."""

    target: str
    mode: str = EditSettings.mode
    reweight: dict[str, float] = field(default_factory=dict)
    blend: tuple[str, ...] = ()
    cross_steps: Window = EditSettings.cross_replace_steps
    self_steps: float = EditSettings.self_replace_steps
    target_tokens: TargetTokens = EditSettings.target_tokens


@dataclass(frozen=True)
class JobDefaults:
    """What a line may leave out: the command line's method, words and edit options."""

    method: str = InversionSettings.method
    words: tuple[str, ...] | None = None
    edit: EditJob = field(default_factory=lambda: EditJob(target=""))


@dataclass(frozen=True)
class Job:
    """One line of the job file: invert `image` under `prompt` once, then make every edit."""

    id: str
    line: int
    image: Path
    image_sha256: str
    prompt: str
    method: str
    words: tuple[str, ...] | None
    edits: tuple[EditJob, ...]

    @property
    def folder(self) -> str:
        """The job's folder name under the output's `jobs/` (one per id: `read_jobs` refuses
        two ids that would share one)."""
        return safe_stem(self.id)

    def spec(self) -> dict[str, Any]:
        """What the job's outputs depend on, as JSON: a stored record with another spec is
        stale (the line or the image changed) and the job is run again. The image counts by
        its content, so a job folder moved with its images is still finished."""
        return {
            "image_sha256": self.image_sha256,
            "prompt": self.prompt,
            "method": self.method,
            "words": None if self.words is None else list(self.words),
            "edits": [
                {
                    "target": e.target,
                    "mode": e.mode,
                    "reweight": e.reweight,
                    "blend": list(e.blend),
                    "cross_steps": e.cross_steps,
                    "self_steps": e.self_steps,
                    # Named only when not the default, so records from before the option
                    # existed still read as finished.
                    **(
                        {}
                        if e.target_tokens == EditSettings.target_tokens
                        else {"target_tokens": e.target_tokens}
                    ),
                }
                for e in self.edits
            ],
        }


def _typed(record: Mapping[str, Any], key: str, check: Callable[[Any], bool], what: str) -> Any:
    value = record[key]
    if not check(value):
        raise DplError(f"'{key}' must be {what}, got {excerpt(value)}")
    return value


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_number(value: Any) -> bool:
    """A finite JSON number (Python's JSON reads NaN and Infinity too)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_words(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_text(w) for w in value)


def _unknown(record: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(record) - allowed)
    if unknown:
        raise DplError(f"unknown key '{unknown[0]}' in {where} (allowed: {', '.join(sorted(allowed))})")  # fmt: skip


def _cross_steps(value: Any) -> Window:
    if _is_number(value):
        return float(value)
    if isinstance(value, dict) and value and all(_is_number(v) for v in value.values()):
        return {"default_" if k == _DEFAULT_WORD else k: float(v) for k, v in value.items()}
    raise DplError(
        f"'cross_steps' must be a fraction or {{\"default\": F, WORD: F, ...}}, got {excerpt(value)}"
    )


def _parse_edit(record: Any, defaults: EditJob) -> EditJob:
    if not isinstance(record, dict):
        raise DplError(f"every edit must be a JSON object, got {excerpt(record)}")
    if "target" not in record:
        raise DplError("an edit has no 'target'")
    _unknown(record, _EDIT_KEYS, "an edit")
    options: dict[str, Any] = {"target": _typed(record, "target", _is_text, "a prompt")}
    if "mode" in record:
        options["mode"] = _typed(record, "mode", lambda m: m in MODES, f"one of {', '.join(MODES)}")
    if "reweight" in record:
        options["reweight"] = {
            word: float(scale)
            for word, scale in _typed(
                record,
                "reweight",
                lambda r: isinstance(r, dict) and all(_is_number(s) for s in r.values()),
                '{"WORD": SCALE, ...}',
            ).items()
        }
    if "blend" in record:
        options["blend"] = tuple(_typed(record, "blend", _is_words, "a list of words"))
    if "cross_steps" in record:
        options["cross_steps"] = _cross_steps(record["cross_steps"])
    if "self_steps" in record:
        options["self_steps"] = float(_typed(record, "self_steps", _is_number, "a fraction"))
    if "target_tokens" in record:
        options["target_tokens"] = _typed(
            record,
            "target_tokens",
            lambda t: t in TARGET_TOKENS,
            f"one of {', '.join(TARGET_TOKENS)}",
        )
    return replace(defaults, **options)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_job(record: Any, line: int, base: Path, defaults: JobDefaults) -> Job:
    """One line's JSON value as a `Job` (paths relative to `base`), or a `DplError`."""
    if not isinstance(record, dict):
        raise DplError("the line is not a JSON object")
    missing = [k for k in ("id", "image", "prompt", "edits") if k not in record]
    if missing:
        raise DplError(f"missing key '{missing[0]}'")
    _unknown(record, _JOB_KEYS, "the job")
    job_id = _typed(record, "id", _is_text, "a non-empty string")
    image = base / _typed(record, "image", _is_text, "a path")
    read_image(image)  # missing or unreadable: refused now, not hours later
    method = defaults.method
    if "method" in record:
        method = _typed(record, "method", lambda m: m in METHODS, f"one of {', '.join(METHODS)}")
    words = defaults.words
    if "words" in record:
        words = tuple(_typed(record, "words", _is_words, "a list of words"))
        if method != "dpl":
            raise DplError(f"'words' are DPL's; this job's method is '{method}'")
    edits = _typed(record, "edits", lambda e: isinstance(e, list) and e, "a non-empty list")
    return Job(
        id=job_id,
        line=line,
        image=image,
        image_sha256=_file_sha256(image),
        prompt=_typed(record, "prompt", _is_text, "a prompt"),
        method=method,
        words=words,
        edits=tuple(_parse_edit(e, defaults.edit) for e in edits),
    )


MAX_REPORTED = 20
"""Bad lines a job file's error shows, one a line; the rest are counted."""


def read_jobs(
    path: str | Path,
    defaults: JobDefaults,
    check: Callable[[Job], None] | None = None,
) -> list[Job]:
    """Every job of a JSONL file, each line parsed and passed to `check` (the model's checks).

    All lines are checked before anything runs; every bad line is counted and the first
    `MAX_REPORTED` are reported, each on its own line, so that one fix-and-rerun cycle clears
    them. Two ids that would share a job folder are refused too (`Job.folder`; compared
    without case, as some file systems do).
    """
    path = Path(path)
    jobs: list[Job] = []
    errors: list[str] = []
    ids: dict[str, int] = {}
    folders: dict[str, Job] = {}
    for number, line in jsonl_lines(path, "job file"):
        try:
            job = parse_job(parse_line(line), number, path.parent, defaults)
            if job.id in ids:
                raise DplError(f"duplicate id '{job.id}' (first on line {ids[job.id]})")
            other = folders.get(job.folder.casefold())
            if other is not None:
                raise DplError(
                    f"id '{job.id}' would share the job folder 'jobs/{other.folder}' with id "
                    f"'{other.id}' on line {other.line}; rename one"
                )
            if check is not None:
                check(job)
        except DplError as exc:
            errors.append(f"  line {number}: {exc}")
            continue
        ids[job.id] = number
        folders[job.folder.casefold()] = job
        jobs.append(job)
    if errors:
        bad = "1 bad line" if len(errors) == 1 else f"{len(errors)} bad lines"
        shown = errors[:MAX_REPORTED]
        if len(errors) > MAX_REPORTED:
            shown.append(f"  ... and {len(errors) - MAX_REPORTED} more")
        raise DplError("\n".join([f"{path}: {bad}, nothing was run:", *shown]))
    if not jobs:
        raise DplError(f"job file {path} has no jobs")
    return jobs
