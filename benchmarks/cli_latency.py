"""Wall time of `finetune --help` and `finetune validate` in fresh processes (target: under 1 s each).

    python benchmarks/cli_latency.py            # 20 runs of each
    python benchmarks/cli_latency.py --quick    # 3 runs, for the test that keeps this script working

Prints a table (median and worst of N fresh processes) and the ratio of the median to the 1 s target,
and writes the table into benchmarks/RESULTS.md (or --results FILE) with the date, machine and versions.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results import RESULTS, machine_line, write_section

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 1.0
COMMANDS = {
    "finetune --help": ["--help"],
    "finetune validate recipes/alpaca_lora.yaml": ["validate", "recipes/alpaca_lora.yaml"],
    "finetune validate recipes/quickstart.yaml": ["validate", "recipes/quickstart.yaml"],
}


def time_command(args: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "finetune", *args], cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 runs per command")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = 3 if args.quick else 20

    rows = ["| command | median s | worst s | median / 1 s target |", "|---|---|---|---|"]
    for label, argv in COMMANDS.items():
        times = time_command(argv, runs)
        median = statistics.median(times)
        rows.append(f"| `{label}` | {median:.3f} | {max(times):.3f} | {median / TARGET_S:.2f} |")
    table = "\n".join(rows)
    print(table)

    command = "python benchmarks/cli_latency.py" + (" --quick" if args.quick else "")
    header = f"## cli_latency ({runs} fresh processes each; `{command}`)\n\n{machine_line('pydantic')}\n\n"
    write_section(args.results, "cli_latency", header + table + "\n")


if __name__ == "__main__":
    main()
