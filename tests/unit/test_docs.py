"""docs/DESIGN.md stays true to the code: its CLI synopsis names every subcommand and option of
the parsers, and no option they lack."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from hipoa.cli import build_parser

DESIGN = Path(__file__).resolve().parents[2] / "docs" / "DESIGN.md"


def _synopsis() -> dict[str, str]:
    """Subcommand -> its synopsis text (first line and continuation lines, comments dropped)."""
    block = DESIGN.read_text().split("## CLI (", 1)[1].split("```")[1]
    entries: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        start = re.match(r"hipoa ([a-z-]+)", line)
        if start:
            current = start.group(1)
            entries[current] = ""
        if current:
            entries[current] += " " + line.split("#", 1)[0]
    return entries


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_the_synopsis_lists_every_subcommand():
    assert set(_synopsis()) == set(_subparsers())


def test_the_synopsis_names_every_option_and_no_other():
    synopsis = _synopsis()
    for name, sub in _subparsers().items():
        documented = set(re.findall(r"--[a-z][a-z0-9-]*", synopsis[name]))
        options = [[o for o in a.option_strings if o.startswith("--")] for a in sub._actions]
        options = [o for o in options if o and o != ["--help"]]
        missing = [o[0] for o in options if not documented & set(o)]
        unknown = documented - {o for group in options for o in group}
        assert not missing and not unknown, (name, missing, sorted(unknown))
