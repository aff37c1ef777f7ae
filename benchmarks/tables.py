"""Render the JSON files of ``bgapi compare --json`` as Markdown tables for BENCHMARKS.md.

    python benchmarks/tables.py benchmarks/results/idle.json [...] > tables.md

Each file becomes a heading with its command, a line on the machine, the
table of medians (min–max) and the verdict.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bgapi.compare.child import BASELINE
from bgapi.compare.report import markdown_table


def render(path: Path) -> str:
    """Return the Markdown section for one comparison file."""
    document = json.loads(path.read_text(encoding="utf-8"))
    settings = document["settings"]
    machine = document["machine"]
    modes = ([BASELINE] if settings.get("baseline", True) else []) + settings["modes"]
    command = " ".join(document["command"][1:]) if document.get("command") else "?"
    load_before = machine.get("load_average") or ["?"]
    load_after = machine.get("load_average_after") or ["?"]
    described = (
        f"Machine: {machine['cpu_count']} CPUs ({machine.get('cpu_model') or 'unknown model'}), "
        f"Python {machine['python']}, {machine['platform']}; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after."
    )
    lines = [
        f"### {path.stem}",
        "",
        f"`bgapi {command}`",
        "",
        described,
        "",
        markdown_table(document["summary"], modes, bool(settings.get("load"))),
        "",
        f"Verdict: {document['verdict']}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    for name in sys.argv[1:]:
        print(render(Path(name)))


if __name__ == "__main__":
    main()
