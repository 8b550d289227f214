"""`lrc methods`: the registered factorization methods and allocators."""

from __future__ import annotations

from rich.table import Table

from .command_output import CommandOutput


def methods() -> None:
    """List the registered factorization methods and allocators."""
    from ..allocate import ALLOCATORS
    from ..factorize import METHODS

    shown = CommandOutput()
    for title, registry in (("methods", METHODS), ("allocators", ALLOCATORS)):
        table = Table(title=title, title_justify="left")
        table.add_column("name")
        table.add_column("what it does")
        for name in registry.names():
            doc = (registry.get(name).__doc__ or "").strip().splitlines()[0]
            table.add_row(name, doc)
        shown.show(table)
