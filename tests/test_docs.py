"""The documentation stays true to the code: the CLI reference matches the parsers, the model
cards match what `gates --card-only` writes, and every relative link in README.md and docs/
points at a file (and heading) that exists."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest

from dpl_edit import docs_cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    """The page without code blocks and code spans, where a `[x](y)` is not a link."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _links(text: str) -> list[str]:
    return _LINK.findall(_prose(text))


def _anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """Every heading id of a page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    ids = set()
    for heading in _HEADING.findall(_FENCE.sub("", page.read_text())):
        base = _anchor(heading)
        count = seen.get(base, 0)
        ids.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return ids


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE))


def test_cli_reference_is_generated_from_the_current_parsers():
    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == docs_cli.render(), (
        "docs/cli.md is stale: regenerate it with `python -m dpl_edit.docs_cli`"
    )


def test_cli_reference_lists_every_command_and_option():
    """Independent of the renderer's layout: each command's every visible option is named."""
    page = (ROOT / "docs" / "cli.md").read_text()
    parser = docs_cli.build_parser()
    commands = docs_cli._subparsers(parser)
    assert commands, "no subcommands found"
    for name, sub in commands.items():
        section = page.split(f"## `dpl {name}`", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            if not action.option_strings:
                assert f"`{action.metavar or action.dest}`" in section, (name, action.dest)
                continue
            assert action.option_strings[-1] in section, (name, action.option_strings)


def test_the_generator_writes_the_page(tmp_path):
    out = tmp_path / "cli.md"
    assert docs_cli.main(["--out", str(out)]) == 0
    assert out.read_text() == docs_cli.render()


@pytest.mark.parametrize("name", ["world", "world-sink"])
def test_model_cards_are_what_card_only_writes(name, tmp_path):
    """A card is generated from gates.json and the notes in dpl_defaults.json: text edited in
    the card alone would be lost the next time it is regenerated."""
    from dpl_edit.bench.sink import MASS_FILE
    from dpl_edit.world import gates

    shipped = ROOT / "dpl_edit" / "models" / name
    folder = tmp_path / name
    folder.mkdir()
    for part in ("dpl_defaults.json", "gates.json", MASS_FILE):
        shutil.copy(shipped / part, folder / part)
    gates.write_card(folder, json.loads((folder / "gates.json").read_text()))
    assert (folder / "README.md").read_text() == (shipped / "README.md").read_text(), (
        f"the {name} card is stale: python -m dpl_edit.world.gates --model {name} --card-only"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in _links(page.read_text()):
        if _is_external(target):
            continue
        path_part, _, fragment = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(target)
        elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_the_link_checker_sees_links_and_skips_code():
    text = 'See [a](x.md) and ![b](img/y.png "t").\n```sh\n[c](not-a-link)\n```\n`[d](nor-this)`'
    assert _links(text) == ["x.md", "img/y.png"]
    assert _anchor("Speed and memory (`dpl run`)") == "speed-and-memory-dpl-run"
