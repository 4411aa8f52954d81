"""Shared by the entry-point tests: the one subprocess runner and the one Hydra compose context.

Entry points run as a user runs them: a fresh Python process with Hydra overrides on the command
line (`run_cli`), or, where a test needs the composed config itself, Hydra's compose API on the
project's `conf/` (`hydra_context`, then `hydra.compose`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"
# Test-only callbacks (faults.py) are importable by the processes the tests start.
HELPERS_DIR = Path(__file__).resolve().parent


def _run_cli(script: str, *overrides: str, cwd: Path, timeout: int = 600, check: bool = True,
             ) -> subprocess.CompletedProcess:
    """`python <script> <overrides>` in `cwd` (``script="-m anchordet.predict"`` runs that module);
    with `check`, a non-zero exit fails the test with the tail of both output streams."""
    path = os.pathsep.join(p for p in (str(HELPERS_DIR), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    command = script.split() if script.startswith("-m ") else [str(REPO / script)]
    result = subprocess.run([sys.executable, *command, *overrides], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="session")
def run_cli():
    return _run_cli


@pytest.fixture
def hydra_context():
    """Hydra initialised on conf/ for `hydra.compose(...)` calls inside the test."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()
