"""Running a job file: one inversion and its edits per job, a record per job, a summary.

Layout of the output folder:

- `jobs/<id>/`: the job's files (`dpl_edit.outputs.RunFiles.in_folder`: `inversion/`,
  `source.png`, `attention.png`, `edit-1.png`, ...) and `record.json`, written last;
- `summary.jsonl` (one record a job, in job-file order) and `summary.md` (a table);
- `batch.json`, written first: the folder's marker. A batch writes only into a new or empty
  folder or one with this marker (`check_batch_folder`), so it never replaces a user's files.

Resuming: a job whose record says "ok", matches the job's current spec and settings, and whose
files are all there is skipped; anything else (no record, because a crash stopped the job before
its record; a failed job; a changed line or image) runs again and replaces its files. Every file
is written atomically, so no file is ever half-written either.
"""

from __future__ import annotations

import json
import os
import platform
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dpl_edit import __version__
from dpl_edit.batch.executors import Executor, Sequential
from dpl_edit.batch.jobs import Job
from dpl_edit.dpl.losses import DplLossConfig
from dpl_edit.dpl.stage import BackgroundSettings
from dpl_edit.engine.artifact import Inversion
from dpl_edit.engine.edit import EditResult, edit, plan_edit
from dpl_edit.engine.inversion import invert, plan_inversion
from dpl_edit.engine.model import LoadedModel
from dpl_edit.engine.settings import InversionSettings, NullTextSettings
from dpl_edit.engine.text import check_vocabulary
from dpl_edit.errors import DplError
from dpl_edit.io.atomic import atomic_write_bytes
from dpl_edit.io.targets import check_location
from dpl_edit.outputs import POOR_RECONSTRUCTION_DB, RunFiles, reconstruction_psnr

RECORD = "record.json"
MARKER_FILE = "batch.json"
MARKER_FORMAT = "dpl-batch"


def _is_batch_folder(out_dir: Path) -> bool:
    marker = out_dir / MARKER_FILE
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("format") == MARKER_FORMAT


def check_batch_folder(out_dir: str | Path) -> Path:
    """Refuse, before any work, an output folder a batch must not write into: one that holds
    files but no batch's marker, or a location that cannot be written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DplError(f"'{out_dir}' exists and is not a folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _is_batch_folder(out_dir):
        raise DplError(
            f"'{out_dir}' holds files a batch did not write (no {MARKER_FILE}); a batch writes "
            "only into a new or empty folder or its own: choose another --out"
        )
    check_location(out_dir / MARKER_FILE)
    return out_dir


@dataclass(frozen=True)
class BatchSettings:
    """What every job shares (the command line's inversion settings and seed)."""

    steps: int = InversionSettings.steps
    guidance: float = InversionSettings.guidance
    seed: int = 0
    resize: bool = False
    null_text: NullTextSettings | None = None
    dpl_config: DplLossConfig | None = None
    """None: the model's DPL defaults (as `invert`)."""
    background: BackgroundSettings | None = None
    no_bg: bool = False

    def dpl_options(self, job: Job) -> dict[str, Any]:
        """`invert`'s DPL arguments for a job; only DPL jobs take them (as `invert` insists)."""
        if job.method != "dpl":
            return {}
        return {
            "words": job.words,
            "dpl_config": self.dpl_config,
            "background": self.background,
            "no_bg": self.no_bg,
        }

    def as_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


def _edit_options(job: Job, index: int) -> dict[str, Any]:
    edit_job = job.edits[index]
    return {
        "mode": edit_job.mode,
        "reweight": edit_job.reweight,
        "blend": edit_job.blend,
        "cross_replace_steps": edit_job.cross_steps,
        "self_replace_steps": edit_job.self_steps,
    }


def check_job(model: LoadedModel, job: Job, settings: BatchSettings) -> None:
    """Refuse, before any work, what `invert` or `edit` would refuse for this job (a word the
    model does not know, a word swap between prompts of different lengths, a blend word in
    neither prompt, ...), with their own messages; every unknown word of its prompts at once."""
    check_vocabulary(model, [job.prompt, *(edit_job.target for edit_job in job.edits)])
    plan_inversion(model, job.prompt, job.method, settings.steps, **settings.dpl_options(job))
    for index, edit_job in enumerate(job.edits):
        try:
            plan_edit(
                model, job.prompt, edit_job.target, settings.steps, **_edit_options(job, index)
            )
        except DplError as exc:
            raise DplError(f"edit {index + 1}: {exc}") from None


@dataclass
class JobOutcome:
    """What a worker sends back: the inversion and edits (written here), or the error."""

    job_id: str
    inversion: Inversion | None = None
    edits: list[EditResult] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    unet_evals: dict[str, int] = field(default_factory=dict)
    reconstruction_psnr: float | None = None
    """The reconstruction's PSNR (dB) against the input (`dpl_edit.outputs`)."""
    error: str | None = None
    traceback: str | None = None
    worker: str = field(default_factory=lambda: f"{platform.node()}:{os.getpid()}")


def run_job(model: LoadedModel, task: tuple[Job, BatchSettings]) -> JobOutcome:
    """Invert the job's image once and make every edit from it (the executors' work function).

    The seed is set per job, so a job's images do not depend on which worker ran it or what
    ran before. Any exception is the job's failure, returned rather than raised: one bad image
    must not stop a batch of hundreds.
    """
    job, settings = task
    outcome = JobOutcome(job.id)
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    try:
        inversion = invert(
            model,
            job.image,
            job.prompt,
            method=job.method,
            steps=settings.steps,
            guidance=settings.guidance,
            null_text=settings.null_text,
            resize=settings.resize,
            progress=False,
            **settings.dpl_options(job),
        )
        edits = [
            edit(
                model,
                inversion,
                e.target,
                progress=False,
                target_tokens=e.target_tokens,
                **_edit_options(job, i),
            )
            for i, e in enumerate(job.edits)
        ]
    except Exception as exc:  # the job failed; the batch goes on and records why
        outcome.error = str(exc) if isinstance(exc, DplError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, DplError):
            outcome.traceback = traceback.format_exc()
        outcome.seconds = {"job": time.perf_counter() - start}
        return outcome
    outcome.inversion, outcome.edits = inversion, edits
    if edits:  # every edit's source branch is the reconstruction
        outcome.reconstruction_psnr = round(reconstruction_psnr(inversion, edits[0].source), 2)
    outcome.seconds = {**inversion.timings, "edit": sum(e.timings["edit"] for e in edits)}
    outcome.seconds["job"] = time.perf_counter() - start
    outcome.unet_evals = {
        **inversion.unet_evals,
        "edit": sum(e.unet_evals["edit"] for e in edits),
    }
    return outcome


class JobStore:
    """The output folder's job folders and records (see the module docstring)."""

    def __init__(self, out_dir: Path, settings: dict[str, Any]):
        self.out_dir, self.settings = out_dir, settings

    def folder(self, job: Job) -> Path:
        return self.out_dir / "jobs" / job.folder

    def record(self, job: Job) -> dict[str, Any] | None:
        """The job's stored record, or None when there is none or it cannot be read."""
        path = self.folder(job) / RECORD
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def is_done(self, job: Job) -> bool:
        """Finished under the same spec and settings, with every file it names still there."""
        record = self.record(job)
        if record is None or record.get("status") != "ok":
            return False
        if record.get("spec") != job.spec() or record.get("settings") != self.settings:
            return False
        folder = self.folder(job)
        return all((folder / name).exists() for name in record.get("outputs", {}).values())

    def write(self, job: Job, outcome: JobOutcome) -> dict[str, Any]:
        """Write the job's files, then its record (last, so a crash leaves no record)."""
        folder = self.folder(job)
        (folder / RECORD).unlink(missing_ok=True)  # a redo is unfinished until its record is back
        start = time.perf_counter()
        outputs: dict[str, str] = {}
        if outcome.inversion is not None:
            files = RunFiles.in_folder(folder, len(outcome.edits))
            written = files.save(outcome.inversion, outcome.edits)
            outputs = {name: path.relative_to(folder).as_posix() for name, path in written.items()}
        record = {
            "id": job.id,
            "line": job.line,
            "image": str(job.image),
            "status": "failed" if outcome.error else "ok",
            "error": outcome.error,
            "traceback": outcome.traceback,
            "worker": outcome.worker,
            "seconds": {**outcome.seconds, "write": time.perf_counter() - start},
            "unet_evals": outcome.unet_evals,
            "reconstruction_psnr_db": outcome.reconstruction_psnr,
            "outputs": outputs,
            "spec": job.spec(),
            "settings": self.settings,
        }
        text = json.dumps(record, indent=2) + "\n"
        atomic_write_bytes(folder / RECORD, text.encode("utf-8"))
        return record


def _summary_row(job: Job, record: dict[str, Any] | None) -> dict[str, Any]:
    if record is None:
        return {"id": job.id, "line": job.line, "status": "not run"}
    keys = ("id", "line", "status", "error", "reconstruction_psnr_db", "seconds", "unet_evals")
    keys += ("worker",)
    row = {key: record.get(key) for key in keys}
    row["folder"] = f"jobs/{job.folder}"
    return row


def poor_jobs(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The jobs whose reconstruction is under `POOR_RECONSTRUCTION_DB`."""
    return [
        row["id"]
        for row in rows
        if isinstance(row.get("reconstruction_psnr_db"), int | float)
        and row["reconstruction_psnr_db"] < POOR_RECONSTRUCTION_DB
    ]


def _markdown(rows: Sequence[dict[str, Any]], wall: float, workers: int) -> str:
    ok = sum(row["status"] == "ok" for row in rows)
    lines = [
        "# Batch summary",
        "",
        f"{ok} of {len(rows)} jobs ok; this run took {wall:.1f} s on {workers} worker(s).",
    ]
    poor = poor_jobs(rows)
    if poor:
        lines.append(
            f"{len(poor)} reconstructed under {POOR_RECONSTRUCTION_DB:.0f} dB PSNR against their "
            "input: the model cannot represent those images, and their edits are as poor."
        )
    lines += [
        "",
        "| job | status | reconstruction (PSNR) | seconds | UNet passes | folder | error |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        seconds = (row.get("seconds") or {}).get("job")
        evals = sum((row.get("unet_evals") or {}).values())
        error = (row.get("error") or "").replace("|", "\\|")
        value = row.get("reconstruction_psnr_db")
        cells = [row["id"], row["status"], "" if value is None else f"{value:.1f} dB"]
        cells += ["" if seconds is None else f"{seconds:.1f}"]
        cells += [str(evals) if evals else "", row.get("folder", ""), error]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class BatchReport:
    """What a finished batch run did: counts, and where the summaries are."""

    total: int
    ran: int
    skipped: int
    failed: list[str]
    poor: list[str]
    """Jobs whose reconstruction is under `POOR_RECONSTRUCTION_DB` (`poor_jobs`)."""
    wall_seconds: float
    summary_jsonl: Path
    summary_md: Path


def run_batch(
    model: LoadedModel,
    jobs: Sequence[Job],
    out_dir: str | Path,
    settings: BatchSettings | None = None,
    executor: Executor | None = None,
    progress: bool = True,
) -> BatchReport:
    """Run every job not already done in `out_dir` on `executor` (default: this process).

    `model` is the model the jobs were checked against; its identity goes into every record,
    so a folder resumed with another model redoes its jobs instead of mixing them.
    """
    settings = settings or BatchSettings()
    executor = executor or Sequential(model)
    out_dir = check_batch_folder(out_dir)
    if not _is_batch_folder(out_dir):
        marker = {"format": MARKER_FORMAT, "package_version": __version__}
        atomic_write_bytes(out_dir / MARKER_FILE, (json.dumps(marker) + "\n").encode("utf-8"))
    store = JobStore(out_dir, {**settings.as_json(), "model": model.identity})
    todo = [job for job in jobs if not store.is_done(job)]
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="batch", unit="job", disable=not progress)
    tasks = [(job, settings) for job in todo]
    for index, outcome in executor.map(run_job, tasks):
        store.write(todo[index], outcome)
        bar.update()
    bar.close()
    wall = time.perf_counter() - start
    rows = [_summary_row(job, store.record(job)) for job in jobs]
    jsonl = "".join(json.dumps(row) + "\n" for row in rows)
    summary_jsonl = atomic_write_bytes(out_dir / "summary.jsonl", jsonl.encode("utf-8"))
    markdown = _markdown(rows, wall, executor.workers)
    summary_md = atomic_write_bytes(out_dir / "summary.md", markdown.encode("utf-8"))
    return BatchReport(
        total=len(jobs),
        ran=len(todo),
        skipped=len(jobs) - len(todo),
        failed=[row["id"] for row in rows if row["status"] != "ok"],
        poor=poor_jobs(rows),
        wall_seconds=wall,
        summary_jsonl=summary_jsonl,
        summary_md=summary_md,
    )
