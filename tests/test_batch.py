"""`dpl batch`: a job file on the tiny model, every output, resuming, failures, bad lines, and
the same images from local worker processes and from Ray as from this process.

Runs use NTI at two DDIM steps: the images mean nothing, but CPU runs are deterministic and each
job seeds itself, so every way of running a job must give the same bytes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import TINY_WORDS, tiny_image

from dpl_edit.batch import run as batch_run
from dpl_edit.batch.executors import ModelSpec, ProcessPool, RayActors, threads_per_worker
from dpl_edit.batch.jobs import JobDefaults, read_jobs
from dpl_edit.batch.run import BatchSettings, check_job, run_batch
from dpl_edit.cli import main
from dpl_edit.errors import DplError

FAST = ["--steps", "2", "--method", "nti", "--device", "cpu"]
SETTINGS = BatchSettings(steps=2)
DEFAULTS = JobDefaults(method="nti")
JOBS = [
    {
        "id": "cat",
        "image": "img/a.png",
        "prompt": "a cat and a dog",
        "edits": [
            {"target": "a cat and a lion", "blend": ["dog", "lion"]},
            {"target": "a big cat and a dog", "mode": "refine", "reweight": {"big": 2}},
        ],
    },
    {
        "id": "red/blue",  # not a safe file name: its folder gets a cleaned name
        "image": "img/b.png",
        "prompt": "a red circle and a blue square",
        "edits": [{"target": "a red circle and a blue triangle", "cross_steps": {"default": 0.6}}],
    },
    {
        "id": "tiger",
        "image": "img/a.png",
        "prompt": "a tiger on the grass",
        "method": "dpl",  # the command line says nti; this job learns its word
        "words": ["tiger"],
        "edits": [{"target": "a lion on the grass", "self_steps": 0.3}],
    },
]


def write_jobs(folder: Path, jobs: list[dict] = JOBS, extra_lines: list[str] = ()) -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    tiny_image(seed=1).save(folder / "img" / "a.png")
    tiny_image(seed=2).save(folder / "img" / "b.png")
    path = folder / "jobs.jsonl"
    path.write_text("\n".join([*(json.dumps(j) for j in jobs), *extra_lines]) + "\n")
    return path


def batch(jobs: Path, out: Path, model_dir: Path, capsys, *extra: str) -> tuple[int, dict]:
    argv = ["batch", str(jobs), "--out", str(out), "--model", str(model_dir), "--json"]
    code = main([*argv, *FAST, *extra])
    return code, json.loads(capsys.readouterr().out)


def records(out: Path) -> dict[str, dict]:
    return {
        json.loads(p.read_text())["id"]: json.loads(p.read_text())
        for p in out.glob("jobs/*/record.json")
    }


def images(out: Path) -> dict[str, bytes]:
    """Every PNG a run wrote, by its path in the output folder."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


@pytest.fixture(scope="module")
def sequential_out(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished sequential run of the three jobs (shared: runs are the slow part)."""
    folder = tmp_path_factory.mktemp("batch")
    argv = ["batch", str(write_jobs(folder)), "--out", str(folder / "out")]
    assert main([*argv, "--model", str(tiny_model_dir), *FAST]) == 0
    return folder / "out"


def test_every_job_writes_its_files_record_and_summary(sequential_out: Path):
    found = records(sequential_out)
    assert set(found) == {"cat", "red/blue", "tiger"}
    cat = found["cat"]
    assert cat["status"] == "ok" and cat["error"] is None
    assert set(cat["outputs"]) == {"inversion", "source", "attention", "edit-1", "edit-2"}
    folder = sequential_out / "jobs" / "cat"
    for name in ("inversion/meta.json", "source.png", "attention.png", "edit-1.png", "edit-2.png"):
        assert (folder / name).is_file(), name
    # one inversion (2 DDIM + NTI steps), then 2 UNet passes per edit
    assert cat["unet_evals"]["ddim_inversion"] == 2 and cat["unet_evals"]["edit"] == 4
    assert cat["seconds"]["job"] > 0 and cat["seconds"]["null_text"] > 0
    assert found["red/blue"]["outputs"]["edit-1"] == "edit-1.png"
    assert found["tiger"]["unet_evals"]["dpl_tokens"] > 0
    meta = json.loads((sequential_out / "jobs/tiger/inversion/meta.json").read_text())
    assert meta["method"] == "dpl" and meta["dynamic_tokens"]["words"] == ["tiger"]
    assert not (sequential_out / "jobs" / "red").exists()  # the id's slash is not a folder
    rows = [
        json.loads(line) for line in (sequential_out / "summary.jsonl").read_text().splitlines()
    ]
    assert [r["id"] for r in rows] == ["cat", "red/blue", "tiger"]  # job-file order
    assert all(r["status"] == "ok" for r in rows)
    table = (sequential_out / "summary.md").read_text()
    assert "3 of 3 jobs ok" in table and "| tiger | ok |" in table


def test_resume_redoes_only_removed_and_half_written_jobs(
    sequential_out: Path, tiny_model_dir: Path, tmp_path: Path, capsys
):
    out = tmp_path / "out"
    shutil.copytree(sequential_out, out)
    jobs = write_jobs(tmp_path)
    shutil.rmtree(out / "jobs" / "cat")  # removed
    tiger = out / "jobs" / "tiger"
    (tiger / "record.json").unlink()  # a crash after some files, before the record
    (tiger / "edit-1.png").unlink()
    kept = next((out / "jobs").glob("red_blue-*"))
    kept_times = {p: p.stat().st_mtime_ns for p in kept.rglob("*") if p.is_file()}
    code, summary = batch(jobs, out, tiny_model_dir, capsys)
    assert code == 0
    assert summary["jobs"] == {"total": 3, "ran": 2, "skipped": 1, "failed": []}
    assert {p: p.stat().st_mtime_ns for p in kept.rglob("*") if p.is_file()} == kept_times
    assert (tiger / "edit-1.png").is_file() and (out / "jobs" / "cat" / "edit-2.png").is_file()
    assert images(out) == images(sequential_out)  # redone jobs give the same pictures
    code, summary = batch(jobs, out, tiny_model_dir, capsys)
    assert summary["jobs"]["ran"] == 0 and summary["jobs"]["skipped"] == 3


def test_a_changed_line_is_run_again(sequential_out: Path, tiny_model_dir: Path, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(sequential_out, out)
    changed = [JOBS[0], JOBS[1], {**JOBS[2], "edits": [{"target": "a cat on the grass"}]}]
    code, summary = batch(write_jobs(tmp_path, changed), out, tiny_model_dir, capsys)
    assert code == 0 and summary["jobs"]["ran"] == 1
    assert records(out)["tiger"]["spec"]["edits"][0]["target"] == "a cat on the grass"


def test_a_failing_job_is_recorded_and_the_others_finish(
    tiny_model_dir: Path, tmp_path: Path, capsys, monkeypatch
):
    real_invert = batch_run.invert

    def invert_failing_on_tigers(model, image, prompt, **options):
        if "tiger" in prompt:
            raise RuntimeError("out of memory (simulated)")
        return real_invert(model, image, prompt, **options)

    monkeypatch.setattr(batch_run, "invert", invert_failing_on_tigers)
    jobs, out = write_jobs(tmp_path), tmp_path / "out"
    code = main(["batch", str(jobs), "--out", str(out), "--model", str(tiny_model_dir), *FAST])
    captured = capsys.readouterr()
    assert code == 1
    assert "batch:  33%" in captured.err  # the progress bar over jobs (stderr)
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 3 jobs failed (first: 'tiger'); see ")
    found = records(out)
    assert found["tiger"]["status"] == "failed"
    assert found["tiger"]["error"] == "RuntimeError: out of memory (simulated)"
    assert "Traceback" in found["tiger"]["traceback"] and found["tiger"]["outputs"] == {}
    assert found["cat"]["status"] == found["red/blue"]["status"] == "ok"
    assert "| tiger | failed |" in (out / "summary.md").read_text()
    monkeypatch.setattr(batch_run, "invert", real_invert)  # fixed: a rerun retries only it
    code, summary = batch(jobs, out, tiny_model_dir, capsys)
    assert code == 0 and summary["jobs"]["ran"] == 1 and records(out)["tiger"]["status"] == "ok"


@pytest.fixture(scope="module")
def strict_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model declaring its vocabulary, so that an unknown word is refused."""
    folder = tmp_path_factory.mktemp("strict") / "tiny-sd"
    shutil.copytree(tiny_model_dir, folder)
    defaults = json.loads((folder / "dpl_defaults.json").read_text())
    (folder / "dpl_defaults.json").write_text(json.dumps({**defaults, "vocabulary": TINY_WORDS}))
    return folder


def test_every_bad_line_is_reported_before_anything_runs(strict_model_dir, tmp_path, capsys):
    good = JOBS[0]
    bad_lines = [
        '{"id": "broken", ',  # line 2: bad JSON
        json.dumps({**good, "id": "gone", "image": "img/missing.png"}),  # 3
        json.dumps({**good, "id": "swap", "edits": [{"target": "a cat and a big lion"}]}),  # 4
        json.dumps({**good, "id": "word", "prompt": "a zebra and a dog"}),  # 5
        json.dumps(good),  # 6: duplicate id
        json.dumps({**good, "id": "typo", "edit": []}),  # 7: a misspelt key
    ]
    jobs, out = write_jobs(tmp_path, [good], bad_lines), tmp_path / "out"
    code = main(["batch", str(jobs), "--out", str(out), "--model", str(strict_model_dir), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert err[0] == f"error: {jobs}: 6 bad lines, nothing was run:"
    assert (
        err[1]
        == "  line 2: bad JSON (Expecting property name enclosed in double quotes at column 18)"
    )
    assert err[2].startswith("  line 3: image '") and err[2].endswith("missing.png' does not exist")
    assert err[3].startswith("  line 4: edit 1: word swap needs prompts with the same number")
    assert err[4].startswith("  line 5: the word 'zebra'")
    assert err[5] == "  line 6: duplicate id 'cat' (first on line 1)"
    assert err[6].startswith("  line 7: unknown key 'edit' in the job (allowed: edits, id, image,")
    assert len(err) == 7
    assert not out.exists()


def test_job_defaults_come_from_the_command_line_and_lines_override_them(tmp_path, tiny_model):
    line = {**JOBS[0], "method": "dpl", "words": ["cat", "dog"]}
    jobs = read_jobs(write_jobs(tmp_path, [line, JOBS[1]]), JobDefaults(method="nti"))
    assert (jobs[0].method, jobs[0].words) == ("dpl", ("cat", "dog"))
    assert jobs[1].method == "nti" and jobs[1].edits[0].cross_steps == {"default_": 0.6}
    assert jobs[0].edits[1].reweight == {"big": 2.0} and jobs[0].edits[1].mode == "refine"
    plain = {**line, "edits": [{"target": "a cat and a lion", "target_tokens": "plain"}]}
    parsed = read_jobs(write_jobs(tmp_path, [plain]), DEFAULTS)
    assert parsed[0].edits[0].target_tokens == "plain"
    assert parsed[0].spec()["edits"][0]["target_tokens"] == "plain"
    assert "target_tokens" not in jobs[0].spec()["edits"][0]  # the default is not named
    bad = {**line, "edits": [{"target": "a cat and a lion", "target_tokens": "both"}]}
    with pytest.raises(DplError, match="'target_tokens' must be one of learned, plain"):
        read_jobs(write_jobs(tmp_path, [bad]), DEFAULTS)
    with pytest.raises(DplError, match="line 1: 'words' are DPL's"):
        read_jobs(write_jobs(tmp_path, [{**JOBS[0], "words": ["cat"]}]), DEFAULTS)
    with pytest.raises(DplError, match="line 1: word 'cow' is not in the prompt"):
        read_jobs(
            write_jobs(tmp_path, [line | {"words": ["cow"]}]),
            DEFAULTS,
            lambda job: check_job(tiny_model, job, SETTINGS),
        )


def test_ray_without_ray_installed_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    argv = ["batch", str(write_jobs(tmp_path)), "--out", str(tmp_path / "o"), "--ray", "auto"]
    assert main([*argv, "--model", str(tiny_model_dir)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --ray needs Ray, which is not installed: pip install 'dpl-edit[ray]'"
    )


def test_threads_are_shared_out_between_workers():
    assert threads_per_worker(2, cores=16) == 8
    assert threads_per_worker(3, cores=2) == 1
    assert threads_per_worker(1, cores=4) == 4


def _jobs_and_model(folder: Path, tiny_model) -> list:
    return read_jobs(write_jobs(folder), DEFAULTS, lambda job: check_job(tiny_model, job, SETTINGS))


def test_two_worker_processes_give_the_sequential_images(
    sequential_out: Path, tiny_model, tiny_model_dir: Path, tmp_path: Path
):
    jobs = _jobs_and_model(tmp_path, tiny_model)
    # One thread per worker, as this process has (conftest): the same sums in the same order.
    with ProcessPool(ModelSpec(str(tiny_model_dir)), workers=2, threads=1) as pool:
        report = run_batch(tiny_model, jobs, tmp_path / "out", SETTINGS, pool, progress=False)
    assert report.ran == 3 and not report.failed
    assert images(tmp_path / "out") == images(sequential_out)
    workers = {r["worker"] for r in records(tmp_path / "out").values()}
    assert len(workers) == 2  # three jobs over two processes: both took one


def test_ray_gives_the_sequential_images(
    sequential_out: Path, tiny_model, tiny_model_dir: Path, tmp_path: Path
):
    ray = pytest.importorskip("ray")
    jobs = _jobs_and_model(tmp_path, tiny_model)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # 1 thread per actor
    try:
        with RayActors(ModelSpec(str(tiny_model_dir)), address="auto") as actors:
            assert actors.workers == 2  # one per CPU of the cluster
            report = run_batch(tiny_model, jobs, tmp_path / "out", SETTINGS, actors, False)
    finally:
        ray.shutdown()
    assert report.ran == 3 and not report.failed
    assert images(tmp_path / "out") == images(sequential_out)
