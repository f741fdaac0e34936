"""Run every benchmark script in this folder, one after another (`make bench`).

Benchmarks time things and are not tests: each prints a table and writes JSON into
benchmarks/out/ so README numbers can be re-measured by anyone. Every script here is
picked up, app_speed.py included (it needs Debian's chromium and takes several minutes).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    failures = 0
    for script in sorted(HERE.glob("*.py")):
        if script.name == Path(__file__).name or script.name.startswith("_"):
            continue
        print(f"\n=== {script.name} ===", flush=True)
        failures += subprocess.call([sys.executable, str(script)]) != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
