"""The one table every benchmark script prints: rows ``[benchmark, case, ours, alternative, ratio, notes]``."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

COLUMNS = ("benchmark", "case", "ours", "alternative", "ratio", "notes")


def print_rows(title: str, rows: Sequence[Sequence[str]]) -> None:
    """Print ``rows`` under ``title`` (long cells fold)."""
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
