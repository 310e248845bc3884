"""Each measured configuration runs in a process of its own, so its peak RSS and imports are its alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_child(script: str, arguments: list[str], env: dict | None = None) -> dict:
    """`python SCRIPT --child ARGUMENTS...` from the repository root; the JSON on its last line of stdout."""
    done = subprocess.run(
        [sys.executable, script, "--child", *arguments], cwd=REPO, env=env, check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])
