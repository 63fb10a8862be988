"""What the benchmark scripts share: running one mipseg command of this virtualenv."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def run_command(command: list[str], env: dict[str, str], caller: str) -> float:
    """Run one pipeline command (the venv's console script), echoing it; exit on failure.

    Returns the wall seconds it took. ``caller`` names the benchmark in the failure message.
    """
    executable = Path(sys.executable).parent / command[0]
    print("$", " ".join(command), flush=True)
    start = time.time()
    result = subprocess.run([str(executable), *command[1:]], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{caller}: {command[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    seconds = time.time() - start
    print(f"  ({seconds:.0f} s)", flush=True)
    return seconds
