"""Write one benchmark's section of benchmarks/RESULTS.md, leaving the other sections as they are."""

from __future__ import annotations

import platform
from datetime import date
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine_line(*packages: str) -> str:
    """Date, machine and the versions that decide the figures."""
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in ("finetune", *packages))
    return f"{date.today()}, {platform.machine()}, Python {platform.python_version()}, {versions}"


def write_section(results: Path, name: str, section: str) -> None:
    """Replace the section headed `## name ...` (or add it at the end)."""
    text = results.read_text(encoding="utf-8") if results.exists() else "# Benchmark results\n"
    sections = text.split("\n## ")
    kept = [s for s in sections[1:] if not s.startswith(name + " ")]
    body = "\n## ".join([sections[0].rstrip() + "\n", *kept, section.removeprefix("## ")])
    results.write_text(body, encoding="utf-8")
