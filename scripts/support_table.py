"""Prints the README's support-matrix table, generated from ``scripts/support_matrix.py`` (the cells the tests run).

From the repository root::

    python -m scripts.support_table            # print the table
    python -m scripts.support_table --write    # replace the table between the README's markers
    python -m scripts.support_table --check    # exit 1 when the README's table is stale

The README holds the table between ``<!-- support-matrix:start -->`` and ``<!-- support-matrix:end -->``;
``tests/test_support_matrix.py`` fails when it differs from this output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scripts.support_matrix import support_table_markdown

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START_MARKER = "<!-- support-matrix:start -->"
END_MARKER = "<!-- support-matrix:end -->"


def replace_table(text: str, table: str) -> str:
    """``text`` with the part between the markers replaced by ``table`` (raises ``ValueError`` without markers)."""
    if START_MARKER not in text or END_MARKER not in text:
        raise ValueError(f"README.md has no `{START_MARKER}` ... `{END_MARKER}` markers")
    head, rest = text.split(START_MARKER, 1)
    _, tail = rest.split(END_MARKER, 1)
    return f"{head}{START_MARKER}\n{table}\n{END_MARKER}{tail}"


def main(argv: list[str] | None = None) -> int:
    """Prints the table, or writes/checks it in README.md; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="update README.md between the markers")
    group.add_argument("--check", action="store_true", help="exit 1 when README.md's table is stale")
    args = parser.parse_args(argv)
    table = support_table_markdown()
    if not (args.write or args.check):
        print(table)
        return 0
    text = README.read_text(encoding="utf-8")
    updated = replace_table(text, table)
    if args.check:
        if updated != text:
            print("README.md's support table is stale: run `python -m scripts.support_table --write`", file=sys.stderr)
            return 1
        return 0
    README.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
