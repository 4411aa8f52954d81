"""Run the entry points as a user does: a fresh Python process, Hydra overrides on the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QUIET = ("+trainer.enable_progress_bar=false",)


def run_cli(script: str, *overrides: str, cwd: Path, timeout: int = 600, check: bool = True,
            ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(REPO / script), *overrides], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def start_cli(script: str, *overrides: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / script), *overrides], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
