"""The package's public API, its layering, and a quiet start (issue 11).

The modules moved into engine/, dpl/, io/ and world/; what users import from `dpl_edit` itself
is the API that stays. Data flows one way: no module imports another that (directly or not)
imports it back, and the engine knows nothing of the world or the benchmark.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dpl_edit

PACKAGE = Path(dpl_edit.__file__).parent
PUBLIC = {
    "__version__",
    "load_model",
    "LoadedModel",
    "invert",
    "reconstruct",
    "Inversion",
    "edit",
    "EditResult",
    "InversionSettings",
    "NullTextSettings",
    "EditSettings",
    "DplLossConfig",
    "BackgroundSettings",
    "ORIGINAL_NULL_TEXT",
    "DplError",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every package module -> the package modules it imports, at top level or inside functions."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                candidates = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            targets |= {c for c in candidates if c in modules and c != name}
        graph[name] = targets - {"dpl_edit"}  # the lazy top-level namespace
    return graph


def test_the_public_names_are_pinned_and_resolve():
    assert set(dpl_edit.__all__) == PUBLIC == {"__version__", *dpl_edit._EXPORTS}
    for name in PUBLIC - {"__version__", "ORIGINAL_NULL_TEXT"}:
        assert getattr(dpl_edit, name).__name__ == name
    assert dpl_edit.ORIGINAL_NULL_TEXT.inner_steps > dpl_edit.NullTextSettings().inner_steps
    with pytest.raises(AttributeError):
        _ = dpl_edit.not_a_name


def test_the_readme_example_imports_work():
    from dpl_edit import Inversion, edit, invert, load_model  # noqa: F401


@pytest.mark.parametrize(
    "code",
    [
        "import dpl_edit, dpl_edit.errors",
        # Building the parser shows every command's defaults (train-world's too); none may need
        # torch, or `dpl --help` and every one-line argument error take seconds.
        "from dpl_edit.cli import build_parser; build_parser()",
    ],
)
def test_importing_the_package_or_the_commands_help_does_not_import_torch(code):
    code = f"import sys; {code}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target] if target in path else [target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("layer", ["engine", "dpl", "io"])
def test_lower_layers_do_not_import_the_world_or_the_benchmark(layer: str):
    for module, targets in _imports().items():
        if module.startswith(f"dpl_edit.{layer}."):
            bad = {t for t in targets if t.startswith(("dpl_edit.world", "dpl_edit.bench"))}
            assert not bad, f"{module} imports {bad}"


def test_dpl_builds_on_the_engine_passes_not_on_invert_or_edit():
    for module, targets in _imports().items():
        if module.startswith("dpl_edit.dpl."):
            assert not targets & {"dpl_edit.engine.inversion", "dpl_edit.engine.edit"}, module


def test_no_library_warning_noise_on_help_or_import():
    """`dpl --help` and importing every module print nothing on stderr (issue 11: transformers'
    image-processor warnings came from importing StableDiffusionPipeline)."""
    help_run = subprocess.run(
        [sys.executable, "-m", "dpl_edit.cli", "--help"], capture_output=True, text=True
    )
    assert help_run.returncode == 0 and "usage: dpl" in help_run.stdout
    assert help_run.stderr == ""
    modules = sorted(_imports())
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    import_run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert import_run.returncode == 0, import_run.stderr
    assert import_run.stderr == ""


def test_only_the_command_line_imports_the_web_app():
    """The app is a layer on top, like the CLI: the library never depends on it (or Gradio)."""
    for module, targets in _imports().items():
        if not module.startswith("dpl_edit.ui") and module != "dpl_edit.cli":
            bad = {t for t in targets if t.startswith("dpl_edit.ui")}
            assert not bad, f"{module} imports {bad}"
