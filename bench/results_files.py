"""Where every benchmark leaves its numbers: the table printed and written as OUT.md, the data as OUT.yaml."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml


def write_results(out: str, lines: list[str], data: dict[str, Any]) -> None:
    """Print the markdown `lines`, write them to OUT.md and {command, **data} to OUT.yaml."""
    table = "\n".join(lines)
    print(table)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".md").write_text(table + "\n")
    path.with_suffix(".yaml").write_text(yaml.safe_dump({"command": " ".join(sys.argv), **data}, sort_keys=False))
