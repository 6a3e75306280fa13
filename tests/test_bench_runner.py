"""The benchmark runner: the built-in world set, a tiny end-to-end run, JSONL path and resuming.

Runs use a tiny random model (conftest's builder with the world's vocabulary, so world captions
fit) at two DDIM steps: the numbers mean nothing, but every file, schema field and code path of a
real run is exercised, and CPU runs are deterministic, so two paths to the same scene must agree.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_sd
from PIL import Image

from dpl_edit import cli
from dpl_edit.batch.executors import ModelSpec, ProcessPool
from dpl_edit.batch.jobs import JobDefaults, read_jobs
from dpl_edit.batch.run import BatchSettings, check_job
from dpl_edit.bench import runner
from dpl_edit.bench.methods import BenchSettings, resolve_methods
from dpl_edit.bench.scenes import caption_words, load_jsonl
from dpl_edit.bench.world_set import (
    CATEGORIES,
    CATEGORY_SIZE,
    SPLIT_SEEDS,
    SPLIT_SIZE,
    export_jobs,
    export_world,
    world_split,
)
from dpl_edit.engine.model import LoadedModel, load_model
from dpl_edit.errors import DplError
from dpl_edit.metrics import DEFINITIONS
from dpl_edit.world import synthetic as world

SETTINGS = BenchSettings(steps=2)
METHODS = ["ddim", "nti"]


@pytest.fixture(scope="module")
def world_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-world") / "tiny-world"
    return build_tiny_sd(folder, words=list(world.VOCABULARY), text_len=24)


@pytest.fixture(scope="module")
def world_model(world_model_dir: Path) -> LoadedModel:
    return load_model(world_model_dir)


@pytest.fixture(scope="module")
def bench_out(world_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-scene run of DDIM and NTI (shared: the runs are the slow part)."""
    out = tmp_path_factory.mktemp("bench") / "results"
    scenes = world_split("dev", 2)
    runner.run_bench(world_model, scenes, out, METHODS, SETTINGS, examples=2, progress=False)
    return out


def test_world_splits_are_deterministic_disjoint_and_mixed():
    a, b = world_split("val", 6), world_split("val", 6)
    for x, y in zip(a, b, strict=True):
        assert (x.id, x.source, x.target, x.edited_object) == (
            y.id,
            y.source,
            y.target,
            y.edited_object,
        )
        np.testing.assert_array_equal(x.source_image(), y.source_image())
        np.testing.assert_array_equal(x.ideal_image(), y.ideal_image())
    total = SPLIT_SIZE + CATEGORY_SIZE * len(world.HARD_CATEGORIES)
    assert len(world_split("dev")) == len(world_split("val")) == total
    assert SPLIT_SIZE >= 100
    val, test = world_split("val", 30), world_split("dev", 30)
    assert not {s.id for s in val} & {s.id for s in test}
    val_images = {s.source_image().tobytes() for s in val}
    assert not any(s.source_image().tobytes() in val_images for s in test)
    assert [len(s.masks) for s in val[:4]] == [2, 3, 2, 3]
    with pytest.raises(DplError, match="unknown split 'train'"):
        world_split("train")


def test_original_scenes_keep_their_ids_and_pictures():
    """The hard categories are appended: the first 100 scenes are what earlier runs measured."""
    scenes = world_split("val", 4)
    for index, scene in enumerate(scenes):
        original = world.scene_at(SPLIT_SEEDS["val"], index, n_objects=2 + index % 2).render()
        assert scene.id == f"val-{index:03d}" and scene.source == original.caption
        np.testing.assert_array_equal(scene.source_image(), original.image)
    assert [s.category for s in scenes] == ["two-objects", "three-objects"] * 2


def _disc_gap(objects) -> float:
    """Pixels between two objects' bounding discs (radius 1.3 x half size, as in the world)."""
    a, b = objects
    return float(np.hypot(a.cx - b.cx, a.cy - b.cy) - 1.3 * (a.half_size + b.half_size))


@pytest.mark.parametrize("category", world.HARD_CATEGORIES)
def test_hard_categories_are_what_they_say(category: str):
    scenes = world_split("val", categories=[category])
    assert len(scenes) == CATEGORY_SIZE
    assert all(s.category == category and s.id.startswith(f"val-{category}-") for s in scenes)
    for index, scene in enumerate(scenes):
        drawn = world.sample_hard_scene(
            np.random.default_rng([SPLIT_SEEDS["val"], 1 + world.HARD_CATEGORIES.index(category),
                                   index, 0]), category
        )  # fmt: skip
        colours = sorted(o.color for o in drawn.objects)
        count = 3 if category == "row-of-three" else 2
        assert scene.source == drawn.caption and len(scene.masks) == count
        masks = list(scene.masks.values())
        assert not any((a & b).any() for i, a in enumerate(masks) for b in masks[i + 1 :])
        gaps = [_disc_gap(pair) for pair in zip(drawn.objects, drawn.objects[1:], strict=False)]
        if category in ("same-colour", "same-colour-close"):
            assert colours[0] == colours[1]
        elif category == "similar-colour":
            assert colours in (["orange", "red"], ["blue", "purple"])
        if category in ("close", "same-colour-close", "row-of-three"):
            assert all(1.0 <= gap <= 3.0 for gap in gaps)
        if category == "row-of-three":
            a, b, c = (np.array([o.cx, o.cy]) for o in drawn.objects)
            cross = (b - a)[0] * (c - b)[1] - (b - a)[1] * (c - b)[0]
            assert abs(cross) < 1e-6 * np.linalg.norm(b - a) * np.linalg.norm(c - b) + 1e-9
            assert len(set(colours)) == 3
    with pytest.raises(DplError, match="unknown scene category 'huge'"):
        world_split("val", categories=["huge"])


@pytest.mark.parametrize("index", range(8))
def test_ideal_edit_changes_only_the_edit_region(index: int):
    scene = world_split("dev", index + 1)[index]
    region, edited = scene.changed_region, scene.masks[scene.edited_object]
    assert (edited & ~region).sum() == 0 and region.sum() > 0
    # Outside the region the ideal is the source exactly, so preservation has a true zero.
    np.testing.assert_array_equal(scene.ideal_image()[~region], scene.source_image()[~region])
    assert not np.array_equal(scene.ideal_image()[region], scene.source_image()[region])
    masks = np.stack(list(scene.masks.values()))
    assert masks.sum(axis=0).max() == 1, "object masks overlap"
    others = scene.other_objects_mask(scene.edited_object)
    assert not (others & region).any(), "the edit region covers another object"
    # One word swapped (a colour swap may also turn "a" into "an").
    changed = set(caption_words(scene.source)) ^ set(caption_words(scene.target))
    assert len(changed - runner.ARTICLES) == 2
    # The checker finds the intended object in the ideal edit, and not in the source.
    assert runner.checker_hit(scene.ideal_image(), scene.source, scene.target) is True
    assert runner.checker_hit(scene.source_image(), scene.source, scene.target) is False


def test_measure_scores_a_perfect_method_perfectly():
    scene = runner.prepare_scene(world_split("val", 1)[0], world.SIZE)
    perfect_maps = {
        noun: torch.from_numpy(mask.astype(np.float32)) for noun, mask in scene.masks.items()
    }
    source, ideal = scene.source_image(), scene.ideal_image()
    result = runner.measure(scene, perfect_maps, source, ideal)
    for curve in result["localisation"]["iou_curves"].values():
        assert curve[1:] == pytest.approx([1.0] * 20)
    for shares in result["leakage"].values():
        assert shares == {"outside": 0.0, "other_objects": 0.0, "background": 0.0}
    assert result["reconstruction"]["psnr"] == 100.0
    assert result["edit_fidelity"]["psnr"] == 100.0
    assert result["edit_fidelity"]["checker_hit"] is True
    assert result["preservation"]["other_objects"]["psnr"] == 100.0
    swapped = {noun: perfect_maps[scene.edited_object] for noun in perfect_maps}
    other = next(n for n in scene.masks if n != scene.edited_object)
    assert runner.measure(scene, swapped, source, ideal)["leakage"][other]["outside"] == 1.0


def test_run_writes_scene_files_report_and_pictures(bench_out: Path):
    for name in ("per_scene.json", "aggregate.json", "report.md"):
        assert (bench_out / name).is_file()
    for name in ("iou_curves.png", "leakage.png", "examples.png"):
        assert (bench_out / name).read_bytes().startswith(b"\x89PNG")
    report = (bench_out / "report.md").read_text()
    assert all(definition in report for definition in DEFINITIONS)  # as the model card states
    per_scene = json.loads((bench_out / "per_scene.json").read_text())
    assert [s["id"] for s in per_scene] == ["dev-000", "dev-001"]
    scene = world_split("dev", 1)[0]
    for method in METHODS:
        result = per_scene[0]["methods"][method]
        assert set(result["localisation"]["iou_curves"]) == set(scene.masks)
        assert all(len(c) == 21 for c in result["localisation"]["iou_curves"].values())
        for shares in result["leakage"].values():
            assert shares["outside"] == pytest.approx(
                shares["other_objects"] + shares["background"]
            )
        assert set(result["preservation"]) == {"background", "other_objects"}
        assert result["edit_fidelity"]["checker_hit"] in (True, False)
        assert sum(result["outcome"]["failure"].values()) == (
            not result["outcome"]["selective_success"]
        )
        assert (bench_out / "scenes" / "dev-000" / f"{method}_reconstruction.png").is_file()
        assert result["cost"]["peak_memory_mb"] > 0
        assert (bench_out / "scenes" / "dev-000" / f"{method}.png").is_file()
    ddim, nti = (per_scene[0]["methods"][m]["cost"] for m in METHODS)
    assert ddim["unet_evals"] == 2 * SETTINGS.steps  # inversion + edit, one call per step
    assert nti["unet_evals"] > ddim["unet_evals"] and "null_text" in nti["seconds"]
    aggregate = json.loads((bench_out / "aggregate.json").read_text())
    assert aggregate["n_scenes"] == 2 and aggregate["baseline"] == "nti"
    report = (bench_out / "report.md").read_text()
    assert "| metric | ddim | nti |" in report and "Paired difference from nti" in report


def test_exported_jsonl_gives_the_same_results_as_the_built_in_scene(
    world_model: LoadedModel, bench_out: Path, tmp_path: Path
):
    path = export_world(tmp_path / "export", "dev", limit=1)
    scenes = load_jsonl(path)
    np.testing.assert_array_equal(scenes[0].changed_region, world_split("dev", 1)[0].changed_region)
    out = tmp_path / "from-jsonl"
    runner.run_bench(world_model, scenes, out, ["ddim"], SETTINGS, progress=False)
    from_file = json.loads((out / "per_scene.json").read_text())[0]["methods"]["ddim"]
    built_in = json.loads((bench_out / "per_scene.json").read_text())[0]["methods"]["ddim"]
    del from_file["cost"], built_in["cost"]
    assert from_file == built_in


def test_rerun_resumes_finished_scenes_and_refuses_other_settings(
    world_model: LoadedModel, bench_out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "results"
    shutil.copytree(bench_out, out)
    (out / "scenes" / "dev-001.json").unlink()  # as if interrupted during the second scene
    calls: list[tuple[str, str]] = []
    real_run_method = runner.run_method

    def counting(model, method, scene, *args):
        calls.append((scene.id, method.name))
        return real_run_method(model, method, scene, *args)

    monkeypatch.setattr(runner, "run_method", counting)
    scenes = world_split("dev", 2)
    runner.run_bench(world_model, scenes, out, METHODS, SETTINGS, progress=False)
    assert calls == [("dev-001", "ddim"), ("dev-001", "nti")]
    calls.clear()
    runner.run_bench(world_model, scenes, out, ["nti"], SETTINGS, progress=False)
    assert calls == []
    assert list(json.loads((out / "aggregate.json").read_text())["methods"]) == ["nti"]
    with pytest.raises(DplError, match="other settings"):
        runner.run_bench(world_model, scenes, out, METHODS, BenchSettings(steps=3), progress=False)


def test_unknown_methods_fail_before_any_work(capsys: pytest.CaptureFixture):
    with pytest.raises(DplError, match="unknown method 'bogus'"):
        resolve_methods(["nti", "bogus"])
    assert cli.main(["bench", "--methods", "bogus", "--model", "/nonexistent"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown method 'bogus'")
    assert [m.name for m in resolve_methods(["nti", "ddim", "nti"])] == ["nti", "ddim"]


def _scene_files(out: Path) -> dict[str, object]:
    """Every scene's results without their timings, and the bytes of its edits and maps."""
    files: dict[str, object] = {}
    for path in sorted((out / "scenes").rglob("*.*")):
        if path.suffix == ".json":
            record = json.loads(path.read_text())
            for result in record["methods"].values():
                del result["cost"]
            files[path.name] = record
        else:
            files[path.relative_to(out).as_posix()] = path.read_bytes()
    return files


def test_two_workers_give_the_sequential_results(
    world_model: LoadedModel, world_model_dir: Path, bench_out: Path, tmp_path: Path
):
    out, scenes = tmp_path / "parallel", world_split("dev", 2)
    # One thread per worker, as this process has (conftest): the same sums in the same order.
    with ProcessPool(ModelSpec(str(world_model_dir)), workers=2, threads=1) as pool:
        runner.run_bench(world_model, scenes, out, METHODS, SETTINGS, progress=False, executor=pool)
    assert _scene_files(out) == _scene_files(bench_out)
    per_scene = json.loads((out / "per_scene.json").read_text())
    assert [s["id"] for s in per_scene] == ["dev-000", "dev-001"]


def test_bad_parallel_options_are_one_line_errors(world_model_dir: Path, capsys):
    argv = ["bench", "--limit", "1", "--model", str(world_model_dir), "--out", "/nonexistent"]
    assert cli.main([*argv, "--gpus-per-job", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --gpus-per-job needs --ray"
    assert cli.main([*argv, "--workers", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --workers must be at least 1, got 0"


def test_example_jobs_are_the_scenes_word_swaps(world_model: LoadedModel, tmp_path: Path):
    assert (
        cli.main(["batch", "--example-jobs", str(tmp_path), "--split", "val", "--limit", "3"]) == 0
    )
    settings = BatchSettings(steps=2)
    jobs = read_jobs(
        tmp_path / "jobs.jsonl",
        JobDefaults(method="nti"),
        lambda job: check_job(world_model, job, settings),
    )
    scenes = world_split("val", 3)
    assert [job.id for job in jobs] == [scene.id for scene in scenes]
    for job, scene in zip(jobs, scenes, strict=True):
        assert job.prompt == scene.source and [e.target for e in job.edits] == [scene.target]
        np.testing.assert_array_equal(np.asarray(Image.open(job.image)), scene.source_image())


def test_a_setting_added_since_a_run_reads_as_its_default_on_resume(tiny_model):
    methods = {m.name: m for m in resolve_methods(["dpl", "dpl-rise", "nti", "nti-fast"])}
    current = runner.method_config(tiny_model, methods["dpl"])
    older = {k: v for k, v in current.items() if k != "stop_on_rise"}  # stored before it existed
    assert runner.same_config(older, current)
    assert not runner.same_config(older, runner.method_config(tiny_model, methods["dpl-rise"]))
    # Null-text settings are part of a row's config, for NTI rows too.
    assert runner.method_config(tiny_model, methods["nti"]) is None
    fast = runner.method_config(tiny_model, methods["nti-fast"])
    assert fast["null_text"]["inner_steps"] == 5
    assert not runner.same_config(None, fast)
    assert runner.same_config(None, None)


def test_rows_that_differ_only_in_their_edit_share_one_inversion(world_model: LoadedModel):
    scene = world_split("val", 1)[0]
    methods = tuple(resolve_methods(["dpl", "dpl-plain-target"]))
    config = runner.method_config(world_model, methods[1])
    assert config["edit"] == {"target_tokens": "plain"}
    assert not runner.same_config(runner.method_config(world_model, methods[0]), config)
    before = world_model.unet_evals
    runs = dict(runner.run_scene(world_model, runner.SceneTask(scene, methods, SETTINGS)))
    shared = world_model.unet_evals - before
    before = world_model.unet_evals
    alone = runner.run_scene(world_model, runner.SceneTask(scene, methods[:1], SETTINGS))[0][1]
    single = world_model.unet_evals - before
    # One inversion and two edits (SETTINGS.steps passes each) instead of two inversions ...
    assert shared == single + SETTINGS.steps
    # ... and each row reports the same cost and maps as if it had run alone.
    for run in runs.values():
        assert run.result["cost"]["unet_evals"] == alone.result["cost"]["unet_evals"]
        for noun, attention in alone.maps.items():
            torch.testing.assert_close(run.maps[noun], attention)
    np.testing.assert_array_equal(runs["dpl"].edit, alone.edit)


def test_every_row_builds_its_settings_and_the_drift_rows_change_only_the_radius(
    world_model: LoadedModel,
):
    rows = {m.name: m for m in resolve_methods(["all"])}
    configs = {name: runner.method_config(world_model, row) for name, row in rows.items()}
    default = configs["dpl"]
    for name, radius in (("dpl-drift025", 0.25), ("dpl-drift035", 0.35), ("dpl-drift075", 0.75)):
        assert configs[name] == {**default, "max_drift": radius}


def test_per_category_takes_the_first_scenes_of_every_category():
    scenes = world_split("val", per_category=3)
    counts = {c: sum(s.category == c for s in scenes) for c in CATEGORIES}
    assert counts == dict.fromkeys(CATEGORIES, 3)
    assert [s.id for s in scenes[:6]] == [f"val-{i:03d}" for i in range(6)]
    with pytest.raises(DplError, match="scenes per category must be at least 1"):
        world_split("val", per_category=0)


def test_the_sealed_split_runs_only_with_final(capsys: pytest.CaptureFixture):
    assert cli.main(["bench", "--split", "test", "--model", "/nonexistent"]) == 2
    assert "sealed" in capsys.readouterr().err
    assert cli.main(["bench", "--split", "val", "--final", "--model", "/nonexistent"]) == 2
    assert "--final is only for the sealed split" in capsys.readouterr().err
    assert cli.main(["bench", "--split", "test", "--export-world", "/tmp/x"]) == 2
    capsys.readouterr()


def test_a_final_run_records_its_configuration_hash_and_commit(
    world_model: LoadedModel, tmp_path: Path
):
    scenes = world_split("val", 1)
    out = tmp_path / "final"
    runner.run_bench(world_model, scenes, out, ["ddim"], SETTINGS, progress=False, final=True)
    record = json.loads((out / "final.json").read_text())
    assert len(record["config_hash"]) == 16 and record["commit"]
    again = runner.provenance(world_model, {"ddim": None}, SETTINGS, "x")
    assert again["config_hash"] == record["config_hash"]  # the scene text is not configuration
    other = runner.provenance(world_model, {"ddim": None}, BenchSettings(steps=3), "x")
    assert other["config_hash"] != record["config_hash"]


def test_kept_inversions_are_reused_and_give_the_same_edits(
    world_model: LoadedModel, tmp_path: Path
):
    scenes, kept = world_split("val", 2), tmp_path / "inversions"
    first, second = tmp_path / "first", tmp_path / "second"
    runner.run_bench(
        world_model, scenes, first, ["nti"], SETTINGS, progress=False, inversion_dir=kept
    )
    assert len(list(kept.glob("*/*.json"))) == 2
    before = world_model.unet_evals
    runner.run_bench(
        world_model,
        scenes,
        second,
        ["nti", "nti-s00"],
        SETTINGS,
        progress=False,
        inversion_dir=kept,
    )
    assert world_model.unet_evals - before == 2 * 2 * SETTINGS.steps  # edits only, no inversion
    for scene in scenes:
        a = (first / "scenes" / scene.id / "nti.png").read_bytes()
        assert a == (second / "scenes" / scene.id / "nti.png").read_bytes()
    per_scene = json.loads((second / "per_scene.json").read_text())
    costs = [s["methods"][m]["cost"]["unet_evals"] for s in per_scene for m in ("nti", "nti-s00")]
    assert costs[0] == costs[1] and costs[2] == costs[3]


def test_edit_sweep_rows_change_one_edit_setting_and_share_the_inversion(
    world_model: LoadedModel,
):
    rows = {m.name: m for m in resolve_methods(["all"])}
    for base in ("nti", "dpl"):
        for name, row in rows.items():
            if not name.startswith(f"{base}-") or row.edit_switches is None:
                continue
            if row.inversion_key(world_model) != rows[base].inversion_key(world_model):
                continue
            arguments = runner.edit_arguments(row, SETTINGS)
            shared = runner.edit_arguments(rows[base], SETTINGS)
            assert arguments == {**shared, **row.edit_switches}, name
            assert arguments != shared, name
    assert runner.edit_arguments(rows["nti-c04"], SETTINGS)["cross_replace_steps"] == 0.4
    assert runner.edit_arguments(rows["nti"], SETTINGS)["self_replace_steps"] == 0.5


def test_a_run_never_writes_into_a_folder_of_the_users(world_model: LoadedModel, tmp_path: Path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    scenes = world_split("val", 1)
    with pytest.raises(DplError, match="did not write"):
        runner.run_bench(world_model, scenes, mine, ["ddim"], SETTINGS, progress=False)
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"]
    out = tmp_path / "results"
    runner.run_bench(world_model, scenes, out, ["ddim"], SETTINGS, progress=False)
    assert (out / runner.MARKER_FILE).is_file()
    runner.run_bench(world_model, scenes, out, ["ddim"], SETTINGS, progress=False)  # resumes


def test_exports_never_replace_a_users_file(tmp_path: Path):
    (tmp_path / "jobs.jsonl").write_text("mine")
    for export in (
        lambda: export_jobs(tmp_path, limit=1),
        lambda: export_world(tmp_path, "val", 1),
    ):
        with pytest.raises(DplError, match="not an empty folder"):
            export()
    assert (tmp_path / "jobs.jsonl").read_text() == "mine"
