"""Sweep summary: one row per run of a `python train.py -m ...` sweep, written at the sweep root.

Each training run leaves `result.json` in its own folder (train.py writes it on rank 0); at the end of
the sweep this reads them all, so the summary also works for launchers that run jobs elsewhere
(submitit on SLURM) and for jobs that failed (they simply have no row). The callback class is plain
Python: Hydra calls hooks by name, so nothing here imports Hydra (the library stays config-free).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

log = logging.getLogger("anchordet.sweep")

RESULT_FILE = "result.json"
COLUMNS = ("run", "overrides", "monitor", "best", "best_checkpoint", "last_checkpoint")


def write_run_result(output_dir: str | Path, overrides: list[str], monitor: str, best: float | None,
                     best_checkpoint: str | None, last_checkpoint: str | None) -> Path:
    path = Path(output_dir) / RESULT_FILE
    path.write_text(json.dumps({"overrides": list(overrides), "monitor": monitor, "best": best,
                                "best_checkpoint": best_checkpoint, "last_checkpoint": last_checkpoint},
                               indent=2))
    return path


def collect_results(sweep_dir: str | Path) -> list[dict]:
    rows = []
    for result_file in sorted(Path(sweep_dir).glob(f"*/{RESULT_FILE}"), key=_run_order):
        result = json.loads(result_file.read_text())
        rows.append({"run": result_file.parent.name, **result, "overrides": " ".join(result["overrides"])})
    return rows


def _run_order(path: Path):
    name = path.parent.name
    return (0, int(name)) if name.isdigit() else (1, name)


def write_sweep_summary(sweep_dir: str | Path) -> Path:
    """Write `summary.csv` at the sweep root and log it as a table; returns the CSV path."""
    rows = collect_results(sweep_dir)
    path = Path(sweep_dir) / "summary.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: row.get(column) for column in COLUMNS})
    lines = [f"sweep summary ({len(rows)} runs) -> {path}"]
    for row in rows:
        best = "n/a" if row["best"] is None else f"{row['best']:.4f}"
        lines.append(f"  [{row['run']}] {row['monitor']}={best}  {row['overrides']}  {row['best_checkpoint']}")
    log.info("\n".join(lines))
    return path


class SweepSummaryCallback:
    """Hydra callback (configured in conf/hydra/default.yaml): writes the summary when a sweep ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        write_sweep_summary(config.hydra.sweep.dir)

    # Hydra calls every hook by name; the others have nothing to do.
    def on_run_start(self, config, **kwargs) -> None: ...
    def on_run_end(self, config, **kwargs) -> None: ...
    def on_multirun_start(self, config, **kwargs) -> None: ...
    def on_job_start(self, config, **kwargs) -> None: ...
    def on_job_end(self, config, job_return, **kwargs) -> None: ...
    def on_compose_config(self, config, **kwargs) -> None: ...
