"""The command-line reference, docs/cli.md, written from the `dpl` parsers themselves.

The parsers are the one place each option, its help and its default are defined, so the
reference is generated from them rather than written by hand: `python -m dpl_edit.docs_cli`
rewrites docs/cli.md, and a test fails when the committed file differs from what the parsers
give (an option added, renamed or re-defaulted without regenerating). The page is built from
the parsers' actions, not from `format_help()`, so it does not depend on the terminal's width
or on how a Python version wraps help text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpl_edit.cli import build_parser
from dpl_edit.io.atomic import atomic_write_bytes

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "cli.md"

_HEADER = """# Command-line reference

Generated from the `dpl` command's parsers by `python -m dpl_edit.docs_cli`; do not edit by
hand (`tests/test_docs.py` fails when this page and the parsers differ). `dpl COMMAND --help`
prints the same text. How to use the commands together: [the user guide](guide.md).
"""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser of every `dpl` command, in the order `dpl --help` lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _option_label(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    """`--steps STEPS`, `-h, --help`, or a positional's name, as `--help` shows them."""
    return formatter._format_action_invocation(action)


def _help_text(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    """The action's help with `%(default)s` and the like filled in, as `--help` prints it."""
    if not action.help:
        return ""
    return " ".join(formatter._expand_help(action).split())


def _synopsis(name: str, parser: argparse.ArgumentParser) -> str:
    """`dpl NAME` with the positionals and the required options, then `[options]`."""
    parts = [f"dpl {name}"]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        if not action.option_strings:
            parts.append((action.metavar or action.dest).upper())
        elif action.required:
            parts.append(f"{action.option_strings[-1]} {(action.metavar or action.dest).upper()}")
    return " ".join([*parts, "[options]"])


def _cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    return text.replace("|", "\\|")


def command_section(name: str, parser: argparse.ArgumentParser) -> str:
    """One command's section: what it does, its synopsis and a table per argument group."""
    formatter = parser._get_formatter()
    lines = [
        f"## `dpl {name}`",
        "",
        parser.description or "",
        "",
        "```sh",
        _synopsis(name, parser),
        "```",
    ]
    for group in parser._action_groups:
        actions = [
            a
            for a in group._group_actions
            if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
        ]
        if not actions:
            continue
        title = group.title or "options"
        lines += [
            "",
            f"**{title[0].upper()}{title[1:]}**",
            "",
            "| argument | meaning |",
            "|---|---|",
        ]
        for action in actions:
            label = _cell(_option_label(action, formatter))
            lines.append(f"| `{label}` | {_cell(_help_text(action, formatter))} |")
    return "\n".join(lines) + "\n"


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole reference page for `parser` (by default the `dpl` command's)."""
    parser = parser or build_parser()
    commands = _subparsers(parser)
    index = "\n".join(
        f"- [`dpl {name}`](#dpl-{name}): {sub.description}" for name, sub in commands.items()
    )
    sections = [command_section(name, sub) for name, sub in commands.items()]
    return "\n".join([_HEADER, index, "", *sections])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dpl_edit.docs_cli", description="Write the command-line reference page."
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="where to write it (default: docs/cli.md)"
    )
    args = parser.parse_args(argv)
    atomic_write_bytes(args.out, render().encode())
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
