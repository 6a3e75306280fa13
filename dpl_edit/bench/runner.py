"""Run the leakage benchmark: invert and edit every scene with every method, measure, report.

Each scene is first brought into the model's space (centre crop and resize of the image, its ideal
edit and its masks, exactly as `invert` prepares the image), so every metric compares pictures of
the model's resolution and no method is judged on resampling. Per method the runner inverts the
source under the source caption, edits towards the target with P2P (same settings and seed for all
methods) and measures, from the inversion's time-averaged cross-attention and the edit's two
branches (the source branch is the reconstruction):

- the edit outcome (`outcome`: target made, other objects kept, background kept, selective
  success and the failure class), the primary result, which no method optimises,
- localisation and leakage of each object noun's map against the object masks (diagnostics),
- reconstruction PSNR, preservation outside the edit region (background and other objects),
- edit fidelity inside the edit region against the ideal edit, and the checker's verdict on the
  intended object when the captions are world captions,
- cost: seconds per stage, UNet evaluations, peak memory.

Results go to `<out>/scenes/<id>.json` as soon as a scene is done, with the edits and attention
maps beside it, so an interrupted run keeps its finished scenes and a rerun with the same
settings skips them (a file made with other settings is refused, never mixed in). The report
(`report.write_report`) is rebuilt from those files at the end.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from PIL import Image
from tqdm.auto import tqdm

from dpl_edit.batch.executors import Executor, Sequential
from dpl_edit.bench.cost import peak_memory
from dpl_edit.bench.methods import (
    BASELINE,
    DEFAULT_METHODS,
    METHODS,
    BenchMethod,
    BenchSettings,
    resolve_methods,
)
from dpl_edit.bench.outcome import (
    FAILURES,
    THRESHOLDS,
    OutcomeThresholds,
    ScenePlaces,
    measure_outcome,
    outcome_definition,
)
from dpl_edit.bench.report import ExampleRow, write_json, write_report
from dpl_edit.bench.scenes import BenchScene, caption_words
from dpl_edit.engine.artifact import Inversion
from dpl_edit.engine.edit import edit
from dpl_edit.engine.inversion import invert
from dpl_edit.engine.model import LoadedModel
from dpl_edit.engine.text import check_prompt, find_word, prompt_tokens
from dpl_edit.errors import DplError
from dpl_edit.io.atomic import atomic_write_bytes
from dpl_edit.io.images import prepare_image, save_png
from dpl_edit.io.names import safe_stem
from dpl_edit.io.targets import check_location
from dpl_edit.metrics import DEFAULT_THRESHOLDS, DEFINITIONS, iou_curve, leakage, psnr, ssim
from dpl_edit.world import checker
from dpl_edit.world import synthetic as world

ARTICLES = frozenset({"a", "an", "the"})
"""Never blend words: a colour swap can turn "a" into "an", which says nothing about location."""


@dataclass(frozen=True)
class MethodRun:
    """One method on one scene: the per-scene result dict, the edit and the nouns' maps."""

    result: dict[str, Any]
    edit: np.ndarray
    maps: dict[str, torch.Tensor]
    reconstruction: np.ndarray


def _fit_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A mask cropped and resized like the image (`prepare_image`), then cut at one half."""
    grey = Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB")
    return np.asarray(prepare_image(grey, size))[..., 0] >= 128


def prepare_scene(scene: BenchScene, size: int) -> BenchScene:
    """The scene as the model sees it: every image and mask at `size`×`size`."""
    ideal = scene.ideal_image()
    return BenchScene(
        id=scene.id,
        image=np.asarray(prepare_image(Image.fromarray(scene.source_image()), size)),
        source=scene.source,
        target=scene.target,
        masks={noun: _fit_mask(mask, size) for noun, mask in scene.masks.items()},
        edited_object=scene.edited_object,
        ideal=None if ideal is None else np.asarray(prepare_image(Image.fromarray(ideal), size)),
        edit_region=_fit_mask(scene.changed_region, size),
    )


def _blend_words(scene: BenchScene) -> list[str]:
    """The edited object's noun and every word the target brings in (its new shape or colour)."""
    source = set(caption_words(scene.source))
    new = [w for w in caption_words(scene.target) if w not in source and w not in ARTICLES]
    return list(dict.fromkeys([scene.edited_object, *new]))


def checker_hit(edited: np.ndarray, source: str, target: str) -> bool | None:
    """Does the checker see the object the target caption asks for? None for non-world captions.

    The intended object is the (colour, shape) pair of the target that the source lacks; the
    checker works on world-sized pictures, so a smaller model's edit is upscaled first.
    """
    wanted = [
        o for o in checker.caption_objects(target) if o not in checker.caption_objects(source)
    ]
    if len(wanted) != 1:
        return None
    if edited.shape[:2] != (world.SIZE, world.SIZE):
        resized = Image.fromarray(edited).resize((world.SIZE, world.SIZE), Image.Resampling.BICUBIC)
        edited = np.asarray(resized)
    return checker.check_object(edited, *wanted[0]).ok


def noun_maps(
    model: LoadedModel, prompt: str, attention: torch.Tensor, nouns: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Each noun's time-averaged map [res, res]: the mean over the noun's token positions."""
    maps = {}
    for noun in nouns:
        positions = find_word(model.tokenizer, prompt, noun)
        maps[noun] = attention[..., positions].mean(dim=-1).float()
    return maps


def _pair(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    return {"psnr": psnr(a, b, mask), "ssim": ssim(a, b, mask)}


def measure(
    scene: BenchScene,
    maps: dict[str, torch.Tensor],
    reconstruction: np.ndarray,
    edited: np.ndarray,
) -> dict[str, Any]:
    """Localisation, leakage, reconstruction, preservation and edit fidelity of one method.

    `scene` is in model space (`prepare_scene`); images are H×W×3 uint8 of the same size.
    """
    source, region = scene.source_image(), scene.changed_region
    background = scene.background_mask
    curves, shares = {}, {}
    for noun, attn in maps.items():
        mask = scene.masks[noun]
        curves[noun] = iou_curve(attn, mask, DEFAULT_THRESHOLDS).tolist()
        shares[noun] = leakage(attn, mask, scene.other_objects_mask(noun), background)._asdict()
    ideal = scene.ideal_image()
    fidelity = None
    if ideal is not None:
        fidelity = {
            **_pair(edited, ideal, region),
            "checker_hit": checker_hit(edited, scene.source, scene.target),
        }
    others = scene.other_objects_mask(scene.edited_object)
    return {
        "outcome": measure_outcome(scene, edited),
        "localisation": {"iou_curves": curves},
        "leakage": shares,
        "reconstruction": {"psnr": psnr(reconstruction, source)},
        "preservation": {
            "background": _pair(source, edited, background & ~region),
            "other_objects": _pair(source, edited, others & ~region),
        },
        "edit_fidelity": fidelity,
    }


class InversionCache:
    """Inversions kept between runs, one folder per scene and inversion recipe.

    Rows that differ only in their edit settings share an inversion within a run
    (`run_scene`); with a cache they also share it across runs, so an edit-settings sweep added
    later costs only its edits. A folder is keyed by a hash of `BenchMethod.inversion_key` and
    the shared settings; its wall time is kept beside it, so a reused inversion's cost counts
    in every row exactly as if it had been run again.
    """

    def __init__(self, folder: Path, scene_id: str, settings: BenchSettings):
        self.root = Path(folder) / safe_stem(scene_id)
        self.settings = json.dumps(asdict(settings), sort_keys=True)

    def _name(self, key: str) -> str:
        return hashlib.sha256(f"{key}|{self.settings}".encode()).hexdigest()[:16]

    def get(self, model: LoadedModel, key: str) -> tuple[Inversion, float] | None:
        """The kept inversion and its wall time, or None when there is none yet."""
        folder, timing = self.root / self._name(key), self.root / f"{self._name(key)}.json"
        if not (folder.is_dir() and timing.is_file()):
            return None
        seconds = json.loads(timing.read_text(encoding="utf-8"))["seconds"]
        return Inversion.load(folder, model), float(seconds)

    def put(self, key: str, inversion: Inversion, seconds: float) -> None:
        """Keep an inversion: the folder first, then its time, which marks it complete."""
        inversion.save(self.root / self._name(key), overwrite=True)
        write_json(self.root / f"{self._name(key)}.json", {"key": key, "seconds": seconds})


def edit_arguments(method: BenchMethod, settings: BenchSettings) -> dict[str, Any]:
    """The edit settings of a row: the shared ones, with the row's own on top."""
    shared = {
        "cross_replace_steps": settings.cross_replace_steps,
        "self_replace_steps": settings.self_replace_steps,
    }
    return {**shared, **(method.edit_switches or {})}


def run_method(
    model: LoadedModel,
    method: BenchMethod,
    scene: BenchScene,
    settings: BenchSettings,
    inversions: dict[str, tuple[Inversion, float]] | None = None,
    cache: InversionCache | None = None,
) -> MethodRun:
    """Invert and edit a model-space scene with one method, then measure it.

    `inversions` (by `BenchMethod.inversion_key`) lets rows that differ only in their edit
    reuse one inversion (kept with its wall time); its time and UNet passes still count in each
    row's cost, so a row's figures are the same whether or not it shared. `cache` keeps
    inversions on disk for later runs.
    """
    torch.manual_seed(settings.seed)
    tokens = model.tokenizer
    same_length = len(prompt_tokens(tokens, scene.source)) == len(
        prompt_tokens(tokens, scene.target)
    )
    inversions = {} if inversions is None else inversions
    key = method.inversion_key(model)
    with peak_memory(model.device) as memory:
        if key not in inversions and cache is not None:
            kept = cache.get(model, key)
            if kept is not None:
                inversions[key] = kept
        if key not in inversions:
            start = time.perf_counter()
            inverted = invert(
                model,
                Image.fromarray(scene.source_image()),
                scene.source,
                method=method.inversion,
                steps=settings.steps,
                guidance=settings.guidance,
                progress=False,
                **method.invert_kwargs(model, list(scene.masks)),
            )
            inversions[key] = (inverted, time.perf_counter() - start)
            if cache is not None:
                cache.put(key, *inversions[key])
        inversion, inversion_seconds = inversions[key]
        start = time.perf_counter()
        result = edit(
            model,
            inversion,
            scene.target,
            mode="replace" if same_length else "refine",
            blend=_blend_words(scene) if settings.blend else None,
            progress=False,
            **edit_arguments(method, settings),
        )
    seconds = {**inversion.timings, **result.timings}
    seconds["total"] = inversion_seconds + time.perf_counter() - start
    maps = noun_maps(model, scene.source, inversion.attention, list(scene.masks))
    edited, reconstruction = np.asarray(result.image), np.asarray(result.source)
    metrics = measure(scene, maps, reconstruction, edited)
    metrics["cost"] = {
        "seconds": seconds,
        "unet_evals": sum(inversion.unet_evals.values()) + sum(result.unet_evals.values()),
        "peak_memory_mb": memory["peak_memory_mb"],
    }
    return MethodRun(metrics, edited, maps, reconstruction)


def method_config(model: LoadedModel, method: BenchMethod) -> dict[str, Any] | None:
    """A method's settings as stored JSON, for the resume check: its DPL settings, plus its
    null-text settings under "null_text" when it changes them; None for a plain row."""
    config, null_text = method.dpl_config(model), method.null_text()
    if config is None and null_text is None and method.edit_switches is None:
        return None
    stored = {} if config is None else asdict(config)
    if null_text is not None:
        stored["null_text"] = asdict(null_text)
    if method.edit_switches is not None:
        stored["edit"] = method.edit_switches
    return json.loads(json.dumps(stored))


def _defaults() -> dict[str, Any]:
    """What a setting missing from a stored config meant when it was stored: its default."""
    from dpl_edit.dpl.losses import DplLossConfig

    return {**json.loads(json.dumps(asdict(DplLossConfig()))), "null_text": None, "edit": None}


def same_config(stored: dict[str, Any] | None, current: dict[str, Any] | None) -> bool:
    """Whether a stored method config is the current one, reading a setting added since it was
    stored as that setting's default (so adding an option does not redo finished runs)."""
    if stored is None or current is None:
        return stored == current
    defaults = _defaults()
    return all(
        stored.get(key, defaults.get(key)) == current.get(key, defaults.get(key))
        for key in stored.keys() | current.keys()
    )


class SceneStore:
    """The per-scene files of one output folder: results JSON, edit PNGs, attention maps."""

    def __init__(self, out_dir: Path, settings: dict[str, Any]):
        self.root = out_dir / "scenes"
        self.settings = settings

    def _json(self, scene_id: str) -> Path:
        return self.root / f"{safe_stem(scene_id)}.json"

    def _artifact(self, scene_id: str, method: str, suffix: str) -> Path:
        return self.root / safe_stem(scene_id) / f"{method}{suffix}"

    def load(self, scene_id: str) -> dict[str, Any]:
        """The scene's finished methods (empty if none); refuses results of other settings."""
        path = self._json(scene_id)
        if not path.is_file():
            return {"id": scene_id, "settings": self.settings, "methods": {}}
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("settings") != self.settings:
            raise DplError(
                f"{path} was made with other settings ({record.get('settings')}); use another"
                " output folder or delete it"
            )
        return record

    def save(self, record: dict[str, Any], method: str, run: MethodRun) -> None:
        """Add one method's results; artifacts first, so the JSON never names missing files."""
        scene_id = record["id"]
        save_png(Image.fromarray(run.edit), self._artifact(scene_id, method, ".png"))
        reconstruction = Image.fromarray(run.reconstruction)
        save_png(reconstruction, self._artifact(scene_id, method, "_reconstruction.png"))
        maps = {noun: m.contiguous() for noun, m in run.maps.items()}
        atomic_write_bytes(
            self._artifact(scene_id, method, ".safetensors"), safetensors.torch.save(maps)
        )
        record["methods"][method] = run.result
        write_json(self._json(scene_id), record)

    def edit_image(self, scene_id: str, method: str, suffix: str = ".png") -> np.ndarray:
        """A finished method's edit (or, with suffix "_reconstruction.png", its
        reconstruction), read back for the example grid and rescoring."""
        with Image.open(self._artifact(scene_id, method, suffix)) as image:
            return np.asarray(image.convert("RGB"))

    def maps(self, scene_id: str, method: str) -> dict[str, torch.Tensor]:
        """A finished method's noun maps {noun: [res, res]}."""
        data = self._artifact(scene_id, method, ".safetensors").read_bytes()
        return safetensors.torch.load(data)


def _example_row(store: SceneStore, scene: BenchScene, methods: Sequence[str]) -> ExampleRow:
    """Source, ideal, each method's edit and each method's map of the edited noun."""
    noun = scene.edited_object
    return ExampleRow(
        scene_id=f"{scene.id} ({noun})",
        source=scene.source_image(),
        ideal=scene.ideal_image(),
        edits={m: store.edit_image(scene.id, m) for m in methods},
        attention={f"{m}: edited noun": store.maps(scene.id, m)[noun] for m in methods},
    )


def _preamble(
    model: LoadedModel, methods: Sequence[BenchMethod], settings: BenchSettings, scene_set: str
) -> list[str]:
    head = (
        f"Scenes: {scene_set}. Model: `{model.identity}` ({model.resolution}px) on"
        f" {model.device.type} ({platform.machine()}, {torch.get_num_threads()} torch threads)."
        f" Settings: {json.dumps(asdict(settings))}."
    )
    return _report_preamble(head, THRESHOLDS, [(m.name, m.description) for m in methods])


def _report_preamble(
    head: str, thresholds: OutcomeThresholds, methods: Sequence[tuple[str, str | None]]
) -> list[str]:
    """A report's opening: what ran, how the outcome and the metrics are defined, the rows."""
    lines = [
        head,
        "",
        outcome_definition(thresholds),
        "",
        f"Metrics (`dpl_edit.metrics`): {'; '.join(DEFINITIONS)}.",
        "",
        "Methods (all edited with Prompt-to-Prompt, same seed; each row's edit settings are the"
        " shared ones unless its description says otherwise):",
        "",
    ]
    return lines + [f"- `{n}`: {d}" if d else f"- `{n}`" for n, d in methods]


def _commit() -> str:
    """The commit the package runs from (with "-dirty" for uncommitted changes), or "unknown"."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def provenance(
    model: LoadedModel,
    configs: dict[str, Any],
    settings: BenchSettings,
    scene_set: str,
) -> dict[str, Any]:
    """What a final run ran: a hash of every method's settings, the shared settings and the
    model, with the commit, so a reported figure names exactly the configuration behind it."""
    config = {"methods": configs, "settings": asdict(settings), "model": model.identity}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return {
        "config_hash": digest[:16],
        "commit": _commit(),
        "scenes": scene_set,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        **config,
    }


@dataclass(frozen=True)
class SceneTask:
    """The methods a scene still needs (what one worker runs, on the scene as the model sees it)."""

    scene: BenchScene
    methods: tuple[BenchMethod, ...]
    settings: BenchSettings
    inversion_dir: Path | None = None
    """Where inversions are kept between runs (`InversionCache`); None keeps none."""


def run_scene(model: LoadedModel, task: SceneTask) -> list[tuple[str, MethodRun]]:
    """Every method the task names on its scene (the executors' work function).

    Each method seeds itself (`run_method`), so a scene's results are the same whichever
    worker runs it and whatever ran before."""
    prepared = prepare_scene(task.scene, model.resolution)
    inversions: dict[str, tuple[Inversion, float]] = {}
    cache = None
    if task.inversion_dir is not None:
        cache = InversionCache(task.inversion_dir, task.scene.id, task.settings)
    return [
        (m.name, run_method(model, m, prepared, task.settings, inversions, cache))
        for m in task.methods
    ]


def run_bench(
    model: LoadedModel,
    scenes: Sequence[BenchScene],
    out_dir: str | Path,
    methods: Sequence[str] = DEFAULT_METHODS,
    settings: BenchSettings | None = None,
    scene_set: str = "scene list",
    examples: int = 4,
    progress: bool = True,
    executor: Executor | None = None,
    inversion_dir: str | Path | None = None,
    final: bool = False,
) -> dict:
    """Benchmark `methods` on `scenes`, resuming from `out_dir`; return the aggregate.

    `scene_set` describes the scenes in the report (e.g. "world val split, first 20").
    `executor` runs the scenes (default: this process, on `model`); results are written here as
    each scene finishes, so the files are the same however the scenes were spread.
    `inversion_dir` keeps inversions for later runs (`InversionCache`). A `final` run (the
    sealed split) writes `final.json`: the configuration's hash and the commit it ran from.
    """
    settings = settings or BenchSettings()
    executor = executor or Sequential(model)
    chosen = resolve_methods(methods)
    if not scenes:
        raise DplError("no scenes to run")
    for scene in scenes:  # refuse a caption the model cannot take before hours of work
        try:
            check_prompt(model, scene.source)
            check_prompt(model, scene.target)
        except DplError as e:
            raise DplError(f"scene '{scene.id}': {e}") from None
    out_dir = Path(out_dir)
    claim_results_folder(out_dir)
    store = SceneStore(out_dir, {**asdict(settings), "model": model.identity})
    names = [m.name for m in chosen]
    configs = {m.name: method_config(model, m) for m in chosen}
    tasks = []
    for scene in scenes:
        record = store.load(scene.id)
        stored = record.get("configs", {})
        # New, or made under other DPL settings (e.g. changed model defaults): redo.
        todo = tuple(
            m
            for m in chosen
            if m.name not in record["methods"]
            or not same_config(stored.get(m.name), configs[m.name])
        )
        if todo:
            kept = None if inversion_dir is None else Path(inversion_dir)
            tasks.append(SceneTask(scene, todo, settings, kept))
    bar = tqdm(total=len(tasks), desc="bench", unit="scene", disable=not progress)
    for index, runs in executor.map(run_scene, tasks):
        record = store.load(tasks[index].scene.id)
        for name, run in runs:
            record.setdefault("configs", {})[name] = configs[name]
            store.save(record, name, run)
        bar.update()
    bar.close()
    if final:
        write_json(out_dir / "final.json", provenance(model, configs, settings, scene_set))
    return report_from_store(
        store,
        scenes,
        names,
        _preamble(model, chosen, settings, scene_set),
        model.resolution,
        examples,
    )


GALLERY_METHODS = ("nti", "dpl")
"""The methods whose failures the failure gallery shows, side by side on each scene."""


def failure_rows(
    store: SceneStore,
    scenes: Sequence[BenchScene],
    per_scene: Sequence[dict[str, Any]],
    resolution: int,
    per_class: int = 2,
) -> list[ExampleRow]:
    """Typical failures of each class: for NTI and then DPL, the first `per_class` scenes that
    method failed in that way (`per_scene`: the scenes' results, in `scenes`' order), each shown
    with both methods' edits and edited-noun maps (so one sees what the other method did on the
    same scene)."""
    rows = []
    for failing in GALLERY_METHODS:
        for name in FAILURES:
            failed = [
                scene
                for scene, record in zip(scenes, per_scene, strict=True)
                if (record["methods"][failing].get("outcome") or {}).get("failure", {}).get(name)
            ]
            for scene in failed[:per_class]:
                row = _example_row(store, prepare_scene(scene, resolution), GALLERY_METHODS)
                label = f"{failing}: {name.replace('_', ' ')}\n{scene.id}"
                rows.append(replace(row, scene_id=label))
    return rows


MARKER_FILE = "bench.json"
"""Written first into a results folder: what says the folder is the benchmark's to write in."""


def claim_results_folder(out_dir: Path) -> None:
    """Make `out_dir` a results folder, or refuse it: a run writes only into a new or empty
    folder, or one a run made (its marker, or a report and scene files from before markers);
    a folder with anything else in it is the user's and is never written into."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DplError(f"'{out_dir}' exists and is not a folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        names = {p.name for p in out_dir.iterdir()}
        made = MARKER_FILE in names or {"scenes", "aggregate.json"} <= names
        if not made:
            raise DplError(
                f"'{out_dir}' holds files the benchmark did not write; choose another --out"
            )
        if MARKER_FILE in names:
            return
    check_location(out_dir)
    write_json(out_dir / MARKER_FILE, {"made_by": "dpl-edit bench"})


def report_from_store(
    store: SceneStore,
    scenes: Sequence[BenchScene],
    names: Sequence[str],
    preamble: Sequence[str],
    resolution: int,
    examples: int = 4,
) -> dict:
    """Rebuild the report of an output folder from its per-scene files; return the aggregate."""
    per_scene = []
    for scene in scenes:
        methods = store.load(scene.id)["methods"]
        methods_run = {n: methods[n] for n in names}
        per_scene.append({"id": scene.id, "category": scene.category, "methods": methods_run})
    gallery = []
    if all(m in names for m in GALLERY_METHODS):
        gallery = failure_rows(store, scenes, per_scene, resolution)
    return write_report(
        store.root.parent,
        per_scene,
        baseline=BASELINE if BASELINE in names and len(names) > 1 else None,
        title="Edit benchmark",
        preamble=preamble,
        examples=[
            _example_row(store, prepare_scene(s, resolution), names) for s in scenes[:examples]
        ],
        failures=gallery,
    )


def rescore(
    out_dir: str | Path,
    scenes: Sequence[BenchScene],
    thresholds: OutcomeThresholds = THRESHOLDS,
    examples: int = 4,
) -> dict:
    """Measure the edit outcome again from a finished run's edit pictures (e.g. with other
    thresholds, or for a run made before the outcome existed) and rebuild its report."""
    out_dir = Path(out_dir)
    first = json.loads((out_dir / "scenes" / f"{safe_stem(scenes[0].id)}.json").read_text())
    store = SceneStore(out_dir, first["settings"])
    records = [store.load(scene.id) for scene in scenes]
    # The rows every scene has (a row run on only some scenes would make tables of unequal sets).
    names = [n for n in first["methods"] if all(n in r["methods"] for r in records)]
    if not names:
        raise DplError(f"no method has results for all {len(scenes)} scenes in '{out_dir}'")
    # Every row's edits of a run have the model's size: the first one gives it.
    resolution = store.edit_image(scenes[0].id, names[0]).shape[0]
    for scene, record in zip(tqdm(scenes, desc="rescore", unit="scene"), records, strict=True):
        prepared = prepare_scene(scene, resolution)
        places = ScenePlaces.of(prepared)
        for name in names:
            edited = store.edit_image(scene.id, name)
            outcome = measure_outcome(prepared, edited, thresholds, places)
            record["methods"][name]["outcome"] = outcome
        write_json(store._json(scene.id), record)
    head = f"Scenes: {len(scenes)}. Settings: {json.dumps(first['settings'])}."
    rows = [(n, METHODS[n].description if n in METHODS else None) for n in names]
    preamble = _report_preamble(head, thresholds, rows)
    return report_from_store(store, scenes, names, preamble, resolution, examples)
